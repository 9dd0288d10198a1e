"""The Triton kernels against the PyTorch references (Triton's interpreter on CPU, fp16/fp32)."""

import pytest
import torch

from tests.paged import make_paged_batch
from vllm_flashprefill.block_lists import BlockLists
from vllm_flashprefill.config import FlashPrefillConfig
from vllm_flashprefill.kernels.attention import launch_config, sparse_prefill_attention, tma_supported
from vllm_flashprefill.kernels.reference import (
    block_scores_reference,
    sparse_attention_reference,
)
from vllm_flashprefill.kernels.scoring import block_scores, blocks_per_group, pool_queries
from vllm_flashprefill.patterns import (
    content_selectable,
    forced_block_mask,
    select_dynamic,
    select_dynamic_lists,
)
from vllm_flashprefill.plan import build_query_blocks

BLOCK = 64


def plan(batch, gqa):
    return build_query_blocks(
        batch.query_start_loc, batch.seq_lens, range(len(batch.query_lens)), BLOCK, "cpu",
        blocks_per_group(gqa),
    )


def run_sparse(batch, qblocks, mask, scale):
    indices, counts = BlockLists.from_mask(mask)
    out = torch.full_like(batch.q, float("nan"))
    sparse_prefill_attention(
        batch.q, batch.k_cache, batch.v_cache, out, batch.block_table, batch.seq_lens,
        qblocks.table, indices, counts, scale, BLOCK,
    )
    return out


def dynamic_mask(batch, qblocks, cfg, scale):
    heads, head_size = batch.q.shape[1], batch.q.shape[2]
    scores = torch.full((qblocks.num_blocks, heads, qblocks.num_kv_blocks), float("-inf"))
    pooled = torch.empty(qblocks.num_blocks, heads, head_size)
    block_scores(
        batch.q, batch.k_cache, batch.block_table, batch.seq_lens, qblocks.table,
        qblocks.score_groups, scores, pooled, scale, BLOCK,
    )
    return scores, select_dynamic(
        scores, qblocks.block_index, qblocks.last_block, batch.k_cache.shape[2], cfg
    )


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
    qblocks = plan(batch, hq // hkv)
    if pattern == "dynamic":
        _, mask = dynamic_mask(batch, qblocks, cfg, scale)
    else:
        mask = forced_block_mask(qblocks.block_index, qblocks.last_block, qblocks.num_kv_blocks, cfg)
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
    qblocks = plan(batch, 4)
    cfg = FlashPrefillConfig(
        pattern="hybrid", sparse_block=BLOCK, local_blocks=1, stride=2, min_seq_len=0, dense_tail_blocks=0
    )
    indices, counts = BlockLists.from_mask(
        forced_block_mask(qblocks.block_index, qblocks.last_block, qblocks.num_kv_blocks, cfg)
    )
    tma = launch_config(head_size, 4, BLOCK, page_size=64, tma=tma_supported(batch.q.device))
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
    qblocks = plan(batch, 1)
    cfg = FlashPrefillConfig(
        pattern="local", sparse_block=BLOCK, sink_blocks=1, local_blocks=1, min_seq_len=0,
        dense_tail_blocks=1,
    )
    qb, last = qblocks.block_index, qblocks.last_block
    mask = forced_block_mask(qb, last, qblocks.num_kv_blocks, cfg)
    dense = forced_block_mask(qb, last, qblocks.num_kv_blocks, FlashPrefillConfig(pattern="dense", sparse_block=BLOCK))
    assert mask.sum() < dense.sum()
    out = run_sparse(batch, qblocks, mask, 0.125)
    out_dense = run_sparse(batch, qblocks, dense, 0.125)
    tail = 640 - BLOCK  # the chunk's last block is its dense tail; the block before it is sparse
    assert not torch.allclose(out[tail - BLOCK:tail], out_dense[tail - BLOCK:tail], atol=1e-3)
    torch.testing.assert_close(out[tail:], out_dense[tail:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("page_size", [16, 64])  # 64: key tiles are TMA copies
def test_block_scores_match_reference_and_give_same_selection(page_size):
    batch = make_paged_batch([300, 77], [40, 129], 8, 2, 64, page_size, torch.float32)
    qblocks = plan(batch, 4)
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
    ref_mask = select_dynamic(ref_scores, qblocks.block_index, qblocks.last_block, 2, cfg)
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
    qblocks = plan(batch, 4)
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
    qblocks = plan(batch, 2)
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
    qblocks = plan(batch, 2)
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
    qb_whole = plan(whole, 2)
    _, mask_whole = dynamic_mask(whole, qb_whole, cfg, 0.125)
    # Second chunk: the last 192 query rows, the first 320 tokens already in the cache.
    tail = make_paged_batch([192], [320], 4, 2, 64, 16, torch.float32, seed=3)
    tail.kv_cache.copy_(whole.kv_cache)
    tail.block_table.copy_(whole.block_table)
    tail.q.copy_(whole.q[320:])
    qb_tail = plan(tail, 2)
    _, mask_tail = dynamic_mask(tail, qb_tail, cfg, 0.125)
    assert torch.equal(mask_tail, mask_whole[-3:])
    assert 0 < mask_tail.sum() < 2 * (6 + 7 + 8), "a selection that keeps every block shows nothing"


@pytest.mark.parametrize("pattern", ["local", "strided", "hybrid", "dynamic"])
def test_forced_blocks(pattern):
    cfg = FlashPrefillConfig(
        pattern=pattern, sparse_block=BLOCK, sink_blocks=2, local_blocks=2, stride=4,
        min_seq_len=5 * BLOCK, dense_tail_blocks=2,
    )
    block_index = torch.arange(20)
    # Two chunks: blocks 0..11 (its tail: 10, 11) and 12..19 (tail: 18, 19).
    last_block = torch.where(block_index < 12, 11, 19)
    mask = forced_block_mask(block_index, last_block, 20, cfg)[:, 0]
    for qb in range(20):
        if qb < 5 or qb in (10, 11, 18, 19):  # below min_seq_len, or a chunk's tail: dense
            expected = set(range(qb + 1))
        else:
            expected = {0, 1, qb}  # sinks and the diagonal
            if pattern != "strided":
                expected |= set(range(qb - 2, qb))  # the local window
            if pattern != "local":
                expected |= set(range(qb % 4, qb + 1, 4))  # every 4th block back from the diagonal
        assert set(torch.nonzero(mask[qb]).flatten().tolist()) == expected, (pattern, qb)


def test_budgets_bound_content_selection():
    scores = torch.randn(6, 2, 10)
    block_index = torch.arange(4, 10)
    base = dict(pattern="dynamic", sparse_block=BLOCK, sink_blocks=1, local_blocks=0, min_seq_len=0, dense_tail_blocks=0,
                above_mean=0.0)
    forced = forced_block_mask(block_index, 9, 10, FlashPrefillConfig(**base))
    free = select_dynamic(scores, block_index, 9, 1, FlashPrefillConfig(**base, threshold=0.0))
    capped = select_dynamic(scores, block_index, 9, 1, FlashPrefillConfig(**base, threshold=0.0, max_budget=2))
    assert ((capped & ~forced).sum(-1) <= 2).all()
    assert (capped <= free).all()
    atleast = select_dynamic(scores, block_index, 9, 1, FlashPrefillConfig(**base, threshold=1.0, min_budget=3))
    candidates = (free & ~forced).sum(-1)
    assert torch.equal((atleast & ~forced).sum(-1), candidates.clamp(max=3))


def test_above_mean_adds_nothing_on_flat_scores_and_keeps_what_stands_out():
    """Scores within a few percent of each other pass any threshold; above_mean keeps only a
    block that stands out from the other candidates, per query head (a block that is near the
    max in one head of a GQA group and above the mean only in another is not kept)."""
    nkb, block_index = 12, torch.tensor([11, 11])
    base = dict(pattern="dynamic", sparse_block=BLOCK, sink_blocks=1, local_blocks=1, stride=0, min_seq_len=0,
                dense_tail_blocks=0, threshold=0.1)
    forced = forced_block_mask(block_index, 11, nkb, FlashPrefillConfig(**base))[:, 0]
    flat = torch.rand(2, 2, nkb, generator=torch.Generator().manual_seed(0)) * 0.05
    without = select_dynamic(flat, block_index, 11, 1, FlashPrefillConfig(**base, above_mean=0.0))[:, 0]
    assert torch.equal(without, torch.ones_like(without)), "flat scores pass the threshold everywhere"
    gated = select_dynamic(flat, block_index, 11, 1, FlashPrefillConfig(**base, above_mean=2.0))[:, 0]
    assert torch.equal(gated, forced), "nothing stands out: the forced blocks alone"

    peaked = flat.clone()
    peaked[0, 0, 5] = 3.0  # row 0, head 0: block 5 stands out (and is the row max)
    # Row 1, block 3: in head 0 it is 2.2x the candidates' mean but e^-7 of the row max (the sink
    # block's 8.0); in head 1 it is the row max but only 1.5x the mean. Neither head passes both.
    peaked[1, 0, 0] = 8.0
    peaked[1, 0, 3] = 1.0
    peaked[1, 1, 3] = 0.5
    gated = select_dynamic(peaked, block_index, 11, 1, FlashPrefillConfig(**base, above_mean=2.0))[:, 0]
    assert torch.equal(gated[0], forced[0] | (torch.arange(nkb) == 5))
    assert torch.equal(gated[1], forced[1])
    kept_by_mean_alone = select_dynamic(peaked, block_index, 11, 1, FlashPrefillConfig(
        **{**base, "threshold": 0.0}, above_mean=1.5))[:, 0]
    assert kept_by_mean_alone[1, 3], "without the threshold, head 0 keeps block 3"


def test_score_groups_cover_only_blocks_content_selection_can_add_to():
    """Query blocks that keep every causal block anyway (below min_seq_len, in a chunk's dense
    tail, or within sink + local of the start) get no scores; the rest are cut into runs of one
    request of at most blocks_per_score_group."""
    cfg = FlashPrefillConfig(pattern="dynamic", sparse_block=BLOCK, sink_blocks=1, local_blocks=2,
                             min_seq_len=5 * BLOCK, dense_tail_blocks=1)
    # Request 0: blocks 0..12 in one chunk; request 1: a chunk of blocks 6..9 after a cached prefix.
    query_start_loc = torch.tensor([0, 13 * BLOCK, 17 * BLOCK])
    seq_lens = torch.tensor([13 * BLOCK, 10 * BLOCK])
    qblocks = build_query_blocks(query_start_loc, seq_lens, [0, 1], BLOCK, "cpu", 3, cfg)
    block_index = qblocks.block_index.tolist()
    groups = [[block_index[first + i] for i in range(count)] for first, count in qblocks.score_groups.tolist()]
    assert groups == [[5, 6, 7], [8, 9, 10], [11], [6, 7, 8]]
    every = build_query_blocks(query_start_loc, seq_lens, [0, 1], BLOCK, "cpu", 3)
    assert every.score_groups.tolist() == [[0, 3], [3, 3], [6, 3], [9, 3], [12, 1], [13, 3], [16, 1]]


# (GQA group, options over dynamic defaults)
SELECTION_CASES = [
    (1, dict(threshold=0.1)),
    (4, dict(threshold=0.5, sink_blocks=2, local_blocks=3)),
    (7, dict(threshold=0.0, local_blocks=0, max_budget=3)),
    (4, dict(threshold=1.0, local_blocks=1, min_budget=4)),
    (1, dict(threshold=0.3, min_budget=2, max_budget=5, min_seq_len=6 * BLOCK)),
    (7, dict(threshold=0.2, max_budget=40)),  # budget above the row length: no cap
    (4, dict(threshold=0.5, dense_tail_blocks=2)),
    (1, dict(threshold=0.1, dense_tail_blocks=1, min_seq_len=4 * BLOCK, max_budget=2)),
    (4, dict(threshold=0.3, stride=3, max_budget=4)),
    (1, dict(threshold=1.0, min_budget=100)),  # more than the padded row holds: keep every block
    (4, dict(threshold=0.0, above_mean=0.0)),  # threshold and mean tests off: every candidate
    (4, dict(threshold=0.2, above_mean=1.2, max_budget=3)),
    (7, dict(threshold=0.01, above_mean=8.0, min_budget=1)),
]


@pytest.mark.parametrize("case", range(len(SELECTION_CASES)))
def test_fused_selection_matches_torch_selection(case):
    gqa, options = SELECTION_CASES[case]
    defaults = dict(pattern="dynamic", sparse_block=BLOCK, sink_blocks=1, local_blocks=2, stride=0,
                    min_seq_len=0, dense_tail_blocks=0)
    cfg = FlashPrefillConfig(**{**defaults, **options})
    num_kv_heads, nkb, width = 2, 23, 37  # a workspace wider than the step's rows
    gen = torch.Generator().manual_seed(case)
    block_index = torch.tensor([0, 1, 3, 7, 8, 12, 15, 22, 22, 5])
    # Three requests whose chunks end in blocks 22, 22 and 5 (the last four sit in chunks' tails).
    request = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 1, 2])
    seq_lens = torch.tensor([22 * BLOCK + 100, 22 * BLOCK + 1, 6 * BLOCK], dtype=torch.int32)
    table = torch.zeros(len(block_index), 4, dtype=torch.int32)
    table[:, 0] = request.int()
    table[:, 2] = (block_index * BLOCK + torch.randint(0, BLOCK, (len(block_index),), generator=gen)).int()
    scores = torch.randn(len(block_index), gqa * num_kv_heads, width, generator=gen) * 3
    scores[..., :nkb][scores[..., :nkb] > 4] = 4.0  # ties at the top of a row
    for i, qb in enumerate(block_index.tolist()):
        scores[i, :, qb + 1:] = float("nan")  # stale workspace entries past the diagonal
    last_block = (seq_lens[request] - 1) // BLOCK
    # Query blocks where content selection cannot add a block are not scored: stale rows.
    scores[~content_selectable(block_index, last_block, cfg)] = float("nan")
    ref = select_dynamic(scores[..., :nkb], block_index, last_block, num_kv_heads, cfg)
    indices, counts = select_dynamic_lists(scores, table, seq_lens, num_kv_heads, nkb, cfg)
    assert torch.equal(counts, ref.sum(-1, dtype=torch.int32))
    assert torch.equal(BlockLists(indices, counts).to_mask(nkb), ref)
    for i in range(len(block_index)):
        for h in range(num_kv_heads):
            listed = indices[i, h, : counts[i, h]].tolist()
            assert listed == sorted(listed) and listed[-1] == block_index[i]


def test_lists_round_trip():
    mask = torch.rand(5, 3, 17) > 0.6
    mask[..., 0] = True
    indices, counts = BlockLists.from_mask(mask)
    assert torch.equal(BlockLists(indices, counts).to_mask(17), mask)
    for i in range(5):
        for h in range(3):
            listed = indices[i, h, : counts[i, h]].tolist()
            assert listed == sorted(listed) == mask[i, h].nonzero().flatten().tolist()
