"""An fp8 (e4m3) KV cache with vLLM's scales in the portable attention kernel and the scoring kernel,
against the PyTorch references on the dequantized values (Triton's interpreter on CPU)."""

import pytest
import torch

from tests.fp8 import quantize_batch
from tests.paged import make_paged_batch
from vllm_flashprefill.block_lists import BlockLists
from vllm_flashprefill.config import FlashPrefillConfig
from vllm_flashprefill.kernels.attention import launch_config, sparse_prefill_attention
from vllm_flashprefill.kernels.common import FP8_DTYPE, dot_dtype
from vllm_flashprefill.kernels.dispatch import choose_sparse_kernel
from vllm_flashprefill.kernels.limits import device_limits
from vllm_flashprefill.kernels.reference import block_scores_reference, sparse_attention_reference
from vllm_flashprefill.kernels.scoring import block_scores, blocks_per_group
from vllm_flashprefill.patterns import forced_block_mask, select_dynamic
from vllm_flashprefill.plan import build_query_blocks

BLOCK = 64


def plan(batch, gqa):
    return build_query_blocks(
        batch.query_start_loc, batch.seq_lens, range(len(batch.query_lens)), BLOCK, "cpu", blocks_per_group(gqa),
    )


def hybrid_mask(qblocks):
    cfg = FlashPrefillConfig(pattern="hybrid", sparse_block=BLOCK, sink_blocks=1, local_blocks=1, stride=3,
                             min_seq_len=0, dense_tail_blocks=0)
    return forced_block_mask(qblocks.block_index, qblocks.tail_end, qblocks.num_kv_blocks, cfg)


# (query lengths, context lengths, Hq, Hkv, head size, page size, dtype, layout, per-head scales, fp8 q)
CASES = [
    ([150, 37], [70, 300], 4, 4, 64, 16, torch.float32, "NHD", False, False),
    ([130, 64], [5, 64], 8, 2, 128, 16, torch.float16, "HND", False, False),
    ([90], [200], 8, 2, 128, 64, torch.float16, "NHD", False, False),  # pages of whole tiles: TMA
    ([170, 60], [64, 0], 8, 2, 64, 64, torch.float32, "NHD", True, False),  # TMA, per-head scales
    ([200], [60], 8, 2, 64, 64, torch.float16, "NHD", False, True),  # TMA, q in fp8 as well
    ([120, 90], [0, 150], 8, 2, 128, 16, torch.float32, "NHD", True, True),
]
# bf16 is left out: this Triton's interpreter multiplies bf16 tiles wrongly (tl.dot), fp8 or not.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"h{c[2]}/{c[3]}-d{c[4]}-p{c[5]}-{str(c[6])[6:]}"
                         + "-per-head" * c[8] + "-fp8q" * c[9])
def test_fp8_attention_matches_reference(case):
    query_lens, context_lens, hq, hkv, head_size, page_size, dtype, layout, per_head, fp8_query = case
    batch = make_paged_batch(query_lens, context_lens, hq, hkv, head_size, page_size, dtype, layout=layout,
                             seed=hq + page_size)
    scales = quantize_batch(batch, per_head, fp8_query)
    qblocks = plan(batch, hq // hkv)
    mask = hybrid_mask(qblocks)
    config = launch_config(head_size, hq // hkv, BLOCK, page_size, device_limits(batch.q.device),
                           dot_dtype(batch.q).itemsize)
    assert config["TMA"] == (page_size == 64)
    indices, counts = BlockLists.from_mask(mask)
    out = torch.full(batch.q.shape, float("nan"), dtype=dtype)
    scale = head_size**-0.5
    assert batch.kv_cache.float().isnan().any(), "the poison of unused slots survives in fp8"
    sparse_prefill_attention(batch.q, batch.k_cache, batch.v_cache, out, batch.block_table, batch.seq_lens,
                             qblocks.table, indices, counts, scale, BLOCK, config, **scales)
    ref = sparse_attention_reference(batch.q, batch.k_cache, batch.v_cache, batch.block_table, batch.seq_lens,
                                     qblocks.table, mask, scale, BLOCK, **scales)
    assert not out.isnan().any(), "a row was left unwritten or read an unused slot"
    tol = TOLERANCE[torch.float16 if fp8_query else dtype]  # an fp8 q: the dots run in fp16
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    # The scales matter: the same fp8 values without them give another result.
    unscaled = sparse_attention_reference(batch.q, batch.k_cache, batch.v_cache, batch.block_table,
                                          batch.seq_lens, qblocks.table, mask, scale, BLOCK)
    assert not torch.allclose(unscaled, ref, atol=0.1, rtol=0.1)


@pytest.mark.parametrize("page_size", [16, 64])  # 64: key tiles are TMA copies
@pytest.mark.parametrize("fp8_query", [False, True], ids=["q-fp32", "q-fp8"])
def test_fp8_block_scores_match_reference(page_size, fp8_query):
    batch = make_paged_batch([300, 77], [40, 129], 8, 2, 64, page_size, torch.float32)
    scales = quantize_batch(batch, fp8_query=fp8_query)
    scales.pop("v_scale")
    qblocks = plan(batch, 4)
    scores = torch.full((qblocks.num_blocks, 8, qblocks.num_kv_blocks), float("-inf"))
    pooled = torch.empty(qblocks.num_blocks, 8, 64)
    block_scores(batch.q, batch.k_cache, batch.block_table, batch.seq_lens, qblocks.table, qblocks.score_groups,
                 scores, pooled, 0.125, BLOCK, **scales)
    ref = block_scores_reference(batch.q, batch.k_cache, batch.block_table, batch.seq_lens, qblocks.table, 0.125,
                                 BLOCK, qblocks.num_kv_blocks, **scales)
    causal = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(scores), causal), "only causal entries are written"
    # An fp32 q enters the dot in fp32; an fp8 q's pooled mean in fp16.
    tol = 2e-3 if fp8_query else 1e-4
    torch.testing.assert_close(scores[causal], ref[causal], atol=tol, rtol=tol)
    if not fp8_query:
        cfg = FlashPrefillConfig(pattern="dynamic", sparse_block=BLOCK, sink_blocks=0, local_blocks=0,
                                 threshold=0.97, above_mean=0.0, min_seq_len=0, dense_tail_blocks=0)
        args = (qblocks.block_index, qblocks.tail_end, 2, cfg)
        mask = select_dynamic(scores, *args)
        assert torch.equal(mask, select_dynamic(ref, *args))
        assert mask.sum() < causal[:, ::4].sum(), "threshold 0.97 should drop some blocks"


def test_fp8_inputs_and_scales_must_match():
    batch = make_paged_batch([70], [0], 4, 2, 64, 16, torch.float16)
    scales = quantize_batch(batch)
    qblocks = plan(batch, 2)
    indices, counts = BlockLists.from_mask(hybrid_mask(qblocks))

    def attend(q=batch.q, k=batch.k_cache, v=batch.v_cache, **kw):
        out = torch.empty(q.shape, dtype=torch.float16)
        sparse_prefill_attention(q, k, v, out, batch.block_table, batch.seq_lens, qblocks.table, indices, counts,
                                 0.125, BLOCK, **{**scales, **kw})

    with pytest.raises(ValueError, match="V is torch.float8_e4m3fn: a scale"):
        attend(v_scale=None)
    with pytest.raises(ValueError, match="q is torch.float16: a scale"):
        attend(q_scale=torch.tensor(1.0))
    with pytest.raises(ValueError, match="K dtype torch.float8_e5m2"):
        attend(k=batch.k_cache.view(torch.float8_e5m2))
    with pytest.raises(ValueError, match="one per KV head"):
        attend(k_scale=torch.ones(3))
    with pytest.raises(ValueError, match="float32"):
        attend(k_scale=torch.tensor(1.0, dtype=torch.float16))


def test_fp8_runs_on_the_portable_kernel(monkeypatch):
    pytest.importorskip("vllm_flashprefill.kernels.attention_hopper", reason="this Triton has no Gluon")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    for q_dtype in (torch.bfloat16, FP8_DTYPE):
        kernel, reason = choose_sparse_kernel("auto", torch.device("cuda", 0), q_dtype, FP8_DTYPE, 128, 64, 128, 4)
        assert kernel is sparse_prefill_attention and "fp8" in reason
