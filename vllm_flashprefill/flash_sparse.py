"""Static sparse patterns on vLLM's FlashAttention 3 (``sparse_kernel: flash_attn``).

FA3 reads keys through a block table and aligns its causal mask to the end of each sequence. So
each query block becomes one FA3 sequence whose block table lists only the KV pages of its
selected blocks, in ascending order, the diagonal block last and cut after the query block's last
row: every listed key before the diagonal block is in the past of every row, and FA3's
bottom-right causal mask removes exactly the diagonal block's future keys. Static patterns select
the same blocks for every head, so one call covers all heads of a run of consecutive sparse
requests (``benchmarks/experiments/fa3_virtual_table.py`` measures this against the Triton kernel).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import torch


@dataclasses.dataclass
class FlashSparseRun:
    """Consecutive sparse requests, one FA3 call: rows [token_start, token_end) of the batch."""

    token_start: int
    token_end: int
    cu_seqlens_q: torch.Tensor  # [n + 1] int32, rows of each query block, from token_start
    max_seqlen_q: int
    max_seqlen_k: int
    block_tables: torch.Tensor  # [n, pages] int32: the pages of each query block's KV blocks
    seqused_k: torch.Tensor  # [n] int32: the keys each query block attends to


def plan_runs(
    qblocks_cpu: np.ndarray,
    block_table: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    sparse_block: int,
    page_size: int,
) -> list[FlashSparseRun]:
    """One run per stretch of query blocks whose rows follow each other in the batch.

    qblocks_cpu: [n, 4] (request, first row, first position, rows) on the host; kv_indices
    [n, 1, L] and kv_counts [n, 1], shared by all heads, on the device. Only host values decide
    shapes and bounds, so nothing waits for the device.
    """
    first_row, rows = qblocks_cpu[:, 1].astype(np.int64), qblocks_cpu[:, 3].astype(np.int64)
    breaks = np.flatnonzero(first_row[1:] != first_row[:-1] + rows[:-1]) + 1
    bounds = np.concatenate([[0], breaks, [len(qblocks_cpu)]])
    tables, seqused = virtual_block_tables(
        qblocks_cpu, block_table, kv_indices, kv_counts, sparse_block, page_size
    )
    runs = []
    for lo, hi in itertools.pairwise(bounds):
        t0 = int(first_row[lo])
        cu = np.concatenate([first_row[lo:hi] - t0, [first_row[hi - 1] + rows[hi - 1] - t0]])
        last_pos = qblocks_cpu[lo:hi, 2].astype(np.int64) + rows[lo:hi] - 1
        runs.append(FlashSparseRun(
            token_start=t0,
            token_end=int(t0 + cu[-1]),
            cu_seqlens_q=torch.from_numpy(cu.astype(np.int32)).to(block_table.device, non_blocking=True),
            max_seqlen_q=int(rows[lo:hi].max()),
            max_seqlen_k=int(last_pos.max()) + 1,  # no query block lists more keys than its position
            block_tables=tables[lo:hi],
            seqused_k=seqused[lo:hi],
        ))
    return runs


def virtual_block_tables(
    qblocks_cpu: np.ndarray,
    block_table: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    sparse_block: int,
    page_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query block: the pages of its listed KV blocks ([n, L * pages per block] int32) and
    how many keys of them it attends to ([n] int32). List slots past the count are not read."""
    if sparse_block % page_size:
        raise ValueError(f"sparse block {sparse_block} is not a multiple of the page size {page_size}")
    device = block_table.device
    per_block = sparse_block // page_size
    n, _, width = kv_indices.shape
    counts = kv_counts[:, 0]
    listed = torch.arange(width, device=device)[None, :] < counts[:, None]
    blocks = torch.where(listed, kv_indices[:, 0], 0).to(torch.int64)
    pages = (blocks[:, :, None] * per_block + torch.arange(per_block, device=device)).reshape(n, -1)
    # The diagonal block's later pages may lie past the table's end: they are never read.
    pages = pages.clamp(max=block_table.shape[1] - 1)
    requests = torch.from_numpy(qblocks_cpu[:, 0].astype(np.int64)).to(device, non_blocking=True)
    tables = block_table[requests[:, None], pages]
    last_pos = qblocks_cpu[:, 2].astype(np.int64) + qblocks_cpu[:, 3] - 1
    diagonal_keys = torch.from_numpy((last_pos % sparse_block + 1).astype(np.int32))
    seqused = (counts - 1) * sparse_block + diagonal_keys.to(device, non_blocking=True)
    return tables.to(torch.int32), seqused.to(torch.int32)


def flash_sparse_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    output: torch.Tensor,
    runs: list[FlashSparseRun],
    scale: float,
) -> None:
    """Write the sparse rows of ``runs`` into ``output`` with FA3, the one FlashAttention version
    these tables are for (key_cache/value_cache: [pages, page_size, Hkv, D] views of vLLM's cache)."""
    from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func

    for run in runs:
        lo, hi = run.token_start, run.token_end
        flash_attn_varlen_func(
            q=query[lo:hi], k=key_cache, v=value_cache, out=output[lo:hi],
            cu_seqlens_q=run.cu_seqlens_q, max_seqlen_q=run.max_seqlen_q,
            seqused_k=run.seqused_k, max_seqlen_k=run.max_seqlen_k,
            softmax_scale=scale, causal=True, block_table=run.block_tables,
            fa_version=3,
        )
