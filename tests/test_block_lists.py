"""block_lists.py: BlockLists, the kernels' form of a block mask."""

import pytest
import torch

from vllm_flashprefill.block_lists import BlockLists


def test_lists_round_trip():
    mask = torch.rand(5, 3, 17) > 0.6
    mask[..., 0] = True
    indices, counts = BlockLists.from_mask(mask)
    assert torch.equal(BlockLists(indices, counts).to_mask(17), mask)
    for i in range(5):
        for h in range(3):
            listed = indices[i, h, : counts[i, h]].tolist()
            assert listed == sorted(listed) == mask[i, h].nonzero().flatten().tolist()


def test_density_counts_listed_blocks_over_causal_blocks():
    """Query blocks 0..3 of a local pattern (diagonal + one block before): 1 + 2 + 2 + 2 of the
    1 + 2 + 3 + 4 causal blocks; per head lists count head by head."""
    qb, kb = torch.arange(4)[:, None], torch.arange(4)[None, :]
    local = ((kb <= qb) & (kb >= qb - 1))[:, None, :]
    assert BlockLists.from_mask(local).density() == 7 / 10
    causal = (kb <= qb)[:, None, :]
    assert BlockLists.from_mask(torch.cat([local, causal], 1)).density() == (7 + 10) / 20
    assert BlockLists.from_mask(torch.zeros(0, 1, 4, dtype=torch.bool)).density() == 0.0


def test_lists_unpack_and_print_what_they_hold():
    mask = torch.tensor([[[True, False, False]], [[True, True, False]], [[False, True, True]]])
    lists = BlockLists.from_mask(mask)
    indices, counts = lists
    assert counts.tolist() == [[1], [2], [2]] and (lists.num_query_blocks, lists.num_heads) == (3, 1)
    assert repr(lists) == "BlockLists(3 query blocks x 1 heads, width 3, 5 blocks kept, density 0.833)"
    assert str(lists).splitlines()[1:] == ["  query block 0: [0]", "  query block 1: [0, 1]",
                                           "  query block 2: [1, 2]"]


def test_a_mask_whose_rows_lose_their_diagonal_or_reach_past_it_is_refused():
    """Given each query block's own block, from_mask checks that every row keeps it and nothing
    past it: the kernels take a list's last block for the diagonal, so before, a list without it
    silently lost the block (and one past it attended to the future)."""
    qb, kb = torch.arange(4)[:, None], torch.arange(4)[None, :]
    causal = (kb <= qb)[:, None, :].expand(4, 2, 4).clone()
    diagonal = torch.arange(4)
    assert torch.equal(BlockLists.from_mask(causal, diagonal).counts, causal.sum(-1, dtype=torch.int32))
    lost = causal.clone()
    lost[2, 1, 2] = False
    with pytest.raises(ValueError) as refused:
        BlockLists.from_mask(lost, diagonal)
    assert str(refused.value) == ("block mask row of query block 2, head 1 does not keep its diagonal block 2 (kept: "
                                  "[0, 1]); the kernels take a list's last block for the diagonal")
    future = causal.clone()
    future[1, 0, 3] = True
    with pytest.raises(ValueError, match=r"query block 1, head 0 keeps blocks past its diagonal block 1 \(kept: "
                                         r"\[0, 1, 3\]\)"):
        BlockLists.from_mask(future, diagonal)
    with pytest.raises(ValueError, match=r"diagonal blocks \[0, 1, 2, 4\] must give each of the 4 query blocks a "
                                         r"block in \[0, 4\)"):
        BlockLists.from_mask(causal, torch.tensor([0, 1, 2, 4]))
