"""patterns.py: the patterns, the blocks each one forces, and dynamic selection's torch definition."""

import pytest
import torch

from vllm_flashprefill.config import PATTERNS, FlashPrefillConfig
from vllm_flashprefill.patterns import forced_block_mask, pattern_named, select_dynamic

BLOCK = 64


def test_every_pattern_option_names_a_pattern():
    assert [pattern_named(name).name for name in PATTERNS] == list(PATTERNS)
    keeps = {name: (p.keeps_all, p.keeps_local, p.keeps_strided, p.scores_content)
             for name, p in ((name, pattern_named(name)) for name in PATTERNS)}
    assert keeps == {
        "dense": (True, False, False, False),
        "local": (False, True, False, False),
        "strided": (False, False, True, False),
        "hybrid": (False, True, True, False),
        "dynamic": (False, True, True, True),
    }
    assert FlashPrefillConfig(pattern="hybrid").block_pattern is pattern_named("hybrid")
    assert str(pattern_named("dynamic")) == "dynamic"


@pytest.mark.parametrize("pattern", ["local", "strided", "hybrid", "dynamic"])
@pytest.mark.parametrize("prompt_end_known", [False, True])
def test_forced_blocks(pattern, prompt_end_known):
    cfg = FlashPrefillConfig(
        pattern=pattern, sparse_block=BLOCK, sink_blocks=2, local_blocks=2, stride=4,
        min_seq_len=5 * BLOCK, dense_tail_blocks=2,
    )
    block_index = torch.arange(20)
    # A prompt of blocks 0..19 in two chunks, 0..11 and 12..19. Where the prompt's end is known
    # only its last two blocks are its tail; else each chunk ends in one (10, 11 and 18, 19).
    tail_end = torch.full_like(block_index, 19) if prompt_end_known else torch.where(block_index < 12, 11, 19)
    tail = (18, 19) if prompt_end_known else (10, 11, 18, 19)
    mask = forced_block_mask(block_index, tail_end, 20, cfg)[:, 0]
    for qb in range(20):
        if qb < 5 or qb in tail:  # below min_seq_len, or in a dense tail
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
    base = dict(pattern="dynamic", sparse_block=BLOCK, sink_blocks=1, local_blocks=0, min_seq_len=0,
                dense_tail_blocks=0, above_mean=0.0)
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


@pytest.mark.parametrize("pattern", ["dense", "local", "strided", "hybrid", "dynamic"])
def test_forced_blocks_keep_each_diagonal_and_nothing_past_it(pattern):
    """What the kernels assume of every list (its last block is the diagonal), which plans do not
    check per step (it would read the mask back from the GPU): every pattern's forced mask keeps it
    by construction, for any options and chunk."""
    from vllm_flashprefill.block_lists import check_diagonals

    gen = torch.Generator().manual_seed(len(pattern))
    for _ in range(20):
        sink, local, stride, tail = torch.randint(0, 4, (4,), generator=gen).tolist()
        cfg = FlashPrefillConfig(pattern=pattern, sparse_block=BLOCK, sink_blocks=sink, local_blocks=local,
                                 stride=stride or (0 if pattern in ("dynamic", "local") else 1),
                                 dense_tail_blocks=tail,
                                 min_seq_len=int(torch.randint(0, 8, (), generator=gen)) * BLOCK)
        last = int(torch.randint(0, 40, (), generator=gen))
        block_index = torch.arange(int(torch.randint(0, last + 1, (), generator=gen)), last + 1)
        check_diagonals(forced_block_mask(block_index, last, last + 1 + int(stride), cfg), block_index)
