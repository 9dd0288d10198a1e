"""kernels/attention_hopper.py without a GPU: the shapes the Hopper kernel takes, and what it refuses.
The GPU suite runs it; tests/test_kernel_codegen.py compiles it for sm_90."""

import pytest
import torch

attention_hopper = pytest.importorskip("vllm_flashprefill.kernels.attention_hopper",
                                       reason="this Triton has no Gluon (or another Gluon API)")

GPU = torch.device("cuda", 0)
SHAPE = dict(dtype=torch.bfloat16, kv_dtype=torch.bfloat16, head_size=128, page_size=64, sparse_block=128, gqa=4)


@pytest.mark.parametrize("change,reason", [
    ({}, None),
    (dict(dtype=torch.float16, kv_dtype=torch.float16), None),
    (dict(head_size=64), None),
    (dict(page_size=16), None),
    (dict(page_size=128), None),
    (dict(page_size=512), None),  # a tile lies in one page
    (dict(sparse_block=512), None),
    (dict(gqa=1), None),
    (dict(gqa=7), None),
    (dict(dtype=torch.float32, kv_dtype=torch.float32), "dtype torch.float32"),
    (dict(kv_dtype=torch.float8_e4m3fn), "KV cache torch.float8_e4m3fn"),
    (dict(dtype=torch.float8_e4m3fn, kv_dtype=torch.float8_e4m3fn), "fp8 data"),  # vLLM quantizes q for FA3
    (dict(kv_dtype=torch.float16), "KV cache dtype torch.float16 differs"),
    (dict(head_size=256), "head size 256"),
    (dict(head_size=80), "head size 80"),
    (dict(sparse_block=64), "block_size 64"),
    (dict(page_size=8), "pages of 8"),
    (dict(page_size=48), "pages of 48"),
    (dict(page_size=192), "pages of 192"),  # a 128-key tile would straddle two pages
    (dict(gqa=256), "256 query heads"),
])
def test_hopper_kernel_shapes(capability, change, reason):
    capability(9)
    got = attention_hopper.unsupported_reason(GPU, **{**SHAPE, **change})
    assert got == reason if reason is None else reason in got


@pytest.mark.parametrize("major", [8, 10, 12])
def test_hopper_kernel_needs_sm90(capability, major):
    capability(major)
    assert "sm_90" in attention_hopper.unsupported_reason(GPU, **SHAPE)
    assert "sm_90" in attention_hopper.unsupported_reason(torch.device("cpu"), **SHAPE)


def test_hopper_kernel_refuses_what_it_cannot_run(capability, monkeypatch):
    q = torch.zeros(4, 8, 128, dtype=torch.bfloat16)
    cache = torch.zeros(2, 64, 2, 128, dtype=torch.bfloat16)

    def call(q=q, k=cache, v=cache, out=q.clone(), sparse_block=128):
        attention_hopper.sparse_prefill_attention(q, k, v, out, None, None, None, None, None, 1.0, sparse_block)

    with pytest.raises(ValueError, match="sm_90"):
        call()
    capability(9)
    monkeypatch.setattr(torch.Tensor, "device", property(lambda t: GPU))  # checks only, nothing launches
    with pytest.raises(ValueError, match="KV cache dtype"):
        call(k=cache.half())
    with pytest.raises(ValueError, match="V cache dtype"):
        call(v=cache.half())
    with pytest.raises(ValueError, match="output dtype"):
        call(out=q.half())
    with pytest.raises(ValueError, match="block_size 64"):
        call(sparse_block=64)


def test_a_single_kv_head_of_any_stride_gets_aligned_descriptors(capability, monkeypatch):
    """One KV head per rank: vLLM's view may give the head a stride of 1, which Gluon's TMA descriptor
    refuses ("strides must be 16-byte aligned", before the launcher set size-1 strides as a
    contiguous layout would). Checked up to the launch, which needs an sm_90 GPU."""
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(args)

    capability(9)
    monkeypatch.setattr(attention_hopper, "unsupported_reason", lambda *args: None)
    monkeypatch.setattr(attention_hopper, "_hopper_sparse_prefill_kernel", Recorder())
    q = torch.zeros(128, 4, 128, dtype=torch.bfloat16)
    cache = torch.zeros(2, 64, 1, 256, dtype=torch.bfloat16)[..., :128]
    single_head = cache.as_strided(cache.shape, (cache.stride(0), cache.stride(1), 1, 1))
    qblocks = torch.tensor([[0, 0, 0, 128]], dtype=torch.int32)
    lists = torch.zeros(1, 1, 1, dtype=torch.int32), torch.ones(1, 1, dtype=torch.int32)
    attention_hopper.sparse_prefill_attention(
        q, single_head, single_head, q.clone(), torch.zeros(1, 2, dtype=torch.int32),
        torch.tensor([128], dtype=torch.int32), qblocks, *lists, 1.0, 128)
    (args,) = launches
    assert [d.strides for d in args[2:4]] == [[64 * 256, 256, 128, 1]] * 2


def test_hopper_launcher_refuses_index_inputs_the_kernel_would_misread(capability, monkeypatch):
    """The checks of the portable launcher (tests/test_attention.py), here too: e.g. an int64
    block table, or block lists for another number of query blocks."""
    capability(9)
    monkeypatch.setattr(attention_hopper, "unsupported_reason", lambda *args: None)
    q = torch.zeros(128, 4, 128, dtype=torch.bfloat16)
    cache = torch.zeros(2, 64, 1, 128, dtype=torch.bfloat16)
    qblocks = torch.tensor([[0, 0, 0, 128]], dtype=torch.int32)
    block_table, seq_lens = torch.zeros(1, 2, dtype=torch.int32), torch.tensor([128], dtype=torch.int32)
    lists = torch.zeros(1, 1, 1, dtype=torch.int32), torch.ones(1, 1, dtype=torch.int32)

    def call(block_table=block_table, lists=lists):
        attention_hopper.sparse_prefill_attention(q, cache, cache, q.clone(), block_table, seq_lens, qblocks, *lists,
                                                  1.0, 128)

    with pytest.raises(ValueError, match=r"block_table must be an int32 \[requests, pages\] tensor"):
        call(block_table=block_table.long())
    with pytest.raises(ValueError, match=r"kv_indices \(2, 1, 1\) and kv_counts \(2, 1\) must list the 1 query blocks"):
        call(lists=(torch.zeros(2, 1, 1, dtype=torch.int32), torch.ones(2, 1, dtype=torch.int32)))
