"""Sparse rows on vLLM's FlashAttention 3 (``sparse_kernel: flash_attn``).

FA3 reads keys through a block table and aligns its causal mask to the end of each sequence. So
each query block becomes one FA3 sequence whose block table lists only the KV pages of its
selected blocks, in ascending order, the diagonal block last and cut after the query block's last
row: every listed key before the diagonal block is in the past of every row, and FA3's
bottom-right causal mask removes exactly the diagonal block's future keys
(``kernels/block_tables.py`` writes the tables). Static patterns select the same blocks for every
head, so one call covers all heads of a run of consecutive sparse requests; ``dynamic`` selects
per KV head, so each KV head and its query heads get their own call and tables.

vLLM is imported only when this route is asked for (``sparse_kernel: flash_attn``).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import TYPE_CHECKING

import numpy as np
import torch

from .block_lists import BlockLists
from .kernels.block_tables import sparse_block_tables
from .kernels.common import QB_FIRST_POS, QB_FIRST_ROW, QB_ROWS, canonical_strides

if TYPE_CHECKING:
    from .config import FlashPrefillConfig
    from .plan import QueryBlocks


def flash_attn_version(head_size: int) -> int | None:
    """The FlashAttention version vLLM runs for this head size (it picks one per head size)."""
    from vllm.v1.attention.backends.fa_utils import get_flash_attn_version

    return get_flash_attn_version(head_size=head_size)


def fa3_sparse_usable(cfg: FlashPrefillConfig, page_size: int | None, head_size: int) -> bool:
    """Whether FA3 can compute the sparse rows: asked for, FA3 for this head size, and KV pages
    that tile a sparse block (each block maps to whole pages in the per-query-block block tables);
    ``page_size`` None: not known yet, leave that check out."""
    return (cfg.sparse_kernel == "flash_attn" and not cfg.is_dense
            and flash_attn_version(head_size) == 3
            and (page_size is None or cfg.sparse_block % page_size == 0))


@dataclasses.dataclass
class FlashSparseRun:
    """Consecutive sparse requests, one FA3 call per table group: rows [token_start, token_end)
    of the batch, query blocks [qblock_start, qblock_end) of the step."""

    token_start: int
    token_end: int
    qblock_start: int
    qblock_end: int
    cu_seqlens_q: torch.Tensor  # [n + 1] int32, rows of each query block, from token_start
    max_seqlen_q: int
    max_seqlen_k: int


def plan_runs(qblocks_cpu: np.ndarray, device: torch.device | str) -> list[FlashSparseRun]:
    """One run per stretch of query blocks whose rows follow each other in the batch, from the
    host-side query-block table alone."""
    first_row, rows = qblocks_cpu[:, QB_FIRST_ROW].astype(np.int64), qblocks_cpu[:, QB_ROWS].astype(np.int64)
    breaks = np.flatnonzero(first_row[1:] != first_row[:-1] + rows[:-1]) + 1
    bounds = np.concatenate([[0], breaks, [len(qblocks_cpu)]])
    runs = []
    for lo, hi in itertools.pairwise(bounds):
        t0 = int(first_row[lo])
        cu = np.concatenate([first_row[lo:hi] - t0, [first_row[hi - 1] + rows[hi - 1] - t0]])
        last_pos = qblocks_cpu[lo:hi, QB_FIRST_POS].astype(np.int64) + rows[lo:hi] - 1
        runs.append(FlashSparseRun(
            token_start=t0,
            token_end=int(t0 + cu[-1]),
            qblock_start=int(lo),
            qblock_end=int(hi),
            cu_seqlens_q=torch.from_numpy(cu.astype(np.int32)).to(device, non_blocking=True),
            max_seqlen_q=int(rows[lo:hi].max()),
            max_seqlen_k=int(last_pos.max()) + 1,  # no query block lists more keys than its position
        ))
    return runs


@dataclasses.dataclass(frozen=True)
class FlashSparsePlan:
    """The FA3 calls of one step, and for a static pattern their block tables and key counts
    (``dynamic``: each layer writes its own into the caller's buffers)."""

    runs: list[FlashSparseRun]
    tables: torch.Tensor | None = None
    seqused: torch.Tensor | None = None


def plan_flash_sparse(query_blocks: QueryBlocks, static_lists: BlockLists | None, block_table: torch.Tensor | None,
                      page_size: int, device: torch.device | str) -> FlashSparsePlan:
    """The step's FA3 runs, and the block tables of its static lists (built once for all layers)."""
    runs = plan_runs(query_blocks.table_cpu, device)
    if static_lists is None:
        return FlashSparsePlan(runs)
    tables, seqused = sparse_block_tables(query_blocks.table, block_table, *static_lists, query_blocks.sparse_block,
                                          page_size)
    return FlashSparsePlan(runs, tables, seqused)


def flash_sparse_rows(flash: FlashSparsePlan, query_blocks: QueryBlocks, lists: BlockLists, query: torch.Tensor,
                      key_cache: torch.Tensor, value_cache: torch.Tensor, output: torch.Tensor,
                      block_table: torch.Tensor, scale: float, tables: torch.Tensor | None = None,
                      seqused: torch.Tensor | None = None) -> None:
    """The sparse rows into ``output`` on FA3: over the plan's tables (static lists), else over
    tables of this layer's ``lists``, written into ``tables``/``seqused`` when given."""
    if flash.tables is not None:
        tables, seqused = flash.tables, flash.seqused
    else:
        tables, seqused = sparse_block_tables(query_blocks.table, block_table, *lists, query_blocks.sparse_block,
                                              key_cache.shape[1], tables, seqused)
    flash_sparse_attention(query, key_cache, value_cache, output, flash.runs, tables, seqused, scale)


def flash_sparse_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    output: torch.Tensor,
    runs: list[FlashSparseRun],
    tables: torch.Tensor,
    seqused: torch.Tensor,
    scale: float,
) -> None:
    """Write the sparse rows of ``runs`` into ``output`` with FA3, the one FlashAttention version
    these tables are for. key_cache/value_cache: [pages, page_size, Hkv, D] views of vLLM's cache;
    tables [G, n, pages] and seqused [G, n] from ``sparse_block_tables``, where the G table
    groups split the KV heads evenly (G = 1: one table for all heads)."""
    from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func

    groups = tables.shape[0]
    if query.shape[1] % groups or key_cache.shape[2] % groups:
        raise ValueError(f"{groups} table groups do not split {query.shape[1]} query and "
                         f"{key_cache.shape[2]} KV heads evenly")
    q_heads, kv_heads = query.shape[1] // groups, key_cache.shape[2] // groups

    def attend(group: int) -> None:
        qh, kh = slice(group * q_heads, (group + 1) * q_heads), slice(group * kv_heads, (group + 1) * kv_heads)
        # A single KV head (per rank, or per call with dynamic lists) is a size-1 dimension of any
        # stride; vLLM's FLASH_ATTN sets such strides as a contiguous layout would before calling
        # FlashAttention (it crashed without), and so do we.
        k, v = canonical_strides(key_cache[:, :, kh]), canonical_strides(value_cache[:, :, kh])
        for run in runs:
            rows, blocks = slice(run.token_start, run.token_end), slice(run.qblock_start, run.qblock_end)
            flash_attn_varlen_func(
                q=query[rows, qh], k=k, v=v, out=output[rows, qh],
                cu_seqlens_q=run.cu_seqlens_q, max_seqlen_q=run.max_seqlen_q,
                seqused_k=seqused[group, blocks], max_seqlen_k=run.max_seqlen_k,
                softmax_scale=scale, causal=True, block_table=tables[group, blocks],
                # Prefill rows give FA3 tiles enough; its split-KV heuristic, seeing long keys
                # and few tiles in one KV head's call, split them (64K: 1.9x slower TTFT).
                num_splits=1, fa_version=3,
            )

    if groups == 1 or not query.is_cuda:
        for group in range(groups):
            attend(group)
        return
    # One group's calls per side stream: one after another, the calls were slower (one layer at
    # 131K: 40.1 ms that way, 34.7 ms on streams; H200), we think from each call's last wave. Memory: the side
    # streams use tensors of the current stream, which waits for them before it runs anything
    # else; what FA3 allocates on a side stream comes from that stream's own pool.
    main = torch.cuda.current_stream(query.device)
    streams = _side_streams(query.device, groups)
    for group, stream in enumerate(streams):
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            attend(group)
    for stream in streams:
        main.wait_stream(stream)


_STREAMS: dict[tuple[str, int], list[torch.cuda.Stream]] = {}


def _side_streams(device: torch.device, count: int) -> list[torch.cuda.Stream]:
    key = (str(device), count)
    if key not in _STREAMS:
        _STREAMS[key] = [torch.cuda.Stream(device) for _ in range(count)]
    return _STREAMS[key]
