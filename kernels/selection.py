"""Dynamic block selection (Triton): block scores -> the attention kernel's block lists, in one pass.

Same rule as ``vllm_flashprefill.patterns.select_dynamic`` followed by ``BlockLists.from_mask`` (the torch
definition the tests compare against), fused so that a layer pays one small launch instead of
about twenty torch operations: per query block and KV head, each query head's causal scores
relative to that head's maximum and to its candidates' mean, the union over the heads of the group
of the blocks that pass both, optional min/max budgets on the content-selected blocks (exact
counts, ties going to the later block), the forced sink/local/strided/diagonal blocks
(every causal block for query blocks below ``min_seq_len`` or in the chunk's dense tail), and the
kept block indices written in ascending order with their count.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .common import QB_COLUMNS, QB_FIRST_POS, QB_REQUEST


@triton.jit
def _kth_largest(values, K: tl.constexpr):
    """The K-th largest of ``values`` (each <= 0 or -inf; ties count), found by a binary search over
    the bit patterns of ``-values``, which order as the values do, reversed. With a sort of the
    padded row instead, selection took 2.3 ms per layer at 131K tokens inside vLLM (H200, a
    width-2048 workspace, ``profile-h200-2026-11-28-dynamic-flash.json``); 0.2 ms now."""
    keys = (-values).to(tl.int32, bitcast=True) & 0x7FFFFFFF  # -0.0 -> 0; -inf -> 0x7F800000
    lo = tl.zeros([], dtype=tl.int32)
    hi = tl.full([], 0x7F800000, dtype=tl.int32)
    for _ in range(31):  # 2**31 > 0x7F800000: the smallest key with at least K keys at or below it
        mid = lo + (hi - lo) // 2
        enough = tl.sum((keys <= mid).to(tl.int32), 0) >= K
        hi = tl.where(enough, mid, hi)
        lo = tl.where(enough, lo, mid + 1)
    # Fewer than K keys at all: lo has run one past -inf's key (a NaN pattern); K-th largest = -inf.
    return -tl.minimum(lo, 0x7F800000).to(tl.float32, bitcast=True)


@triton.jit
def _best(values, K: tl.constexpr):
    """The K largest finite ``values`` (each <= 0 or -inf) as a mask, ties going to the higher
    index (all finite ones where there are fewer), as ``patterns.best_blocks``."""
    kth = _kth_largest(values, K)
    above = values > kth
    tied = ((values == kth) & (values > float("-inf"))).to(tl.int32)
    later_ties = tl.sum(tied, 0) - tl.cumsum(tied, 0)
    return above | ((tied > 0) & (later_ties < K - tl.sum(above.to(tl.int32), 0)))


@triton.jit(do_not_specialize=["num_kv_blocks", "stride_si", "stride_ii", "stride_ci"])
def _select_blocks_kernel(
    scores_ptr, qblocks_ptr, seq_lens_ptr, indices_ptr, counts_ptr,
    num_kv_blocks, log_threshold, log_above_mean,
    stride_si, stride_sh, stride_ii, stride_ih, stride_ci, stride_ch,
    GQA: tl.constexpr, WIDTH: tl.constexpr, SPARSE_BLOCK: tl.constexpr,
    SINK_BLOCKS: tl.constexpr, LOCAL_BLOCKS: tl.constexpr, STRIDE: tl.constexpr,
    MIN_SEQ_LEN: tl.constexpr, DENSE_TAIL_BLOCKS: tl.constexpr,
    MIN_BUDGET: tl.constexpr, MAX_BUDGET: tl.constexpr, ABOVE_MEAN: tl.constexpr,
):
    qblock = tl.program_id(0)
    kv_head = tl.program_id(1)
    qb = tl.load(qblocks_ptr + qblock * QB_COLUMNS + QB_FIRST_POS) // SPARSE_BLOCK
    request = tl.load(qblocks_ptr + qblock * QB_COLUMNS + QB_REQUEST)
    last_block = (tl.load(seq_lens_ptr + request) - 1) // SPARSE_BLOCK
    kb = tl.arange(0, WIDTH)
    causal = kb <= qb
    pinned = causal & ((kb == qb) | (kb < SINK_BLOCKS) | (kb >= qb - LOCAL_BLOCKS))
    if STRIDE > 0:
        pinned = pinned | (causal & ((qb - kb) % STRIDE == 0))
    dense = (qb * SPARSE_BLOCK < MIN_SEQ_LEN) | (qb > last_block - DENSE_TAIL_BLOCKS)
    forced = tl.where(dense, causal, pinned)

    candidate = causal & ~forced
    num_candidates = tl.maximum(tl.sum(candidate.to(tl.int32), 0), 1).to(tl.float32)
    rel = tl.full([WIDTH], float("-inf"), dtype=tl.float32)
    keep = tl.zeros([WIDTH], dtype=tl.int1)
    row = scores_ptr + qblock.to(tl.int64) * stride_si + kv_head * GQA * stride_sh
    for g in tl.static_range(GQA):
        s = tl.load(row + g * stride_sh + kb, mask=causal, other=float("-inf"))
        rel_g = s - tl.max(s, 0)
        passes = rel_g >= log_threshold
        if ABOVE_MEAN:  # exp(s) >= above_mean * the mean of exp(s) over the candidates
            top = tl.max(tl.where(candidate, s, float("-inf")), 0)
            spread = tl.sum(tl.where(candidate, tl.exp(s - top), 0.0), 0)
            passes = passes & (s - top - tl.log(spread / num_candidates) >= log_above_mean)
        keep = keep | passes
        rel = tl.maximum(rel, rel_g)
    rel = tl.where(forced, float("-inf"), rel)
    keep = keep & (rel > float("-inf"))

    if MIN_BUDGET > 0:
        keep = keep | _best(rel, MIN_BUDGET)
    if MAX_BUDGET > 0:
        if MAX_BUDGET < num_kv_blocks:  # else no row holds more candidates
            keep = _best(tl.where(keep, rel, float("-inf")), MAX_BUDGET)
    keep = keep | forced

    slot = tl.cumsum(keep.to(tl.int32), 0) - 1
    out = indices_ptr + qblock.to(tl.int64) * stride_ii + kv_head * stride_ih
    tl.store(out + slot, kb, mask=keep)
    tl.store(counts_ptr + qblock * stride_ci + kv_head * stride_ch, tl.sum(keep.to(tl.int32), 0))


def select_blocks(
    scores: torch.Tensor,
    qblocks: torch.Tensor,
    seq_lens: torch.Tensor,
    num_kv_heads: int,
    num_kv_blocks: int,
    *,
    sparse_block: int,
    threshold: float,
    above_mean: float,
    sink_blocks: int,
    local_blocks: int,
    stride: int,
    min_seq_len: int,
    dense_tail_blocks: int,
    min_budget: int = 0,
    max_budget: int = 0,
    indices: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block lists from block scores.

    scores: [n, Hq, W] fp32 (W >= num_kv_blocks; entries after a query block's own block are
    ignored, and so are the rows of query blocks whose causal blocks are all forced (see
    ``patterns.content_selectable``), so a workspace may hold stale values there); qblocks: the
    query-block table (kernels/common.py);
    seq_lens: [num requests] int32, each request's length after its chunk.
    Returns indices [n, Hkv, W] int32 (the first ``counts`` of each row are valid, ascending) and
    counts [n, Hkv] int32, written into ``indices``/``counts`` when given. The kernel is compiled
    for the padded width W, so a workspace of fixed width never recompiles between prompts.
    """
    n, num_q_heads, width = scores.shape
    if scores.dtype != torch.float32:
        raise ValueError(f"scores must be float32, got {scores.dtype}")
    if num_kv_blocks > width:
        raise ValueError(f"{num_kv_blocks} KV blocks do not fit scores of width {width}")
    if indices is None:
        indices = torch.empty(n, num_kv_heads, width, dtype=torch.int32, device=scores.device)
    if counts is None:
        counts = torch.empty(n, num_kv_heads, dtype=torch.int32, device=scores.device)
    if n == 0:
        return indices, counts
    _select_blocks_kernel[(n, num_kv_heads)](
        scores, qblocks, seq_lens, indices, counts,
        num_kv_blocks, math.log(threshold) if threshold > 0 else float("-inf"),
        math.log(above_mean) if above_mean > 0 else 0.0,
        scores.stride(0), scores.stride(1), indices.stride(0), indices.stride(1),
        counts.stride(0), counts.stride(1),
        GQA=num_q_heads // num_kv_heads, WIDTH=triton.next_power_of_2(width),
        SPARSE_BLOCK=sparse_block, SINK_BLOCKS=sink_blocks, LOCAL_BLOCKS=local_blocks,
        STRIDE=stride, MIN_SEQ_LEN=min_seq_len, DENSE_TAIL_BLOCKS=dense_tail_blocks,
        MIN_BUDGET=min_budget, MAX_BUDGET=max_budget, ABOVE_MEAN=above_mean > 0,
        num_warps=4,
    )
    return indices, counts
