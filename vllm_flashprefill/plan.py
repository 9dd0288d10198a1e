"""Query blocks: the sparse kernels' unit of work, built on the host from vLLM's CPU-side metadata.

Blocks are aligned to absolute positions (block k covers positions [k*B, (k+1)*B)), not to the
chunk, so a prompt is cut the same way whatever its chunking or cached prefix; a chunk that starts
or ends inside a block contributes the part of the block it holds.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np
import torch

from .config import FlashPrefillConfig
from .kernels.common import QB_COLUMNS, QB_FIRST_POS, QB_FIRST_ROW, QB_REQUEST, QB_ROWS
from .patterns import content_selectable


@dataclasses.dataclass
class QueryBlocks:
    # The query-block table [n, QB_COLUMNS] int32 on the device (columns: kernels/common.py).
    table: torch.Tensor
    # Same, on the host.
    table_cpu: np.ndarray
    # [n] absolute block index of each query block (device).
    block_index: torch.Tensor
    # [n] absolute block index of the last block of the chunk each query block belongs to (device).
    last_block: torch.Tensor
    # [g, 2] int32 (first query block, count): runs of one request's query blocks for the scoring
    # kernel (with a dynamic config, only blocks where content selection can add a block).
    score_groups: torch.Tensor
    # KV blocks the longest request spans (the width of block masks and lists).
    num_kv_blocks: int
    sparse_block: int

    @property
    def num_blocks(self) -> int:
        return self.table_cpu.shape[0]

    @functools.cached_property
    def causal_pairs(self) -> int:
        """(query block, KV block) pairs a dense pass visits: block i sees blocks 0..i (computed
        once per step; every sparse layer records it)."""
        return int((self.table_cpu[:, QB_FIRST_POS] // self.sparse_block + 1).sum())


def build_query_blocks(
    query_start_loc_cpu: torch.Tensor | np.ndarray,
    seq_lens_cpu: torch.Tensor | np.ndarray,
    requests: Sequence[int],
    sparse_block: int,
    device: torch.device | str,
    blocks_per_score_group: int = 16,
    cfg: FlashPrefillConfig | None = None,
) -> QueryBlocks:
    """``cfg``: the config whose dynamic selection the score groups serve (None: every block)."""
    if cfg is not None and cfg.sparse_block != sparse_block:
        raise ValueError(f"sparse_block {sparse_block} differs from the config's {cfg.sparse_block}")
    qsl = np.asarray(query_start_loc_cpu, dtype=np.int64)
    seq_lens = np.asarray(seq_lens_cpu, dtype=np.int64)
    rows, groups = [], []
    num_kv_blocks = 0
    for r in requests:
        q_start, q_len, seq_len = qsl[r], qsl[r + 1] - qsl[r], seq_lens[r]
        if q_len <= 0:
            continue
        context = seq_len - q_len
        first_block, last_block = context // sparse_block, (seq_len - 1) // sparse_block
        starts = np.maximum(np.arange(first_block, last_block + 1) * sparse_block, context)
        ends = np.minimum(np.arange(first_block + 1, last_block + 2) * sparse_block, seq_len)
        base = sum(len(x) for x in rows)
        blocks = np.empty((len(starts), QB_COLUMNS), dtype=np.int64)
        blocks[:, QB_REQUEST] = r
        blocks[:, QB_FIRST_ROW] = q_start + starts - context
        blocks[:, QB_FIRST_POS] = starts
        blocks[:, QB_ROWS] = ends - starts
        rows.append(blocks)
        scored = np.ones(len(starts), dtype=bool)
        if cfg is not None:
            scored = content_selectable(np.arange(first_block, last_block + 1), last_block, cfg)
        scored_blocks = np.flatnonzero(scored)
        for run in np.split(scored_blocks, np.flatnonzero(np.diff(scored_blocks) != 1) + 1):
            for g in range(0, len(run), blocks_per_score_group):
                groups.append((base + run[g], min(blocks_per_score_group, len(run) - g)))
        num_kv_blocks = max(num_kv_blocks, int(last_block) + 1)
    table_cpu = np.concatenate(rows).astype(np.int32) if rows else np.zeros((0, QB_COLUMNS), np.int32)
    groups_cpu = np.asarray(groups, dtype=np.int32).reshape(-1, 2)
    table = torch.from_numpy(table_cpu).to(device, non_blocking=True)
    last_block_cpu = ((seq_lens[table_cpu[:, QB_REQUEST]] - 1) // sparse_block).astype(np.int32)
    return QueryBlocks(
        table=table,
        table_cpu=table_cpu,
        block_index=table.select(1, QB_FIRST_POS) // sparse_block,
        last_block=torch.from_numpy(last_block_cpu).to(device, non_blocking=True),
        score_groups=torch.from_numpy(groups_cpu).to(device, non_blocking=True),
        num_kv_blocks=num_kv_blocks,
        sparse_block=sparse_block,
    )
