"""kernels/scoring.py, the pooled-query block scores of dynamic selection, against the PyTorch
reference (Triton's interpreter on CPU)."""

import pytest
import torch

from tests.paged import dynamic_mask, make_paged_batch, query_blocks_of
from vllm_flashprefill.config import FlashPrefillConfig
from vllm_flashprefill.kernels.reference import block_scores_reference
from vllm_flashprefill.kernels.scoring import block_scores, pool_queries
from vllm_flashprefill.patterns import select_dynamic

BLOCK = 64


@pytest.mark.parametrize("page_size", [16, 64])  # 64: key tiles are TMA copies
def test_block_scores_match_reference_and_give_same_selection(page_size):
    batch = make_paged_batch([300, 77], [40, 129], 8, 2, 64, page_size, torch.float32)
    qblocks = query_blocks_of(batch, 4, BLOCK)
    scale = 0.125
    cfg = FlashPrefillConfig(pattern="dynamic", sparse_block=BLOCK, sink_blocks=0, local_blocks=0, threshold=0.97,
                             above_mean=0.0, min_seq_len=0, dense_tail_blocks=0)
    scores, mask = dynamic_mask(batch, qblocks, cfg, scale)
    ref_scores = block_scores_reference(
        batch.q, batch.k_cache, batch.block_table, batch.seq_lens, qblocks.table, scale, BLOCK,
        qblocks.num_kv_blocks,
    )
    causal = torch.isfinite(ref_scores)
    torch.testing.assert_close(scores[causal], ref_scores[causal], atol=1e-4, rtol=1e-4)
    ref_mask = select_dynamic(ref_scores, qblocks.block_index, qblocks.tail_end, 2, cfg)
    assert torch.equal(mask, ref_mask)
    assert mask.sum() < causal[:, ::4].sum(), "threshold 0.97 should drop some blocks"


@pytest.mark.parametrize(
    "config", [dict(KV_BLOCKS_PER_PROGRAM=2), dict(KV_BLOCKS_PER_PROGRAM=3, num_warps=8)], ids=["kv2", "kv3"],
)
@pytest.mark.parametrize("page_size", [16, 64])
def test_block_scores_split_over_programs(config, page_size):
    """The KV range split over several programs (with 2 blocks per program, the first request's
    last program holds only its partial block; the third request ends exactly at a block boundary)
    gives the reference scores and writes only causal entries."""
    batch = make_paged_batch([265, 200, 64], [0, 129, 0], 8, 2, 64, page_size, torch.float32, seed=5)
    # Every real score negative, every slot past a request's end (and every unused page) huge: a
    # score that takes in a key past seq_len, masked to 0 or read, comes out wrong.
    garbage = batch.kv_cache.isnan()
    batch.kv_cache.abs_().neg_()
    batch.kv_cache[garbage] = 100.0
    batch.q.abs_()
    qblocks = query_blocks_of(batch, 4, BLOCK)
    scores = torch.full((qblocks.num_blocks, 8, qblocks.num_kv_blocks), float("-inf"))
    pooled = torch.empty(qblocks.num_blocks, 8, 64)
    block_scores(
        batch.q, batch.k_cache, batch.block_table, batch.seq_lens, qblocks.table,
        qblocks.score_groups, scores, pooled, 0.125, BLOCK, config,
    )
    ref = block_scores_reference(
        batch.q, batch.k_cache, batch.block_table, batch.seq_lens, qblocks.table, 0.125, BLOCK,
        qblocks.num_kv_blocks,
    )
    causal = torch.isfinite(ref)
    torch.testing.assert_close(scores[causal], ref[causal], atol=1e-4, rtol=1e-4)
    assert torch.equal(torch.isfinite(scores), causal), "only causal entries are written"


@pytest.mark.parametrize(
    "config, q_in_qkv",
    [(None, False), (None, True), (dict(ROWS=16, HEADS=1), False), (dict(ROWS=16, HEADS=2), True)],
    ids=["default-4-heads", "default-4-heads-qkv-view", "16-row-loop-1-head", "16-row-loop-2-heads-qkv-view"],
)
def test_pool_queries_means_each_blocks_own_rows(config, q_in_qkv):
    batch = make_paged_batch([150, 37], [70, 300], 4, 2, 64, 16, torch.float32, seed=2)
    q = batch.q
    if q_in_qkv:  # as vLLM passes it: a view into the fused QKV projection's output
        qkv = torch.randn(q.shape[0], 8 * 64)
        qkv[:, :4 * 64] = q.flatten(1)
        q = qkv[:, :4 * 64].view(-1, 4, 64)
    qblocks = query_blocks_of(batch, 2, BLOCK)
    # Groups of up to 2 blocks that leave out query block 2 (first request) and 4 (second).
    groups = torch.tensor([[0, 2], [3, 1]], dtype=torch.int32)
    pooled = torch.full((qblocks.num_blocks + 1, 4, 64), float("nan"))
    pool_queries(q, qblocks.table, groups, pooled, BLOCK, 2, config)
    for i, (_, first_row, _, rows) in enumerate(qblocks.table_cpu.tolist()):
        if i in (2, 4):
            assert pooled[i].isnan().all(), "a block outside the groups stays untouched"
        else:
            torch.testing.assert_close(pooled[i], batch.q[first_row:first_row + rows].mean(0), atol=1e-6, rtol=1e-5)
    assert pooled[-1].isnan().all(), "rows past the query blocks stay untouched"


@pytest.mark.parametrize("heads", [3, 8])
def test_pool_queries_rejects_heads_per_program_that_are_no_power_of_two_or_do_not_divide(heads):
    batch = make_paged_batch([150], [0], 4, 2, 64, 16, torch.float32, seed=2)
    qblocks = query_blocks_of(batch, 2, BLOCK)
    pooled = torch.empty(qblocks.num_blocks, 4, 64)
    with pytest.raises(ValueError, match=f"divides 4, not {heads}"):
        pool_queries(batch.q, qblocks.table, qblocks.score_groups, pooled, BLOCK, 2, dict(HEADS=heads))


def test_selection_ignores_the_chunk_around_a_block():
    """A block-aligned prompt gives the same selection in one chunk or in two (without a dense
    tail: with one, the tail of the first chunk is dense as well)."""
    whole = make_paged_batch([512], [0], 4, 2, 64, 16, torch.float32, seed=3)
    cfg = FlashPrefillConfig(
        pattern="dynamic", sparse_block=BLOCK, sink_blocks=0, local_blocks=0, threshold=0.95,
        above_mean=0.0, min_seq_len=0, dense_tail_blocks=0,
    )
    qb_whole = query_blocks_of(whole, 2, BLOCK)
    _, mask_whole = dynamic_mask(whole, qb_whole, cfg, 0.125)
    # Second chunk: the last 192 query rows, the first 320 tokens already in the cache.
    tail = make_paged_batch([192], [320], 4, 2, 64, 16, torch.float32, seed=3)
    tail.kv_cache.copy_(whole.kv_cache)
    tail.block_table.copy_(whole.block_table)
    tail.q.copy_(whole.q[320:])
    qb_tail = query_blocks_of(tail, 2, BLOCK)
    _, mask_tail = dynamic_mask(tail, qb_tail, cfg, 0.125)
    assert torch.equal(mask_tail, mask_whole[-3:])
    assert 0 < mask_tail.sum() < 2 * (6 + 7 + 8), "a selection that keeps every block shows nothing"


def test_a_single_kv_head_of_any_stride_scores_as_the_canonical_view():
    """The scoring kernel's TMA descriptor over a cache with one KV head whose stride is 1 (vLLM's
    views may carry it; it asserted "strides must be 16-byte aligned" before the launcher set such
    strides as a contiguous layout would): the same scores as the cache's own view."""
    batch = make_paged_batch([200], [64], 2, 1, 64, 64, torch.float32, seed=3)
    qblocks = query_blocks_of(batch, 2, BLOCK)
    single_head = batch.k_cache.as_strided(batch.k_cache.shape, (*batch.k_cache.stride()[:2], 1, 1))
    results = []
    for k_cache in (batch.k_cache, single_head):
        scores = torch.full((qblocks.num_blocks, 2, qblocks.num_kv_blocks), float("-inf"))
        pooled = torch.empty(qblocks.num_blocks, 2, 64)
        block_scores(batch.q, k_cache, batch.block_table, batch.seq_lens, qblocks.table, qblocks.score_groups,
                     scores, pooled, 0.125, BLOCK, dict(TMA=True, BLOCK_N=64))
        results.append(scores)
    assert torch.isfinite(results[0]).any()
    torch.testing.assert_close(results[1], results[0], atol=0, rtol=0)


@pytest.mark.parametrize("change,message", [
    (dict(groups=lambda t: t[:, :1].contiguous()), "groups must have 2 columns (first query block, count), not 1"),
    (dict(groups=lambda t: t.long()), "groups must be an int32 [groups, 2] tensor, contiguous; got torch.int64"),
    (dict(block_table=lambda t: t.t().contiguous().t()), "block_table must be an int32 [requests, pages] tensor with "
                                                         "contiguous rows; got torch.int32 of shape (2, 22) with "
                                                         "strides (1, 2)"),
    (dict(seq_lens=lambda t: t.long()), "seq_lens must be an int32 [requests] tensor"),
    (dict(scores=lambda t: t.half()), "scores must be a float32 [query blocks, heads, n] buffer with contiguous rows; "
                                      "got torch.float16"),
    (dict(pooled=lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)),
     "pooled must be a float32 [query blocks, heads, n] buffer with contiguous rows; got torch.float32 of shape "
     "(8, 8, 64) with strides (512, 1, 8)"),
], ids=["groups-1-column", "groups-int64", "block-table-columns", "seq-lens-int64", "scores-fp16", "pooled-strided"])
def test_scoring_refuses_inputs_the_kernels_would_misread(change, message):
    batch = make_paged_batch([300, 77], [40, 129], 8, 2, 64, 16, torch.float32)
    qblocks = query_blocks_of(batch, 4, BLOCK)
    inputs = dict(block_table=batch.block_table, seq_lens=batch.seq_lens, qblocks=qblocks.table,
                  groups=qblocks.score_groups,
                  scores=torch.full((qblocks.num_blocks, 8, qblocks.num_kv_blocks), float("-inf")),
                  pooled=torch.full((qblocks.num_blocks, 8, 64), float("nan")))
    inputs = {name: change.get(name, lambda t: t)(t) for name, t in inputs.items()}
    with pytest.raises(ValueError) as refused:
        block_scores(batch.q, batch.k_cache, **inputs, scale=0.125, sparse_block=BLOCK)
    assert str(refused.value).startswith(message)
    assert inputs["pooled"].isnan().all(), "nothing launched"
