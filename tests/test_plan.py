"""plan.py: query blocks (the kernels' unit of work) and their score groups from host metadata."""

import torch

from vllm_flashprefill.config import FlashPrefillConfig
from vllm_flashprefill.kernels.common import QB_COLUMNS, QB_FIRST_POS, QB_FIRST_ROW, QB_REQUEST, QB_ROWS
from vllm_flashprefill.plan import build_query_blocks

BLOCK = 64


def test_query_block_table_columns():
    """A chunk of 100 rows after 70 cached tokens (positions 70..169) and a fresh prompt of 64 rows:
    blocks cut at absolute multiples of the sparse block, a partial block where the chunk starts."""
    query_start_loc, seq_lens = torch.tensor([0, 100, 164]), torch.tensor([170, 64])
    qblocks = build_query_blocks(query_start_loc, seq_lens, [0, 1], BLOCK, "cpu")
    table = qblocks.table_cpu
    assert table.shape == (3, QB_COLUMNS)
    assert table[:, QB_REQUEST].tolist() == [0, 0, 1]
    assert table[:, QB_FIRST_ROW].tolist() == [0, 58, 100]
    assert table[:, QB_FIRST_POS].tolist() == [70, 128, 0]
    assert table[:, QB_ROWS].tolist() == [58, 42, 64]
    assert torch.equal(qblocks.table, torch.from_numpy(table))
    assert qblocks.block_index.tolist() == [1, 2, 0] and qblocks.last_block.tolist() == [2, 2, 0]
    assert qblocks.num_kv_blocks == 3 and qblocks.causal_pairs == 2 + 3 + 1


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
