"""Block scores for dynamic selection (Triton): mean-pooled query block x every key, max per KV block.

``scores[i, h, kb]`` = max over keys j in KV block kb of ``scale * mean_q(i, h) . k_j`` (query
block i, query head h), for kb <= the query block's own block and for the query blocks of the
score groups; other entries are left unwritten.
Only the query block's own rows and the keys before them enter, never the chunk around them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .attention import tma_block_n
from .common import (
    QB_COLUMNS,
    QB_FIRST_POS,
    QB_FIRST_ROW,
    QB_REQUEST,
    QB_ROWS,
    TRITON_DTYPES,
    canonical_strides,
    check_dtypes,
    check_head_dim_contiguous,
    check_index_inputs,
    check_index_table,
    dot_dtype,
    scale_args,
)
from .limits import DeviceLimits, device_limits


@triton.jit
def _pool_queries_kernel(
    q_ptr, pooled_ptr, qblocks_ptr, groups_ptr,
    stride_qt, stride_qh, stride_pi, stride_ph,
    ROWS: tl.constexpr, HEADS: tl.constexpr, HEAD_SIZE: tl.constexpr,
):
    first_head = tl.program_id(0) * HEADS
    member = tl.program_id(2)
    if member >= tl.load(groups_ptr + tl.program_id(1) * 2 + 1):
        return
    qblock = tl.load(groups_ptr + tl.program_id(1) * 2) + member
    row_start = tl.load(qblocks_ptr + qblock * QB_COLUMNS + QB_FIRST_ROW)
    num_rows = tl.load(qblocks_ptr + qblock * QB_COLUMNS + QB_ROWS)
    offs_r = tl.arange(0, ROWS)
    # The columns of HEADS consecutive heads: with q's heads packed in a token's row, each row
    # is one contiguous run of HEADS x HEAD_SIZE values.
    offs_c = tl.arange(0, HEADS * HEAD_SIZE)
    head_c, dim_c = offs_c // HEAD_SIZE, offs_c % HEAD_SIZE
    total = tl.zeros([HEADS * HEAD_SIZE], dtype=tl.float32)
    for r in range(0, num_rows, ROWS):
        rows = r + offs_r
        ptrs = q_ptr + (row_start + rows).to(tl.int64)[:, None] * stride_qt + first_head * stride_qh
        x = tl.load(ptrs + (head_c * stride_qh + dim_c)[None, :], mask=(rows < num_rows)[:, None], other=0.0)
        total += tl.sum(x.to(tl.float32), 0)
    out = pooled_ptr + qblock * stride_pi + (first_head + head_c) * stride_ph + dim_c
    tl.store(out, total / num_rows)


@triton.jit(do_not_specialize=["stride_bt", "stride_scale"])
def _block_scores_kernel(
    pooled_ptr, k_ptr, k_desc, scores_ptr,
    block_table_ptr, seq_lens_ptr, qblocks_ptr, groups_ptr,
    scale,
    q_scale_ptr, k_scale_ptr, stride_scale,  # fp8 scales (one, or one per KV head); None: 16-bit data
    stride_pi, stride_ph,
    stride_kb, stride_kt, stride_kh,
    stride_bt,
    stride_si, stride_sh,
    GQA: tl.constexpr, BLOCKS_PER_GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HEAD_SIZE: tl.constexpr, SPARSE_BLOCK: tl.constexpr,
    PAGE_SIZE: tl.constexpr, KV_BLOCKS_PER_PROGRAM: tl.constexpr, TMA: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    group = tl.program_id(0)
    kv_head = tl.program_id(1)
    # Every KV block's score is independent of the others, so the KV range is split over
    # programs: long rows would otherwise leave a few programs looping while the rest idle.
    kv_first = tl.program_id(2) * KV_BLOCKS_PER_PROGRAM
    first = tl.load(groups_ptr + group * 2)
    count = tl.load(groups_ptr + group * 2 + 1)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_SIZE)
    qblock = first + offs_m // GQA
    head = kv_head * GQA + offs_m % GQA
    row_ok = (offs_m < BLOCKS_PER_GROUP * GQA) & (offs_m // GQA < count)
    row_qb = tl.load(qblocks_ptr + qblock * QB_COLUMNS + QB_FIRST_POS, mask=row_ok, other=0) // SPARSE_BLOCK

    req = tl.load(qblocks_ptr + first * QB_COLUMNS + QB_REQUEST)
    seq_len = tl.load(seq_lens_ptr + req)
    last_qb = tl.load(qblocks_ptr + (first + count - 1) * QB_COLUMNS + QB_FIRST_POS) // SPARSE_BLOCK
    if kv_first > last_qb:
        return

    pooled = tl.load(
        pooled_ptr + qblock.to(tl.int64)[:, None] * stride_pi + head[:, None] * stride_ph
        + offs_d[None, :],
        mask=row_ok[:, None], other=0.0,
    ).to(DOT_DTYPE)
    # fp8 keys convert to DOT_DTYPE exactly; the q and k scales multiply the scores (a positive
    # factor commutes with the max).
    if q_scale_ptr is not None:
        scale *= tl.load(q_scale_ptr + kv_head * stride_scale)
    if k_scale_ptr is not None:
        scale *= tl.load(k_scale_ptr + kv_head * stride_scale)
    k_base = k_ptr + kv_head * stride_kh
    bt_row = block_table_ptr + req.to(tl.int64) * stride_bt
    out_row = scores_ptr + qblock.to(tl.int64) * stride_si + head * stride_sh

    # One flat loop over key tiles (not blocks x tiles) so that loads pipeline across KV blocks;
    # a block's maximum is stored at its last tile.
    TILES: tl.constexpr = SPARSE_BLOCK // BLOCK_N
    kv_end = tl.minimum(kv_first + KV_BLOCKS_PER_PROGRAM, last_qb + 1)
    block_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for t in range(kv_first * TILES, kv_end * TILES):
        start = t * BLOCK_N
        kpos = start + offs_n
        kv_ok = kpos < seq_len
        if TMA:  # the tile is one page's rows; keys past seq_len are masked out below
            page = tl.load(bt_row + start // PAGE_SIZE, mask=start < seq_len, other=0)
            k = k_desc.load([page, start % PAGE_SIZE, kv_head, 0]).reshape(BLOCK_N, HEAD_SIZE)
            k = tl.trans(k)
        else:
            page = tl.load(bt_row + kpos // PAGE_SIZE, mask=kv_ok, other=0).to(tl.int64)
            k = tl.load(
                k_base + page[None, :] * stride_kb + (kpos % PAGE_SIZE)[None, :] * stride_kt
                + offs_d[:, None],
                mask=kv_ok[None, :], other=0.0,
            )
        s = tl.where(kv_ok[None, :], tl.dot(pooled, k.to(DOT_DTYPE)), float("-inf"))
        block_max = tl.maximum(block_max, tl.max(s, 1))
        if t % TILES == TILES - 1:
            kv_block = t // TILES
            tl.store(out_row + kv_block, block_max * scale, mask=row_ok & (kv_block <= row_qb))
            block_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)


def pool_config(num_heads: int, head_size: int, element_size: int, sparse_block: int,
                config: dict[str, int] | None = None) -> dict[str, int]:
    """The pooling kernel's launch config (``config`` entries replace the defaults); it needs no
    more shared memory than a cross-warp sum, on any card."""
    # A program takes the heads that make each row's read one contiguous kilobyte (d 128, bf16:
    # 4 heads) and loads ROWS x HEADS x head_size at once. H200, pooling + scores at 32K / 131K
    # tokens: Hq 32, d 128: 0.208 / 1.48 ms with 4 heads against 0.233 / 1.56 with 1. Qwen2.5's
    # Hq 14, d 64 cannot take 1 KB in whole programs; 2 heads there pooled 6% slower than 1
    # (benchmarks/results/selection-h200-2026-11-29-pool-*.json).
    heads = max(1, 1024 // (head_size * element_size))
    cfg = dict(HEADS=heads if num_heads % heads == 0 else 1, num_warps=4)
    cfg.update(config or {})
    heads = cfg["HEADS"]
    if heads & (heads - 1) or num_heads % heads:
        raise ValueError(f"pooling takes a power of two of heads per program that divides {num_heads}, not {heads}")
    cfg.setdefault("ROWS", min(triton.next_power_of_2(sparse_block), max(16, 16384 // (heads * head_size))))
    return cfg


def pool_queries(
    q: torch.Tensor, qblocks: torch.Tensor, groups: torch.Tensor, pooled: torch.Tensor, sparse_block: int,
    blocks_per_group: int, config: dict[str, int] | None = None,
) -> torch.Tensor:
    """pooled[i, h] = mean of q over the rows of query block i (fp32), for the query blocks of
    ``groups`` ([g, 2] (first query block, count <= blocks_per_group)); other rows stay untouched."""
    num_heads, head_size = q.shape[1], q.shape[2]
    cfg = pool_config(num_heads, head_size, q.element_size(), sparse_block, config)
    check_index_inputs(qblocks, None)
    check_index_table("groups", groups, "[groups, 2]", "whole")
    if groups.shape[1] != 2:
        raise ValueError(f"groups must have 2 columns (first query block, count), not {groups.shape[1]}")
    check_fp32_rows("pooled", pooled)
    if groups.shape[0]:
        _pool_queries_kernel[(num_heads // cfg["HEADS"], groups.shape[0], blocks_per_group)](
            q, pooled, qblocks, groups, q.stride(0), q.stride(1), pooled.stride(0), pooled.stride(1),
            HEAD_SIZE=head_size, **cfg,
        )
    return pooled


def check_fp32_rows(name: str, buffer: torch.Tensor) -> None:
    """A float32 [query blocks, heads, n] buffer the kernels write row by row."""
    if buffer.dtype != torch.float32 or buffer.dim() != 3 or buffer.stride(-1) != 1:
        raise ValueError(f"{name} must be a float32 [query blocks, heads, n] buffer with contiguous rows; got "
                         f"{buffer.dtype} of shape {tuple(buffer.shape)} with strides {buffer.stride()}")


def blocks_per_group(gqa: int, rows: int = 128) -> int:
    """Query blocks one scoring program takes (its rows are query blocks x the GQA group)."""
    return max(1, rows // triton.next_power_of_2(gqa))


def scores_config(
    head_size: int, gqa: int, sparse_block: int, page_size: int, limits: DeviceLimits, element_size: int = 2
) -> dict[str, int]:
    """The scoring kernel's launch config on a card with ``limits`` (see ``attention.launch_config``).
    Its rows are the query blocks of a group times the GQA group (``blocks_per_group``, which the
    caller's groups follow), so only the key tile steps down where the pooled rows plus
    ``num_stages`` key tiles exceed the card's shared memory: to 2 stages, then halved key tiles
    (to 16 rows), then 1 stage. Nothing steps down on sm_90 (bf16, fp16)."""
    block_m = max(16, triton.next_power_of_2(blocks_per_group(gqa) * gqa))
    # Tiles from benchmarks/selection.py --sweep on an H200 (131K tokens, d 64 and 128, page 16).
    cfg = dict(BLOCK_M=block_m, KV_BLOCKS_PER_PROGRAM=32, BLOCK_N=min(sparse_block, 64 if head_size == 256 else 128),
               num_warps=4, num_stages=3, TMA=False)
    tile_rows = tma_block_n(head_size, sparse_block, page_size)
    if tile_rows and limits.tma:
        cfg.update(BLOCK_N=tile_rows, num_stages=2, TMA=True)  # key tiles: TMA copies of a page
    while shared_memory_estimate(cfg, head_size, element_size) > limits.shared_memory:
        if cfg["num_stages"] > 2:
            cfg["num_stages"] -= 1
        elif cfg["BLOCK_N"] > 16:
            cfg["BLOCK_N"] //= 2
        elif cfg["num_stages"] > 1:
            cfg["num_stages"] -= 1
        else:
            raise ValueError(f"no scoring tile fits {limits.shared_memory} B of shared memory (d {head_size})")
    return cfg


def shared_memory_estimate(cfg: dict[str, int], head_size: int, element_size: int) -> int:
    """Bytes of shared memory a scoring config may take at most: the pooled query rows plus
    ``num_stages`` key tiles."""
    return element_size * head_size * (cfg["BLOCK_M"] + cfg["num_stages"] * cfg["BLOCK_N"])


def block_scores(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    qblocks: torch.Tensor,
    groups: torch.Tensor,
    scores: torch.Tensor,
    pooled: torch.Tensor,
    scale: float,
    sparse_block: int,
    config: dict[str, int] | None = None,
    limits: DeviceLimits | None = None,
    q_scale: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fill ``scores[i, h, :qb_i + 1]`` (see the module docstring) for the query blocks of ``groups``.

    groups: [g, 2] int32 (first query block, count) of consecutive query blocks of one request,
    at most ``blocks_per_group(gqa)`` each; the rows of other query blocks stay untouched.
    pooled: an fp32 workspace [n >= num qblocks, Hq, D].
    ``config`` entries replace those of ``scores_config`` for ``limits`` (default: q's device's).
    q and k_cache may be fp8 (e4m3) with their
    scales, as in ``attention.sparse_prefill_attention``. The pooled queries enter the dot in
    ``common.dot_dtype``.
    """
    num_q_heads, head_size = q.shape[1], q.shape[2]
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    gqa = num_q_heads // num_kv_heads
    per_group = blocks_per_group(gqa)
    check_dtypes(dot_dtype(q), q=(q, q_scale), K=(k_cache, k_scale))
    check_head_dim_contiguous(q, k_cache)
    check_index_inputs(qblocks, block_table, seq_lens)
    check_fp32_rows("scores", scores)
    if groups.shape[0] == 0:
        return scores
    q, k_cache = canonical_strides(q), canonical_strides(k_cache)
    pool_queries(q, qblocks, groups, pooled, sparse_block, per_group)
    limits = limits or device_limits(q.device)
    cfg = scores_config(head_size, gqa, sparse_block, page_size, limits, dot_dtype(q).itemsize)
    cfg.update(config or {})
    if cfg["TMA"] and page_size % cfg["BLOCK_N"]:
        raise ValueError(f"TMA tiles need pages of whole tiles: {cfg}, page {page_size}")
    k_desc = None
    if cfg["TMA"]:
        k_desc = TensorDescriptor(
            k_cache, list(k_cache.shape), list(k_cache.stride()), [1, cfg["BLOCK_N"], 1, head_size]
        )
    kv_programs = triton.cdiv(scores.shape[2], cfg["KV_BLOCKS_PER_PROGRAM"])
    _block_scores_kernel[(groups.shape[0], num_kv_heads, kv_programs)](
        pooled, k_cache, k_desc, scores, block_table, seq_lens, qblocks, groups, scale,
        *scale_args(num_kv_heads, q_scale, k_scale),
        pooled.stride(0), pooled.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_table.stride(0),
        scores.stride(0), scores.stride(1),
        GQA=gqa, BLOCKS_PER_GROUP=per_group, HEAD_SIZE=head_size,
        SPARSE_BLOCK=sparse_block, PAGE_SIZE=page_size, DOT_DTYPE=TRITON_DTYPES[dot_dtype(q)], **cfg,
    )
    return scores
