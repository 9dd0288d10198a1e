"""kernels/attention.py, the portable block-sparse attention kernel, against the PyTorch reference
(Triton's interpreter on CPU, fp16/fp32), for every pattern's block lists."""

import pytest
import torch

from tests.paged import dynamic_mask, make_paged_batch, query_blocks_of
from vllm_flashprefill.block_lists import BlockLists
from vllm_flashprefill.config import FlashPrefillConfig
from vllm_flashprefill.kernels.attention import launch_config, sparse_prefill_attention
from vllm_flashprefill.kernels.common import canonical_strides
from vllm_flashprefill.kernels.limits import device_limits
from vllm_flashprefill.kernels.reference import sparse_attention_reference
from vllm_flashprefill.patterns import forced_block_mask

BLOCK = 64


def run_sparse(batch, qblocks, mask, scale):
    indices, counts = BlockLists.from_mask(mask)
    out = torch.full_like(batch.q, float("nan"))
    sparse_prefill_attention(
        batch.q, batch.k_cache, batch.v_cache, out, batch.block_table, batch.seq_lens,
        qblocks.table, indices, counts, scale, BLOCK,
    )
    return out


# (query lengths, context lengths, Hq, Hkv, head size, page size, dtype, layout)
CASES = [
    ([150], [0], 4, 4, 64, 16, torch.float32, "NHD"),
    ([100, 37, 200], [70, 300, 0], 8, 2, 64, 32, torch.float16, "NHD"),
    ([130, 64], [5, 64], 7, 1, 64, 16, torch.float32, "HND"),
    ([90], [200], 4, 1, 128, 64, torch.float16, "NHD"),  # pages of whole tiles: TMA copies
    ([170, 60], [64, 0], 8, 2, 64, 64, torch.float16, "NHD"),
]


def case_mask(pattern, case):
    """The batch of a case and the block mask the pattern gives it. Lengths and options are chosen
    so that the sparse patterns skip blocks and, for dynamic, KV heads keep different lists (only
    the diagonal and each head's best block), which the kernel must follow head by head."""
    query_lens, context_lens, hq, hkv, head_size, page_size, dtype, layout = case
    batch = make_paged_batch(
        query_lens, context_lens, hq, hkv, head_size, page_size, dtype, layout=layout, seed=len(pattern)
    )
    options = dict(sink_blocks=1, local_blocks=1, stride=3, threshold=1.0)
    if pattern == "dynamic":
        options.update(sink_blocks=0, local_blocks=0, stride=0, above_mean=0.0)
    cfg = FlashPrefillConfig(pattern=pattern, sparse_block=BLOCK, min_seq_len=0, dense_tail_blocks=0, **options)
    scale = head_size**-0.5
    qblocks = query_blocks_of(batch, hq // hkv, BLOCK)
    if pattern == "dynamic":
        _, mask = dynamic_mask(batch, qblocks, cfg, scale)
    else:
        mask = forced_block_mask(qblocks.block_index, qblocks.tail_end, qblocks.num_kv_blocks, cfg)
    return batch, qblocks, mask, scale


@pytest.mark.parametrize("pattern", ["dense", "local", "strided", "hybrid", "dynamic"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"q{c[0]}-c{c[1]}-h{c[2]}/{c[3]}-d{c[4]}-p{c[5]}")
def test_sparse_attention_matches_reference(pattern, case):
    batch, qblocks, mask, scale = case_mask(pattern, case)
    out = run_sparse(batch, qblocks, mask, scale)
    ref = sparse_attention_reference(
        batch.q, batch.k_cache, batch.v_cache, batch.block_table, batch.seq_lens,
        qblocks.table, mask, scale, BLOCK,
    )
    assert not out.isnan().any(), "a row was left unwritten or read garbage"
    tol = 2e-3 if batch.q.dtype == torch.float16 else 1e-5
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_reference_cases_skip_blocks_and_differ_across_heads():
    """Guards the test above: with everything selected, a kernel that reads the wrong block list
    (another head's, or none) would still match the reference."""
    for pattern in ("local", "strided", "hybrid", "dynamic"):
        skipping = per_head = 0
        for case in CASES:
            _, qblocks, mask, _ = case_mask(pattern, case)
            causal = torch.arange(qblocks.num_kv_blocks)[None, :] <= qblocks.block_index[:, None]
            skipping += int(mask.sum() < causal.sum() * mask.shape[1])
            per_head += int(any(not torch.equal(mask[:, 0], mask[:, h]) for h in range(mask.shape[1])))
        assert skipping >= 3, pattern
        if pattern == "dynamic":
            assert per_head >= 3


@pytest.mark.parametrize("head_size", [64, 128])
def test_tma_tiles_match_gathered_tiles(head_size):
    """Pages that hold whole key tiles switch off-diagonal tiles to TMA copies; same numbers."""
    batch = make_paged_batch([200, 90], [60, 128], 8, 2, head_size, 64, torch.float32, seed=2)
    qblocks = query_blocks_of(batch, 4, BLOCK)
    cfg = FlashPrefillConfig(
        pattern="hybrid", sparse_block=BLOCK, local_blocks=1, stride=2, min_seq_len=0, dense_tail_blocks=0
    )
    indices, counts = BlockLists.from_mask(
        forced_block_mask(qblocks.block_index, qblocks.tail_end, qblocks.num_kv_blocks, cfg)
    )
    tma = launch_config(head_size, 4, BLOCK, 64, device_limits(batch.q.device), batch.q.element_size())
    assert tma["TMA"]
    outs = []
    for config in (tma, {**tma, "TMA": False}):
        out = torch.full_like(batch.q, float("nan"))
        sparse_prefill_attention(
            batch.q, batch.k_cache, batch.v_cache, out, batch.block_table, batch.seq_lens,
            qblocks.table, indices, counts, head_size**-0.5, BLOCK, config,
        )
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    assert not outs[0].isnan().any()


def test_sparse_patterns_actually_skip_blocks():
    batch = make_paged_batch([640], [0], 2, 2, 64, 16, torch.float32)
    qblocks = query_blocks_of(batch, 1, BLOCK)
    cfg = FlashPrefillConfig(
        pattern="local", sparse_block=BLOCK, sink_blocks=1, local_blocks=1, min_seq_len=0,
        dense_tail_blocks=1,
    )
    qb, tail_end = qblocks.block_index, qblocks.tail_end
    mask = forced_block_mask(qb, tail_end, qblocks.num_kv_blocks, cfg)
    dense = forced_block_mask(qb, tail_end, qblocks.num_kv_blocks,
                              FlashPrefillConfig(pattern="dense", sparse_block=BLOCK))
    assert mask.sum() < dense.sum()
    out = run_sparse(batch, qblocks, mask, 0.125)
    out_dense = run_sparse(batch, qblocks, dense, 0.125)
    tail = 640 - BLOCK  # the chunk's last block is its dense tail; the block before it is sparse
    assert not torch.allclose(out[tail - BLOCK:tail], out_dense[tail - BLOCK:tail], atol=1e-3)
    torch.testing.assert_close(out[tail:], out_dense[tail:], atol=1e-5, rtol=1e-5)


def single_kv_head_views(batch):
    """The batch's caches with their one KV head's stride set to 1, as vLLM's views may carry it
    (any stride addresses the same elements of a size-1 dimension)."""
    return [c.as_strided(c.shape, (c.stride(0), c.stride(1), 1, 1)) for c in (batch.k_cache, batch.v_cache)]


def test_a_single_kv_head_of_any_stride_runs_as_the_canonical_view():
    """One KV head per rank (e.g. TP 8): the head's stride of 1 is no 16-byte aligned stride for the
    TMA descriptors (the launcher asserted "strides must be 16-byte aligned" before it set such
    strides as a contiguous layout would); now the same numbers as the cache's own view."""
    batch = make_paged_batch([130], [64], 2, 1, 64, 64, torch.float32, seed=1)
    qblocks = query_blocks_of(batch, 2, BLOCK)
    assert launch_config(64, 2, BLOCK, 64, device_limits(batch.q.device), 4)["TMA"]
    causal = (torch.arange(qblocks.num_kv_blocks)[None, :] <= qblocks.block_index[:, None])[:, None]
    indices, counts = BlockLists.from_mask(causal)
    outs = []
    for k_cache, v_cache in ((batch.k_cache, batch.v_cache), single_kv_head_views(batch)):
        out = torch.full_like(batch.q, float("nan"))
        sparse_prefill_attention(batch.q, k_cache, v_cache, out, batch.block_table, batch.seq_lens,
                                 qblocks.table, indices, counts, 0.125, BLOCK)
        outs.append(out)
    assert not outs[0].isnan().any()
    torch.testing.assert_close(outs[1], outs[0], atol=0, rtol=0)


def test_canonical_strides_set_size_one_dimensions_as_a_contiguous_layout_would():
    cache = torch.zeros(5, 64, 1, 128)[..., :64]  # [pages, page_size, 1 head, D] of a wider row
    odd = cache.as_strided(cache.shape, (8192, 128, 1, 1))
    assert canonical_strides(odd).stride() == (8192, 128, 64, 1)
    assert canonical_strides(odd).data_ptr() == odd.data_ptr()
    contiguous = torch.zeros(5, 64, 1, 64)
    assert canonical_strides(contiguous) is contiguous  # nothing to change: the same tensor
    assert canonical_strides(torch.zeros(1, 3, 1).as_strided((1, 3, 1), (7, 1, 5))).stride() == (3, 1, 1)


def transposed(t):
    """The same values with non-contiguous rows (column-major)."""
    return t.t().contiguous().t()


@pytest.mark.parametrize("change,message", [
    (dict(block_table=lambda t: t.long()),
     "block_table must be an int32 [requests, pages] tensor with contiguous rows; got torch.int64 of shape (2, 6) "
     "with strides (6, 1)"),
    (dict(block_table=transposed),
     "block_table must be an int32 [requests, pages] tensor with contiguous rows; got torch.int32 of shape (2, 6) "
     "with strides (1, 2)"),
    (dict(seq_lens=lambda t: t.long()), "seq_lens must be an int32 [requests] tensor"),
    (dict(qblocks=lambda t: torch.cat([t, t], 1)[:, :4]),
     "qblocks must be an int32 [query blocks, 4] tensor, contiguous; got torch.int32 of shape (5, 4) with strides "
     "(8, 1)"),
    (dict(qblocks=lambda t: t[:, :3].contiguous()), "qblocks must have 4 columns (kernels/common.py), not 3"),
    (dict(kv_indices=lambda t: t.long()), "kv_indices must be an int32 [query blocks, heads, blocks] tensor"),
    (dict(kv_indices=lambda t: torch.stack([t, t], -1)[..., 0]),
     "kv_indices must be an int32 [query blocks, heads, blocks] tensor with contiguous rows"),
    (dict(kv_counts=lambda t: t.long()), "kv_counts must be an int32 [query blocks, heads] tensor; got torch.int64"),
    (dict(kv_counts=lambda t: t[:-1]), "kv_indices (5, 1, 3) and kv_counts (4, 1) must list the 5 query blocks for "
                                       "the same heads (1, or one list per KV head: 2)"),
    (dict(kv_indices=lambda t: t.expand(-1, 3, -1), kv_counts=lambda t: t.expand(-1, 3)),
     "kv_indices (5, 3, 3) and kv_counts (5, 3) must list the 5 query blocks for the same heads (1, or one list "
     "per KV head: 2)"),
], ids=["block-table-int64", "block-table-columns", "seq-lens-int64", "qblocks-strided", "qblocks-3-columns",
        "kv-indices-int64", "kv-indices-strided-rows", "kv-counts-int64", "lists-short", "lists-3-heads"])
def test_the_launcher_refuses_index_inputs_the_kernel_would_misread(change, message):
    """Each index input in the dtype and layout the kernel reads, checked on the host (no device
    sync): before, an int64 or column-major table read garbage (NaN, or out of bounds)."""
    batch = make_paged_batch([100, 150], [0, 40], 4, 2, 64, 32, torch.float32)
    qblocks = query_blocks_of(batch, 2, BLOCK)
    causal = (torch.arange(qblocks.num_kv_blocks)[None, :] <= qblocks.block_index[:, None])[:, None]
    kv_indices, kv_counts = BlockLists.from_mask(causal)
    inputs = dict(block_table=batch.block_table, seq_lens=batch.seq_lens, qblocks=qblocks.table,
                  kv_indices=kv_indices, kv_counts=kv_counts)
    inputs = {name: change.get(name, lambda t: t)(t) for name, t in inputs.items()}
    out = torch.full_like(batch.q, float("nan"))
    with pytest.raises(ValueError) as refused:
        sparse_prefill_attention(batch.q, batch.k_cache, batch.v_cache, out, **inputs, scale=0.125, sparse_block=BLOCK)
    assert str(refused.value).startswith(message)
    assert out.isnan().all(), "nothing launched"
