"""plan.py: query blocks (the kernels' unit of work) and their score groups from host metadata."""

import numpy as np
import pytest
import torch

from vllm_flashprefill.config import FlashPrefillConfig
from vllm_flashprefill.kernels.common import QB_COLUMNS, QB_FIRST_POS, QB_FIRST_ROW, QB_REQUEST, QB_ROWS
from vllm_flashprefill.patterns import forced_block_mask
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
    assert qblocks.block_index.tolist() == [1, 2, 0] and qblocks.tail_end.tolist() == [2, 2, 0]
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


def test_the_dense_tail_ends_where_the_prompt_does():
    """With the prefill lengths the runner publishes, a chunk that stops short of its prompt's end
    gets no dense tail (its blocks are scored instead), and one that reaches it keeps the tail."""
    cfg = FlashPrefillConfig(pattern="dynamic", sparse_block=BLOCK, sink_blocks=1, local_blocks=2,
                             min_seq_len=5 * BLOCK, dense_tail_blocks=2)
    # Request 0: blocks 0..12 of a 20-block prompt; request 1: the last chunk (blocks 6..9) of its
    # prompt, which the runner samples from (0); request 2: a chunk ending at block 9 of a prompt
    # that ends in block 10, so the tail of 2 blocks reaches back into this chunk.
    query_start_loc = torch.tensor([0, 13 * BLOCK, 17 * BLOCK, 20 * BLOCK])
    seq_lens = torch.tensor([13 * BLOCK, 10 * BLOCK, 10 * BLOCK])
    prefill_lens = np.array([20 * BLOCK - 5, 0, 10 * BLOCK + 1])
    known = build_query_blocks(query_start_loc, seq_lens, [0, 1, 2], BLOCK, "cpu", 16, cfg, prefill_lens)
    unknown = build_query_blocks(query_start_loc, seq_lens, [0, 1, 2], BLOCK, "cpu", 16, cfg)
    assert known.tail_end.tolist() == [19] * 13 + [9] * 4 + [10] * 3
    assert unknown.tail_end.tolist() == [12] * 13 + [9] * 4 + [9] * 3

    def scored(qblocks):
        block_index = qblocks.block_index.tolist()
        return [[block_index[first + i] for i in range(count)] for first, count in qblocks.score_groups.tolist()]

    assert scored(known) == [list(range(5, 13)), [6, 7], [7, 8]]
    assert scored(unknown) == [list(range(5, 11)), [6, 7], [7]]
    forced = forced_block_mask(known.block_index, known.tail_end, known.num_kv_blocks, cfg)[:, 0]
    dense = [int(b) for b, row in zip(known.block_index, forced) if b >= 5 and row[: b + 1].all()]
    assert dense == [8, 9, 9]  # request 1's tail, and request 2's block 9 (the prompt's tail: 9, 10)


@pytest.mark.parametrize("chunk, per_chunk_tails", [(2048, 1.112), (8192, 0.264)])
def test_a_chunked_prompt_keeps_the_blocks_of_one_chunk_once_its_end_is_known(chunk, per_chunk_tails):
    """hybrid with the package defaults, a 131K prompt in block-aligned chunks: with the prompt's
    length known (compat.prefill_lens) the chunks keep exactly the one-chunk blocks; with a dense
    tail on every chunk they keep this much more attention work (the counts in docs/design.md)."""
    cfg = FlashPrefillConfig(pattern="hybrid")
    length = 131072

    def forced(start, end, prompt_length):
        qblocks = build_query_blocks(np.array([0, end - start]), np.array([end]), [0], cfg.sparse_block, "cpu",
                                     prefill_lens=np.array([prompt_length]))
        return forced_block_mask(qblocks.block_index, qblocks.tail_end, length // cfg.sparse_block, cfg)

    whole = forced(0, length, 0)
    known = torch.cat([forced(s, s + chunk, length) for s in range(0, length, chunk)])
    per_chunk = sum(int(forced(s, s + chunk, 0).sum()) for s in range(0, length, chunk))
    assert torch.equal(known, whole)
    assert per_chunk / int(whole.sum()) - 1 == pytest.approx(per_chunk_tails, abs=0.001)
