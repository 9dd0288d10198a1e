"""kernels/selection.py, the fused dynamic selection, against the torch definition
(``patterns.select_dynamic`` + ``BlockLists.from_mask``), in Triton's interpreter on CPU."""

import dataclasses

import pytest
import torch

from vllm_flashprefill.block_lists import BlockLists
from vllm_flashprefill.config import FlashPrefillConfig
from vllm_flashprefill.patterns import content_selectable, forced_block_mask, select_dynamic, select_dynamic_lists

BLOCK = 64

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


def select_both(scores, block_index, num_kv_heads, cfg):
    """(torch selection, the kernel's lists as a mask) of one request's query blocks ``block_index``
    (the chunk ends in the last of them), over scores [n, Hq, nkb]."""
    last = int(block_index.max())
    table = torch.zeros(len(block_index), 4, dtype=torch.int32)
    table[:, 2] = block_index.int() * BLOCK
    seq_lens = torch.tensor([(last + 1) * BLOCK], dtype=torch.int32)
    nkb = scores.shape[-1]
    indices, counts = select_dynamic_lists(scores, table, seq_lens, num_kv_heads, nkb, cfg)
    return select_dynamic(scores, block_index, last, num_kv_heads, cfg), BlockLists(indices, counts).to_mask(nkb)


@pytest.mark.parametrize("gqa", [2, 4, 7])
def test_max_budget_caps_content_selection_whatever_the_gqa_group(gqa):
    """Each query head's own best block scores 0 relative to that head's maximum: with every head
    of a GQA group peaking at another block, max_budget 1 used to keep one block per head. It keeps
    one block per query block and KV head, the later of the tied ones."""
    num_kv_heads, nkb = 2, 12
    block_index = torch.tensor([11, 10])
    cfg = FlashPrefillConfig(pattern="dynamic", sparse_block=BLOCK, sink_blocks=1, local_blocks=1, stride=0,
                             min_seq_len=0, dense_tail_blocks=0, threshold=0.5, above_mean=0.0, max_budget=1)
    scores = torch.full((2, gqa * num_kv_heads, nkb), -4.0)
    for head in range(gqa * num_kv_heads):
        scores[:, head, 1 + head % gqa] = 0.0  # head g of each group peaks at block 1 + g
    forced = forced_block_mask(block_index, 11, nkb, cfg)
    uncapped = select_dynamic(scores, block_index, 11, num_kv_heads, dataclasses.replace(cfg, max_budget=0))
    assert ((uncapped & ~forced).sum(-1) == gqa).all()
    capped, fused = select_both(scores, block_index, num_kv_heads, cfg)
    assert torch.equal(capped & ~forced, (torch.arange(nkb) == gqa).expand(2, num_kv_heads, nkb))
    assert torch.equal(fused, capped)


@pytest.mark.parametrize("gqa,min_budget,max_budget",
                         [(1, 0, 2), (2, 1, 1), (3, 2, 2), (4, 2, 3), (7, 0, 1), (7, 3, 5)])
def test_budgets_keep_exact_counts_on_tied_scores(gqa, min_budget, max_budget):
    """Scores of three values tie everywhere: content selection still adds at least min_budget
    blocks (where the row has that many candidates) and at most max_budget, the kernel the same
    blocks as the torch selection."""
    num_kv_heads, nkb = 2, 20
    gen = torch.Generator().manual_seed(gqa * 100 + max_budget)
    block_index = torch.tensor([19, 18, 16, 13, 9, 6, 4])
    scores = torch.randint(-2, 1, (len(block_index), gqa * num_kv_heads, nkb), generator=gen).float()
    for threshold, above_mean in ((0.0, 0.0), (0.3, 0.0), (1.0, 0.0), (0.1, 1.2)):
        cfg = FlashPrefillConfig(pattern="dynamic", sparse_block=BLOCK, sink_blocks=1, local_blocks=1, stride=0,
                                 min_seq_len=0, dense_tail_blocks=0, threshold=threshold, above_mean=above_mean,
                                 min_budget=min_budget, max_budget=max_budget)
        forced = forced_block_mask(block_index, 19, nkb, cfg)
        candidates = ((torch.arange(nkb) <= block_index[:, None, None]) & ~forced).sum(-1)
        ref, fused = select_both(scores, block_index, num_kv_heads, cfg)
        content = (ref & ~forced).sum(-1)
        assert (content <= max_budget).all() and (content >= candidates.clamp(max=min_budget)).all()
        assert torch.equal(fused, ref), (threshold, above_mean)
