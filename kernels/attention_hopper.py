"""Block-sparse causal prefill attention for Hopper (sm_90), in Triton's Gluon dialect.

Same inputs and result as ``kernels/attention.sparse_prefill_attention`` (query blocks, KV block
lists, paged cache; see there), with FlashAttention 3's structure, which ``tl.dot`` cannot express:

- a producer warp copies K and V tiles of 128 keys (by TMA, one copy per page or part of a page)
  into rings of shared memory;
- two consumer warpgroups, 64 of the program's 128 rows each, run the tile loop independently and
  hand ring slots back through mbarriers (no CTA-wide barrier per tile), so one group's softmax
  overlaps the other's matrix multiplies;
- within a group, the QK^T of tile j is issued before the PV of tile j-1, so the softmax of tile j
  runs while PV is on the tensor cores (``warpgroup_mma_wait(num_outstanding=1)``).

On an H200 (``benchmarks/results/attention-kernels-h200-2026-11-29.json``, bf16, d 128, GQA 4) it
took 24.5 ms where the ``tl.dot`` kernel took 31.0 for a 131K hybrid prefill layer.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .common import (
    FP8_DTYPE,
    LOG2E,
    QB_COLUMNS,
    QB_FIRST_POS,
    QB_FIRST_ROW,
    QB_REQUEST,
    QB_ROWS,
    canonical_strides,
    check_head_dim_contiguous,
    check_index_inputs,
    kernel_shape,
    list_strides,
)

# Gluon's API moves between Triton releases; the two names this kernel needs differ between 3.6 (the
# GPU image's, with vLLM 0.26) and 3.9 (vLLM 0.32+). Inside a warp-specialized partition the
# barrier synchronises that partition's warps only.
_partition_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

BLOCK_M = 128  # query rows per program: two consumer warpgroups of 64
BLOCK_N = 128  # keys per tile
STAGES = 2  # K and V ring slots (3 exceed shared memory with d 128)
HEAD_SIZES = (64, 128)
DTYPES = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}


def unsupported_reason(device: torch.device, dtype: torch.dtype, kv_dtype: torch.dtype, head_size: int,
                       page_size: int, sparse_block: int, gqa: int) -> str | None:
    """Why this kernel cannot run these rows (None: it can)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
        return "it needs an sm_90 GPU (wgmma)"
    if FP8_DTYPE in (dtype, kv_dtype):
        return f"fp8 data (query {dtype}, KV cache {kv_dtype}): it reads 16-bit tiles only"
    if dtype not in DTYPES:
        return f"dtype {dtype} (it takes {list(DTYPES)})"
    if kv_dtype != dtype:
        return f"KV cache dtype {kv_dtype} differs from the query's {dtype}"
    if head_size not in HEAD_SIZES:
        return f"head size {head_size} (it takes {HEAD_SIZES})"
    if sparse_block % BLOCK_N:
        return f"block_size {sparse_block} is not a multiple of its {BLOCK_N}-key tiles"
    if page_size % 16 or (BLOCK_N % page_size and page_size % BLOCK_N):
        return f"KV pages of {page_size} tokens (a tile must be whole pages or lie in one)"
    if gqa > BLOCK_M:
        return f"{gqa} query heads per KV head"
    return None


@gluon.jit
def _tile_start(t, n_off, idx_row, diag_start, SPARSE_BLOCK: gl.constexpr, BLOCK_N: gl.constexpr):
    """First key of tile t: tiles [0, n_off) walk the listed off-diagonal blocks, the rest the
    diagonal block."""
    TILES_PER_BLOCK: gl.constexpr = SPARSE_BLOCK // BLOCK_N
    if t < n_off:
        pos = gl.load(idx_row + t // TILES_PER_BLOCK) * SPARSE_BLOCK + (t % TILES_PER_BLOCK) * BLOCK_N
    else:
        pos = diag_start + (t - n_off) * BLOCK_N
    return pos


@gluon.jit
def _slot_wait(bars, t, STAGES: gl.constexpr):
    """Tile t sits in slot t % STAGES of its ring, on that slot's (t // STAGES)-th use."""
    mbarrier.wait(bars.index(t % STAGES), (t // STAGES) & 1)


@gluon.jit
def _ring_tile(bufs, slot, BLOCK_N: gl.constexpr, HEAD_SIZE: gl.constexpr):
    return bufs.index(slot).reshape([BLOCK_N, HEAD_SIZE])


@gluon.jit
def _produce(desc, bufs, full, empty, t, n_off, idx_row, diag_start, bt_row, kv_head, seq_len,
             SPARSE_BLOCK: gl.constexpr, BLOCK_N: gl.constexpr, PAGE_SIZE: gl.constexpr, STAGES: gl.constexpr):
    """Copy tile t into its ring slot once both consumers have released the slot's previous tile.
    A tile is COPIES boxes of BOX rows; boxes past the sequence end are not copied (their pages may
    not exist), the slot keeps stale rows there, which the consumers mask (K) or zero (V)."""
    BOX: gl.constexpr = desc.block_type.shape[1]
    COPIES: gl.constexpr = BLOCK_N // BOX
    slot = t % STAGES
    if t >= STAGES:
        mbarrier.wait(empty.index(slot), (t // STAGES - 1) & 1)
    pos = _tile_start(t, n_off, idx_row, diag_start, SPARSE_BLOCK, BLOCK_N)
    copies = gl.minimum((seq_len - pos + BOX - 1) // BOX, COPIES)
    bar = full.index(slot)
    for n in gl.static_range(1, COPIES + 1):
        mbarrier.expect(bar, n * desc.block_type.nbytes, pred=copies == n)
    buf = bufs.index(slot)
    for i in gl.static_range(COPIES):
        first = gl.minimum(pos + i * BOX, seq_len - 1)
        page = gl.load(bt_row + first // PAGE_SIZE)
        _tma_load(desc, [page, first % PAGE_SIZE, kv_head, 0], bar, buf.slice(i, 1), pred=i < copies)


@gluon.jit
def _producer(k_desc, v_desc, k_bufs, v_bufs, k_full, v_full, k_empty, v_empty, n_tiles, n_off, idx_row,
              diag_start, bt_row, kv_head, seq_len,
              SPARSE_BLOCK: gl.constexpr, BLOCK_N: gl.constexpr, PAGE_SIZE: gl.constexpr, STAGES: gl.constexpr):
    """K of tile t, then V of tile t-1: the order in which the consumers need them."""
    for t in range(n_tiles):
        _produce(k_desc, k_bufs, k_full, k_empty, t, n_off, idx_row, diag_start, bt_row, kv_head, seq_len,
                 SPARSE_BLOCK, BLOCK_N, PAGE_SIZE, STAGES)
        if t > 0:
            _produce(v_desc, v_bufs, v_full, v_empty, t - 1, n_off, idx_row, diag_start, bt_row, kv_head,
                     seq_len, SPARSE_BLOCK, BLOCK_N, PAGE_SIZE, STAGES)
    if n_tiles > 0:
        _produce(v_desc, v_bufs, v_full, v_empty, n_tiles - 1, n_off, idx_row, diag_start, bt_row, kv_head,
                 seq_len, SPARSE_BLOCK, BLOCK_N, PAGE_SIZE, STAGES)


@gluon.jit
def _online_softmax(s, m_i, l_i, key_start, seq_len, q_pos, offs_n, sm_scale_log2, MASKED: gl.constexpr):
    """m_i and the exponents are in log2 units, so the scale folds into one FMA per score. MASKED:
    the causal mask and the sequence end (diagonal tiles only; off-diagonal ones lie in the past)."""
    if MASKED:
        kpos = key_start + offs_n
        visible = (gl.expand_dims(kpos, 0) <= gl.expand_dims(q_pos, 1)) & gl.expand_dims(kpos < seq_len, 0)
        s = gl.where(visible, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * sm_scale_log2)
    m_safe = m_new
    if MASKED:  # a row that sees no key yet: exp2 gives 0, not NaN
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
    p = gl.exp2(s * sm_scale_log2 - gl.expand_dims(m_safe, 1))
    alpha = gl.exp2(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)


@gluon.jit
def _consume(t, acc, p, m_i, l_i, q_smem, k_bufs, v_bufs, k_full, v_full, k_empty, v_empty, n_off, idx_row,
             diag_start, seq_len, q_pos, offs_n, sm_scale_log2,
             SPARSE_BLOCK: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_SIZE: gl.constexpr,
             STAGES: gl.constexpr, S_LAYOUT: gl.constexpr, O_LAYOUT: gl.constexpr, P_LAYOUT: gl.constexpr,
             MASKED: gl.constexpr):
    """QK^T of tile t, then PV of tile t-1 behind it; each slot is released once its MMA is done."""
    _slot_wait(k_full, t, STAGES)
    s_tok = warpgroup_mma(q_smem, _ring_tile(k_bufs, t % STAGES, BLOCK_N, HEAD_SIZE).permute((1, 0)),
                          gl.zeros([ROWS, BLOCK_N], gl.float32, S_LAYOUT), use_acc=False, is_async=True)
    _slot_wait(v_full, t - 1, STAGES)
    acc_tok = warpgroup_mma(p, _ring_tile(v_bufs, (t - 1) % STAGES, BLOCK_N, HEAD_SIZE), acc, is_async=True)
    s = warpgroup_mma_wait(num_outstanding=1, deps=[s_tok])
    mbarrier.arrive(k_empty.index(t % STAGES))
    key_start = 0
    if MASKED:
        key_start = _tile_start(t, n_off, idx_row, diag_start, SPARSE_BLOCK, BLOCK_N)
    p_f32, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, key_start, seq_len, q_pos, offs_n, sm_scale_log2, MASKED)
    acc, p = warpgroup_mma_wait(num_outstanding=0, deps=[acc_tok, p])
    mbarrier.arrive(v_empty.index((t - 1) % STAGES))
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, O_LAYOUT)), 1)
    p = gl.convert_layout(p_f32.to(p.dtype), P_LAYOUT)
    return acc, p, m_i, l_i


@gluon.jit
def _consumer(q_smem, row_base: gl.constexpr, q_ptr, out_ptr, k_bufs, v_bufs, k_full, v_full, k_empty, v_empty,
              row_start, pos_start, num_rows, sub, kv_head, seq_len, n_tiles, n_off, idx_row, diag_start, sm_scale_log2,
              stride_qt, stride_qh, stride_ot, stride_oh,
              v_zeroed, GQA: gl.constexpr, BLOCK_Q: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr,
              HEAD_SIZE: gl.constexpr, SPARSE_BLOCK: gl.constexpr, STAGES: gl.constexpr):
    """One warpgroup (4 warps, 64 rows: one wgmma row block): the program's rows [row_base,
    row_base + ROWS) over all of its tiles."""
    gl.static_assert(ROWS == 64, "the layouts below are one warpgroup's: 4 warps, wgmma M = 64")
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_SIZE, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    io_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    dtype: gl.constexpr = q_ptr.dtype.element_ty

    # Rows are token-major: row r is token r // GQA, query head kv_head * GQA + r % GQA.
    offs_m = row_base + gl.arange(0, ROWS, layout=gl.SliceLayout(1, io_layout))
    offs_d = gl.arange(0, HEAD_SIZE, layout=gl.SliceLayout(0, io_layout))
    token = sub * BLOCK_Q + offs_m // GQA
    head = kv_head * GQA + offs_m % GQA
    row_ok = (offs_m < BLOCK_Q * GQA) & (token < num_rows)
    if n_tiles > 0:
        q_off = (row_start + token).to(gl.int64) * stride_qt + head * stride_qh
        q_smem.store(gl.load(q_ptr + gl.expand_dims(q_off, 1) + gl.expand_dims(offs_d, 0),
                             mask=gl.expand_dims(row_ok, 1), other=0.0))
        fence_async_shared()
        _partition_barrier()

        q_rows = row_base + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
        q_pos = pos_start + sub * BLOCK_Q + q_rows // GQA
        offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        m_i = gl.full([ROWS], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([ROWS], gl.float32, gl.SliceLayout(1, s_layout))
        acc = gl.zeros([ROWS, HEAD_SIZE], gl.float32, o_layout)

        # Tile 0: QK^T and softmax only (no P yet); masked, whichever kind it is.
        _slot_wait(k_full, 0, STAGES)
        s_tok = warpgroup_mma(q_smem, _ring_tile(k_bufs, 0, BLOCK_N, HEAD_SIZE).permute((1, 0)),
                              gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=[s_tok])
        mbarrier.arrive(k_empty.index(0))
        key_start = _tile_start(0, n_off, idx_row, diag_start, SPARSE_BLOCK, BLOCK_N)
        p_f32, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, key_start, seq_len, q_pos, offs_n, sm_scale_log2, True)
        p = gl.convert_layout(p_f32.to(dtype), p_layout)

        for t in range(1, n_off):
            acc, p, m_i, l_i = _consume(t, acc, p, m_i, l_i, q_smem, k_bufs, v_bufs, k_full, v_full, k_empty,
                                        v_empty, n_off, idx_row, diag_start, seq_len, q_pos, offs_n, sm_scale_log2,
                                        SPARSE_BLOCK, ROWS, BLOCK_N, HEAD_SIZE, STAGES, s_layout, o_layout,
                                        p_layout, False)
        for t in range(gl.maximum(n_off, 1), n_tiles):
            acc, p, m_i, l_i = _consume(t, acc, p, m_i, l_i, q_smem, k_bufs, v_bufs, k_full, v_full, k_empty,
                                        v_empty, n_off, idx_row, diag_start, seq_len, q_pos, offs_n, sm_scale_log2,
                                        SPARSE_BLOCK, ROWS, BLOCK_N, HEAD_SIZE, STAGES, s_layout, o_layout,
                                        p_layout, True)

        # Only the last tile can reach past the sequence end. Its V rows there may hold anything
        # (NaN too) while P is 0 there: zero them, each group half of the tile's rows, and let
        # neither group multiply before both halves are written.
        last = n_tiles - 1
        _slot_wait(v_full, last, STAGES)
        v_tile = _ring_tile(v_bufs, last % STAGES, BLOCK_N, HEAD_SIZE)
        key_start = _tile_start(last, n_off, idx_row, diag_start, SPARSE_BLOCK, BLOCK_N)
        if key_start + BLOCK_N > seq_len:
            half: gl.constexpr = BLOCK_N // 2
            first: gl.constexpr = row_base // ROWS * half
            v_half = v_tile.slice(first, half)
            keys = key_start + first + gl.arange(0, half, layout=gl.SliceLayout(1, io_layout))
            v_half.store(gl.where(gl.expand_dims(keys < seq_len, 1), v_half.load(io_layout), 0.0))
            fence_async_shared()
            _partition_barrier()
            mbarrier.arrive(v_zeroed)
            mbarrier.wait(v_zeroed, 0)
        acc = warpgroup_mma(p, v_tile, acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])

        out = acc / gl.expand_dims(gl.convert_layout(l_i, gl.SliceLayout(1, o_layout)), 1)
        out = gl.convert_layout(out.to(dtype), io_layout)
        o_off = (row_start + token).to(gl.int64) * stride_ot + head * stride_oh
        gl.store(out_ptr + gl.expand_dims(o_off, 1) + gl.expand_dims(offs_d, 0), out,
                 mask=gl.expand_dims(row_ok, 1))


# Strides that change with the batch must not specialise the kernel (see kernels/attention.py).
@gluon.jit(do_not_specialize=["stride_bt", "stride_ii", "stride_ih", "stride_ci", "stride_ch"])
def _hopper_sparse_prefill_kernel(
    q_ptr, out_ptr, k_desc, v_desc,
    block_table_ptr, seq_lens_ptr, qblocks_ptr, kv_indices_ptr, kv_counts_ptr,
    sm_scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_bt, stride_ii, stride_ih, stride_ci, stride_ch,
    GQA: gl.constexpr, BLOCK_Q: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    HEAD_SIZE: gl.constexpr, SPARSE_BLOCK: gl.constexpr, PAGE_SIZE: gl.constexpr, STAGES: gl.constexpr,
):
    SUB_TILES: gl.constexpr = SPARSE_BLOCK // BLOCK_Q
    BOX: gl.constexpr = k_desc.block_type.shape[1]
    # Later query blocks visit more KV blocks: start them first (see kernels/attention.py).
    pid = gl.num_programs(0) - 1 - gl.program_id(0)
    kv_head = gl.program_id(1)
    qblock = pid // SUB_TILES
    sub = pid % SUB_TILES
    req = gl.load(qblocks_ptr + qblock * QB_COLUMNS + QB_REQUEST)
    row_start = gl.load(qblocks_ptr + qblock * QB_COLUMNS + QB_FIRST_ROW)
    pos_start = gl.load(qblocks_ptr + qblock * QB_COLUMNS + QB_FIRST_POS)
    num_rows = gl.load(qblocks_ptr + qblock * QB_COLUMNS + QB_ROWS)
    seq_len = gl.load(seq_lens_ptr + req)
    bt_row = block_table_ptr + req.to(gl.int64) * stride_bt
    idx_row = kv_indices_ptr + qblock.to(gl.int64) * stride_ii + kv_head * stride_ih
    count = gl.load(kv_counts_ptr + qblock * stride_ci + kv_head * stride_ch)
    # The list ends with the diagonal block, which the tiles after n_off cover (an empty list: the
    # diagonal alone, as in kernels/attention.py).
    n_off = gl.maximum(count - 1, 0) * (SPARSE_BLOCK // BLOCK_N)
    diag_start = (pos_start // SPARSE_BLOCK) * SPARSE_BLOCK
    last_pos = pos_start + gl.minimum(num_rows, (sub + 1) * BLOCK_Q) - 1
    # A program past the query block's last row has no tiles (its partitions return at once).
    n_tiles = gl.where(sub * BLOCK_Q < num_rows, n_off + (last_pos - diag_start) // BLOCK_N + 1, 0)

    dtype: gl.constexpr = q_ptr.dtype.element_ty
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M // 2, HEAD_SIZE], dtype)
    q_smem0 = gl.allocate_shared_memory(dtype, [BLOCK_M // 2, HEAD_SIZE], q_layout)
    q_smem1 = gl.allocate_shared_memory(dtype, [BLOCK_M // 2, HEAD_SIZE], q_layout)
    ring: gl.constexpr = [STAGES, BLOCK_N // BOX, BOX, 1, HEAD_SIZE]
    k_bufs = gl.allocate_shared_memory(dtype, ring, k_desc.layout)
    v_bufs = gl.allocate_shared_memory(dtype, ring, v_desc.layout)
    k_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_zeroed = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(v_zeroed, count=2)  # one arrival per consumer
    for i in gl.static_range(STAGES):
        mbarrier.init(k_full.index(i), count=1)
        mbarrier.init(v_full.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)  # one arrival per consumer
        mbarrier.init(v_empty.index(i), count=2)
    fence_async_shared()

    # (Gluon 3.6 cannot concatenate the argument tuples, so each partition's are spelled out.)
    gl.warp_specialize([
        (_consumer, (q_smem0, 0, q_ptr, out_ptr, k_bufs, v_bufs, k_full, v_full, k_empty, v_empty, row_start,
                     pos_start, num_rows, sub, kv_head, seq_len, n_tiles, n_off, idx_row, diag_start, sm_scale_log2,
                     stride_qt, stride_qh, stride_ot, stride_oh, v_zeroed, GQA, BLOCK_Q, BLOCK_M // 2, BLOCK_N,
                     HEAD_SIZE, SPARSE_BLOCK, STAGES)),
        (_consumer, (q_smem1, BLOCK_M // 2, q_ptr, out_ptr, k_bufs, v_bufs, k_full, v_full, k_empty, v_empty,
                     row_start, pos_start, num_rows, sub, kv_head, seq_len, n_tiles, n_off, idx_row, diag_start,
                     sm_scale_log2, stride_qt, stride_qh, stride_ot, stride_oh, v_zeroed, GQA, BLOCK_Q, BLOCK_M // 2,
                     BLOCK_N, HEAD_SIZE, SPARSE_BLOCK, STAGES)),
        (_producer, (k_desc, v_desc, k_bufs, v_bufs, k_full, v_full, k_empty, v_empty, n_tiles, n_off, idx_row,
                     diag_start, bt_row, kv_head, seq_len, SPARSE_BLOCK, BLOCK_N, PAGE_SIZE, STAGES)),
    ], [4, 1], [240, 24])


def cache_descriptor(cache: torch.Tensor) -> TensorDescriptor:
    """A TMA descriptor over one cache ([pages, page_size, Hkv, D], any strides): boxes of up to a
    tile's keys of one page and head."""
    _, page_size, _, head_size = cache.shape
    box = [1, min(page_size, BLOCK_N), 1, head_size]
    layout = gl.NVMMASharedLayout.get_default_for(box, DTYPES[cache.dtype])
    return TensorDescriptor(cache, list(cache.shape), list(cache.stride()), box, layout)


def sparse_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    qblocks: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    scale: float,
    sparse_block: int,
) -> torch.Tensor:
    """``kernels/attention.sparse_prefill_attention`` on Hopper: same arguments and result."""
    _, num_q_heads, head_size = q.shape
    _, page_size, num_kv_heads, _ = k_cache.shape
    gqa = num_q_heads // num_kv_heads
    reason = unsupported_reason(*kernel_shape(q, k_cache, sparse_block))
    if reason is None and not v_cache.dtype == out.dtype == q.dtype:
        reason = f"V cache dtype {v_cache.dtype} or output dtype {out.dtype} differs from the query's {q.dtype}"
    if reason:
        raise ValueError(f"the Hopper kernel cannot run these rows: {reason}")
    check_head_dim_contiguous(q, out, k_cache, v_cache)
    check_index_inputs(qblocks, block_table, seq_lens, kv_indices, kv_counts, num_kv_heads)
    num_qblocks = qblocks.shape[0]
    if num_qblocks == 0:
        return out
    q, k_cache, v_cache, written = (canonical_strides(t) for t in (q, k_cache, v_cache, out))
    block_q = BLOCK_M // triton.next_power_of_2(gqa)
    grid = (num_qblocks * (sparse_block // block_q), num_kv_heads)
    _hopper_sparse_prefill_kernel[grid](
        q, written, cache_descriptor(k_cache), cache_descriptor(v_cache),
        block_table, seq_lens, qblocks, kv_indices, kv_counts,
        scale * LOG2E,
        q.stride(0), q.stride(1), written.stride(0), written.stride(1),
        block_table.stride(0),
        *list_strides(kv_indices, kv_counts),
        GQA=gqa, BLOCK_Q=block_q, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, HEAD_SIZE=head_size,
        SPARSE_BLOCK=sparse_block, PAGE_SIZE=page_size, STAGES=STAGES, num_warps=4,
    )
    return out
