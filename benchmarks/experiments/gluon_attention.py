"""Experiment: the block-sparse prefill kernel in Triton's Gluon dialect, with FA3's intra-warpgroup
overlap on Hopper. The QK^T of KV tile j is issued (async wgmma) before the PV of tile j-1, and the
softmax of tile j runs while PV(j-1) is on the tensor cores: ``warpgroup_mma_wait(num_outstanding=1)``,
which the ``tl.dot`` kernel (kernels/attention.py) cannot express. Pages of 64 tokens (one 64-key tile),
K/V tiles by TMA into two-stage rings, bf16, head size 128, GQA-packed rows as in kernels/attention.py.
Written against the GPU image's Triton 3.6 (Gluon's API changes between releases); not used by the
backend.

    python3 benchmarks/experiments/gluon_attention.py --variants 8x64,8x128 --out gluon.json   # on a Hopper GPU

checks each variant against the package's kernel on the same inputs, then times them interleaved
(``--rounds``), the card held at its power limit first. Also usable as
``tune_attention.py --alt-kernel``: same entry point; its ``config`` may give ``num_warps`` (4: one
warpgroup holds all 128 rows; 8: two warpgroups of 64 rows each) and ``block_n`` (keys per tile: one
page of 64 or two).
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma
from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor


@gluon.jit
def _diagonal_tile_start(t, n_off, diag_start, BLOCK_N: gl.constexpr):
    return diag_start + (t - n_off) * BLOCK_N


@gluon.jit
def _tile_position(t, n_off, idx_row, diag_start, SPARSE_BLOCK: gl.constexpr, BLOCK_N: gl.constexpr):
    TILES_PER_BLOCK: gl.constexpr = SPARSE_BLOCK // BLOCK_N
    if t < n_off:
        pos = gl.load(idx_row + t // TILES_PER_BLOCK) * SPARSE_BLOCK + (t % TILES_PER_BLOCK) * BLOCK_N
    else:
        pos = _diagonal_tile_start(t, n_off, diag_start, BLOCK_N)
    return pos


@gluon.jit
def _load_tile(desc, buf, bar, t, n_off, idx_row, diag_start, bt_row, kv_head, seq_len,
               SPARSE_BLOCK: gl.constexpr, BLOCK_N: gl.constexpr, PAGE_SIZE: gl.constexpr):
    """One tile is BLOCK_N // PAGE_SIZE pages, one TMA copy each; pages past the sequence end are not
    copied (their block-table entries may not exist), the buffer keeps stale rows there."""
    PAGES: gl.constexpr = BLOCK_N // PAGE_SIZE
    PAGE_BYTES: gl.constexpr = desc.block_type.nbytes
    pos = _tile_position(t, n_off, idx_row, diag_start, SPARSE_BLOCK, BLOCK_N)
    pages = gl.minimum((seq_len - pos + PAGE_SIZE - 1) // PAGE_SIZE, PAGES)
    for n in gl.static_range(1, PAGES + 1):
        mbarrier.expect(bar, n * PAGE_BYTES, pred=pages == n)
    for i in gl.static_range(PAGES):
        page = gl.load(bt_row + gl.minimum(pos // PAGE_SIZE + i, (seq_len - 1) // PAGE_SIZE))
        tma.async_copy_global_to_shared(desc, [page, 0, kv_head, 0], bar, buf.slice(i, 1), pred=i < pages)


@gluon.jit
def _online_softmax(s, m_i, l_i, key_start, seq_len, q_pos, offs_n, sm_scale_log2, MASKED: gl.constexpr):
    """m_i and the exponents are in log2 units, so the scale folds into one FMA per score."""
    if MASKED:  # the causal mask and the end of the sequence
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
def _tile(bufs, stage, BLOCK_N: gl.constexpr, HEAD_SIZE: gl.constexpr):
    return bufs.index(stage).reshape([BLOCK_N, HEAD_SIZE])


@gluon.jit
def _wait_tile(bars, t, STAGES: gl.constexpr):
    """Tile t sits in slot t % STAGES of its ring, on that slot's (t // STAGES)-th use."""
    mbarrier.wait(bars.index(t % STAGES), (t // STAGES) & 1)


@gluon.jit
def _after_softmax(k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, t, n_tiles, n_off, idx_row, diag_start, bt_row,
                   kv_head, seq_len, SPARSE_BLOCK: gl.constexpr, BLOCK_N: gl.constexpr, PAGE_SIZE: gl.constexpr,
                   HEAD_SIZE: gl.constexpr, NUM_WARPS: gl.constexpr, STAGES: gl.constexpr, MASKED: gl.constexpr):
    """Zero V rows past the sequence end in a diagonal tile (they may hold anything, NaN too, and P is 0
    there), then refill the slots that are free: tile t's K (its QK^T is done) with tile t + STAGES, and
    tile t-1's V (its PV is done) with tile t + STAGES - 1."""
    stage = t % STAGES
    if MASKED:
        io_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [NUM_WARPS, 1], [1, 0])
        v_buf = _tile(v_bufs, stage, BLOCK_N, HEAD_SIZE)
        _wait_tile(v_bars, t, STAGES)
        rows = _tile_position(t, n_off, idx_row, diag_start, SPARSE_BLOCK, BLOCK_N)
        rows += gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, io_layout))
        v = v_buf.load(io_layout)
        v_buf.store(gl.where(gl.expand_dims(rows < seq_len, 1), v, 0.0))
        fence_async_shared()
    gl.thread_barrier()
    if t + STAGES < n_tiles:
        _load_tile(k_desc, k_bufs.index(stage), k_bars.index(stage), t + STAGES, n_off, idx_row, diag_start, bt_row,
                   kv_head, seq_len, SPARSE_BLOCK, BLOCK_N, PAGE_SIZE)
    if t + STAGES - 1 < n_tiles:
        v_stage = (t + STAGES - 1) % STAGES
        _load_tile(v_desc, v_bufs.index(v_stage), v_bars.index(v_stage), t + STAGES - 1, n_off, idx_row, diag_start,
                   bt_row, kv_head, seq_len, SPARSE_BLOCK, BLOCK_N, PAGE_SIZE)


@gluon.jit
def _attend_tile(t, acc, p, m_i, l_i, q_smem, k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, n_tiles, n_off, idx_row,
                 diag_start, bt_row, kv_head, seq_len, q_pos, offs_n, sm_scale_log2,
                 SPARSE_BLOCK: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, PAGE_SIZE: gl.constexpr,
                 HEAD_SIZE: gl.constexpr, NUM_WARPS: gl.constexpr, STAGES: gl.constexpr, S_LAYOUT: gl.constexpr,
                 O_LAYOUT: gl.constexpr, P_LAYOUT: gl.constexpr, MASKED: gl.constexpr):
    """QK^T of tile t, then PV of tile t-1 behind it: PV runs on the tensor cores during tile t's softmax."""
    _wait_tile(k_bars, t, STAGES)
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, S_LAYOUT)
    s_tok = warpgroup_mma(q_smem, _tile(k_bufs, t % STAGES, BLOCK_N, HEAD_SIZE).permute((1, 0)), zero_s,
                          use_acc=False, is_async=True)
    _wait_tile(v_bars, t - 1, STAGES)
    acc_tok = warpgroup_mma(p, _tile(v_bufs, (t - 1) % STAGES, BLOCK_N, HEAD_SIZE), acc, is_async=True)
    s = warpgroup_mma_wait(num_outstanding=1, deps=[s_tok])
    key_start = 0
    if MASKED:
        key_start = _tile_position(t, n_off, idx_row, diag_start, SPARSE_BLOCK, BLOCK_N)
    p_f32, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, key_start, seq_len, q_pos, offs_n, sm_scale_log2, MASKED)
    acc, p = warpgroup_mma_wait(num_outstanding=0, deps=[acc_tok, p])
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, O_LAYOUT)), 1)
    p = gl.convert_layout(p_f32.to(gl.bfloat16), P_LAYOUT)
    _after_softmax(k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, t, n_tiles, n_off, idx_row, diag_start, bt_row,
                   kv_head, seq_len, SPARSE_BLOCK, BLOCK_N, PAGE_SIZE, HEAD_SIZE, NUM_WARPS, STAGES, MASKED)
    return acc, p, m_i, l_i


@gluon.jit
def _gluon_sparse_prefill_kernel(
    q_ptr, out_ptr, k_desc, v_desc,
    block_table_ptr, seq_lens_ptr, qblocks_ptr, kv_indices_ptr, kv_counts_ptr,
    sm_scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_bt, stride_ii, stride_ih, stride_ci, stride_ch,
    GQA: gl.constexpr, BLOCK_Q: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    HEAD_SIZE: gl.constexpr, SPARSE_BLOCK: gl.constexpr, PAGE_SIZE: gl.constexpr, NUM_WARPS: gl.constexpr,
    STAGES: gl.constexpr,
):
    SUB_TILES: gl.constexpr = SPARSE_BLOCK // BLOCK_Q
    pid = gl.num_programs(0) - 1 - gl.program_id(0)
    kv_head = gl.program_id(1)
    qblock = pid // SUB_TILES
    sub = pid % SUB_TILES
    req = gl.load(qblocks_ptr + qblock * 4)
    row_start = gl.load(qblocks_ptr + qblock * 4 + 1)
    pos_start = gl.load(qblocks_ptr + qblock * 4 + 2)
    num_rows = gl.load(qblocks_ptr + qblock * 4 + 3)
    if sub * BLOCK_Q < num_rows:
        seq_len = gl.load(seq_lens_ptr + req)

        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                           instr_shape=[16, HEAD_SIZE, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        io_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [NUM_WARPS, 1], [1, 0])
        q_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_SIZE], gl.bfloat16)
        PAGES: gl.constexpr = BLOCK_N // PAGE_SIZE

        # Q rows (token-major: row r is token r // GQA, head r % GQA) -> shared memory, once.
        offs_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, io_layout))
        offs_d = gl.arange(0, HEAD_SIZE, layout=gl.SliceLayout(0, io_layout))
        token = sub * BLOCK_Q + offs_m // GQA
        head = kv_head * GQA + offs_m % GQA
        row_ok = (offs_m < BLOCK_Q * GQA) & (token < num_rows)
        q_off = (row_start + token).to(gl.int64) * stride_qt + head * stride_qh
        q = gl.load(q_ptr + gl.expand_dims(q_off, 1) + gl.expand_dims(offs_d, 0),
                    mask=gl.expand_dims(row_ok, 1), other=0.0)
        q_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_M, HEAD_SIZE], q_smem_layout, q)

        k_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, PAGES, PAGE_SIZE, 1, HEAD_SIZE], k_desc.layout)
        v_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, PAGES, PAGE_SIZE, 1, HEAD_SIZE], v_desc.layout)
        k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(k_bars.index(i), count=1)
            mbarrier.init(v_bars.index(i), count=1)
        fence_async_shared()

        bt_row = block_table_ptr + req.to(gl.int64) * stride_bt
        idx_row = kv_indices_ptr + qblock.to(gl.int64) * stride_ii + kv_head * stride_ih
        count = gl.load(kv_counts_ptr + qblock * stride_ci + kv_head * stride_ch)
        n_off = (count - 1) * (SPARSE_BLOCK // BLOCK_N)
        diag_start = (pos_start // SPARSE_BLOCK) * SPARSE_BLOCK
        last_pos = pos_start + gl.minimum(num_rows, (sub + 1) * BLOCK_Q) - 1
        n_tiles = n_off + (last_pos - diag_start) // BLOCK_N + 1

        for i in gl.static_range(STAGES):  # the rings' first fill: K of tiles 0..STAGES-1, V one behind
            if i < n_tiles:
                _load_tile(k_desc, k_bufs.index(i), k_bars.index(i), i, n_off, idx_row, diag_start, bt_row, kv_head,
                           seq_len, SPARSE_BLOCK, BLOCK_N, PAGE_SIZE)
            if (i < STAGES - 1) & (i < n_tiles):
                _load_tile(v_desc, v_bufs.index(i), v_bars.index(i), i, n_off, idx_row, diag_start, bt_row, kv_head,
                           seq_len, SPARSE_BLOCK, BLOCK_N, PAGE_SIZE)

        q_pos = pos_start + sub * BLOCK_Q + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout)) // GQA
        offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
        acc = gl.zeros([BLOCK_M, HEAD_SIZE], gl.float32, o_layout)

        # Tile 0: QK^T and softmax only (nothing to multiply by V yet); masked, whichever kind it is.
        _wait_tile(k_bars, 0, STAGES)
        s_tok = warpgroup_mma(q_smem, _tile(k_bufs, 0, BLOCK_N, HEAD_SIZE).permute((1, 0)),
                              gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=[s_tok])
        key_start = _tile_position(0, n_off, idx_row, diag_start, SPARSE_BLOCK, BLOCK_N)
        p_f32, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, key_start, seq_len, q_pos, offs_n, sm_scale_log2, True)
        p = gl.convert_layout(p_f32.to(gl.bfloat16), p_layout)
        _after_softmax(k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, 0, n_tiles, n_off, idx_row, diag_start,
                       bt_row, kv_head, seq_len, SPARSE_BLOCK, BLOCK_N, PAGE_SIZE, HEAD_SIZE, NUM_WARPS, STAGES, True)

        # The off-diagonal tiles need no mask; the diagonal ones (and the sequence end) do.
        for t in range(1, n_off):
            acc, p, m_i, l_i = _attend_tile(t, acc, p, m_i, l_i, q_smem, k_desc, v_desc, k_bufs, v_bufs, k_bars,
                                            v_bars, n_tiles, n_off, idx_row, diag_start, bt_row, kv_head, seq_len,
                                            q_pos, offs_n, sm_scale_log2, SPARSE_BLOCK, BLOCK_M, BLOCK_N, PAGE_SIZE,
                                            HEAD_SIZE, NUM_WARPS, STAGES, s_layout, o_layout, p_layout, False)
        for t in range(gl.maximum(n_off, 1), n_tiles):
            acc, p, m_i, l_i = _attend_tile(t, acc, p, m_i, l_i, q_smem, k_desc, v_desc, k_bufs, v_bufs, k_bars,
                                            v_bars, n_tiles, n_off, idx_row, diag_start, bt_row, kv_head, seq_len,
                                            q_pos, offs_n, sm_scale_log2, SPARSE_BLOCK, BLOCK_M, BLOCK_N, PAGE_SIZE,
                                            HEAD_SIZE, NUM_WARPS, STAGES, s_layout, o_layout, p_layout, True)

        _wait_tile(v_bars, n_tiles - 1, STAGES)
        acc = warpgroup_mma(p, _tile(v_bufs, (n_tiles - 1) % STAGES, BLOCK_N, HEAD_SIZE), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(k_bars.index(i))
            mbarrier.invalidate(v_bars.index(i))

        out = acc / gl.expand_dims(gl.convert_layout(l_i, gl.SliceLayout(1, o_layout)), 1)
        out = gl.convert_layout(out.to(gl.bfloat16), io_layout)
        o_off = (row_start + token).to(gl.int64) * stride_ot + head * stride_oh
        gl.store(out_ptr + gl.expand_dims(o_off, 1) + gl.expand_dims(offs_d, 0), out,
                 mask=gl.expand_dims(row_ok, 1))


@gluon.jit
def _produce_tile(desc, bufs, full, empty, t, n_off, idx_row, diag_start, bt_row, kv_head, seq_len,
                  SPARSE_BLOCK: gl.constexpr, BLOCK_N: gl.constexpr, PAGE_SIZE: gl.constexpr, STAGES: gl.constexpr):
    slot = t % STAGES
    if t >= STAGES:  # both consumers have released the slot's previous tile
        mbarrier.wait(empty.index(slot), (t // STAGES - 1) & 1)
    _load_tile(desc, bufs.index(slot), full.index(slot), t, n_off, idx_row, diag_start, bt_row, kv_head, seq_len,
               SPARSE_BLOCK, BLOCK_N, PAGE_SIZE)


@gluon.jit
def _producer(k_desc, v_desc, k_bufs, v_bufs, k_full, v_full, k_empty, v_empty, n_tiles, n_off, idx_row,
              diag_start, bt_row, kv_head, seq_len,
              SPARSE_BLOCK: gl.constexpr, BLOCK_N: gl.constexpr, PAGE_SIZE: gl.constexpr, STAGES: gl.constexpr):
    """One warp: K of tile t, then V of tile t-1, the order in which the consumers need them."""
    for t in range(n_tiles):
        _produce_tile(k_desc, k_bufs, k_full, k_empty, t, n_off, idx_row, diag_start, bt_row, kv_head, seq_len,
                      SPARSE_BLOCK, BLOCK_N, PAGE_SIZE, STAGES)
        if t > 0:
            _produce_tile(v_desc, v_bufs, v_full, v_empty, t - 1, n_off, idx_row, diag_start, bt_row, kv_head,
                          seq_len, SPARSE_BLOCK, BLOCK_N, PAGE_SIZE, STAGES)
    if n_tiles > 0:
        _produce_tile(v_desc, v_bufs, v_full, v_empty, n_tiles - 1, n_off, idx_row, diag_start, bt_row, kv_head,
                      seq_len, SPARSE_BLOCK, BLOCK_N, PAGE_SIZE, STAGES)


@gluon.jit
def _consume_tile(t, acc, p, m_i, l_i, q_smem, k_bufs, v_bufs, k_full, v_full, k_empty, v_empty, n_off, idx_row,
                  diag_start, seq_len, q_pos, offs_n, sm_scale_log2,
                  SPARSE_BLOCK: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_SIZE: gl.constexpr,
                  STAGES: gl.constexpr, S_LAYOUT: gl.constexpr, O_LAYOUT: gl.constexpr, P_LAYOUT: gl.constexpr,
                  MASKED: gl.constexpr):
    """QK^T of tile t, then PV of tile t-1 behind it; each slot is released once its MMA is done."""
    _wait_tile(k_full, t, STAGES)
    s_tok = warpgroup_mma(q_smem, _tile(k_bufs, t % STAGES, BLOCK_N, HEAD_SIZE).permute((1, 0)),
                          gl.zeros([ROWS, BLOCK_N], gl.float32, S_LAYOUT), use_acc=False, is_async=True)
    _wait_tile(v_full, t - 1, STAGES)
    acc_tok = warpgroup_mma(p, _tile(v_bufs, (t - 1) % STAGES, BLOCK_N, HEAD_SIZE), acc, is_async=True)
    s = warpgroup_mma_wait(num_outstanding=1, deps=[s_tok])
    mbarrier.arrive(k_empty.index(t % STAGES))
    key_start = 0
    if MASKED:
        key_start = _tile_position(t, n_off, idx_row, diag_start, SPARSE_BLOCK, BLOCK_N)
    p_f32, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, key_start, seq_len, q_pos, offs_n, sm_scale_log2, MASKED)
    acc, p = warpgroup_mma_wait(num_outstanding=0, deps=[acc_tok, p])
    mbarrier.arrive(v_empty.index((t - 1) % STAGES))
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, O_LAYOUT)), 1)
    p = gl.convert_layout(p_f32.to(gl.bfloat16), P_LAYOUT)
    return acc, p, m_i, l_i


@gluon.jit
def _consumer(q_smem, row_base, q_ptr, out_ptr, k_bufs, v_bufs, k_full, v_full, k_empty, v_empty, row_start,
              pos_start, num_rows, sub, kv_head, seq_len, n_tiles, n_off, idx_row, diag_start, sm_scale_log2,
              stride_qt, stride_qh, stride_ot, stride_oh,
              GQA: gl.constexpr, BLOCK_Q: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_SIZE: gl.constexpr,
              SPARSE_BLOCK: gl.constexpr, STAGES: gl.constexpr):
    """One warpgroup: 64 of the program's 128 query rows (from ``row_base``), over all of its tiles."""
    ROWS: gl.constexpr = 64
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_SIZE, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    io_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])

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
        gl.thread_barrier()

        q_pos = pos_start + sub * BLOCK_Q + (row_base + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))) // GQA
        offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        m_i = gl.full([ROWS], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([ROWS], gl.float32, gl.SliceLayout(1, s_layout))
        acc = gl.zeros([ROWS, HEAD_SIZE], gl.float32, o_layout)

        # Tile 0: QK^T and softmax only; masked, whichever kind it is.
        _wait_tile(k_full, 0, STAGES)
        s_tok = warpgroup_mma(q_smem, _tile(k_bufs, 0, BLOCK_N, HEAD_SIZE).permute((1, 0)),
                              gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=[s_tok])
        mbarrier.arrive(k_empty.index(0))
        key_start = _tile_position(0, n_off, idx_row, diag_start, SPARSE_BLOCK, BLOCK_N)
        p_f32, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, key_start, seq_len, q_pos, offs_n, sm_scale_log2, True)
        p = gl.convert_layout(p_f32.to(gl.bfloat16), p_layout)

        for t in range(1, n_off):
            acc, p, m_i, l_i = _consume_tile(t, acc, p, m_i, l_i, q_smem, k_bufs, v_bufs, k_full, v_full, k_empty,
                                             v_empty, n_off, idx_row, diag_start, seq_len, q_pos, offs_n,
                                             sm_scale_log2, SPARSE_BLOCK, ROWS, BLOCK_N, HEAD_SIZE, STAGES, s_layout,
                                             o_layout, p_layout, False)
        for t in range(gl.maximum(n_off, 1), n_tiles):
            acc, p, m_i, l_i = _consume_tile(t, acc, p, m_i, l_i, q_smem, k_bufs, v_bufs, k_full, v_full, k_empty,
                                             v_empty, n_off, idx_row, diag_start, seq_len, q_pos, offs_n,
                                             sm_scale_log2, SPARSE_BLOCK, ROWS, BLOCK_N, HEAD_SIZE, STAGES, s_layout,
                                             o_layout, p_layout, True)

        # The last tile is the only one that may reach past the sequence end: zero V there (P is 0 there,
        # the rows may hold anything). Both consumers write the same zeros.
        last = n_tiles - 1
        _wait_tile(v_full, last, STAGES)
        v_buf = _tile(v_bufs, last % STAGES, BLOCK_N, HEAD_SIZE)
        rows = _tile_position(last, n_off, idx_row, diag_start, SPARSE_BLOCK, BLOCK_N)
        rows += gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, io_layout))
        v_buf.store(gl.where(gl.expand_dims(rows < seq_len, 1), v_buf.load(io_layout), 0.0))
        fence_async_shared()
        gl.thread_barrier()
        acc = warpgroup_mma(p, v_buf, acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])

        out = acc / gl.expand_dims(gl.convert_layout(l_i, gl.SliceLayout(1, o_layout)), 1)
        out = gl.convert_layout(out.to(gl.bfloat16), io_layout)
        o_off = (row_start + token).to(gl.int64) * stride_ot + head * stride_oh
        gl.store(out_ptr + gl.expand_dims(o_off, 1) + gl.expand_dims(offs_d, 0), out,
                 mask=gl.expand_dims(row_ok, 1))


@gluon.jit
def _gluon_ws_sparse_prefill_kernel(
    q_ptr, out_ptr, k_desc, v_desc,
    block_table_ptr, seq_lens_ptr, qblocks_ptr, kv_indices_ptr, kv_counts_ptr,
    sm_scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_bt, stride_ii, stride_ih, stride_ci, stride_ch,
    GQA: gl.constexpr, BLOCK_Q: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    HEAD_SIZE: gl.constexpr, SPARSE_BLOCK: gl.constexpr, PAGE_SIZE: gl.constexpr, STAGES: gl.constexpr,
    CONSUMER_REGS: gl.constexpr,
):
    """FA3's structure: a producer warp fills the K/V rings by TMA; two consumer warpgroups of 64 rows
    each run the tile loop of ``_gluon_sparse_prefill_kernel`` independently, releasing ring slots
    through mbarriers instead of a CTA-wide barrier per tile."""
    SUB_TILES: gl.constexpr = SPARSE_BLOCK // BLOCK_Q
    PAGES: gl.constexpr = BLOCK_N // PAGE_SIZE
    pid = gl.num_programs(0) - 1 - gl.program_id(0)
    kv_head = gl.program_id(1)
    qblock = pid // SUB_TILES
    sub = pid % SUB_TILES
    req = gl.load(qblocks_ptr + qblock * 4)
    row_start = gl.load(qblocks_ptr + qblock * 4 + 1)
    pos_start = gl.load(qblocks_ptr + qblock * 4 + 2)
    num_rows = gl.load(qblocks_ptr + qblock * 4 + 3)
    seq_len = gl.load(seq_lens_ptr + req)
    bt_row = block_table_ptr + req.to(gl.int64) * stride_bt
    idx_row = kv_indices_ptr + qblock.to(gl.int64) * stride_ii + kv_head * stride_ih
    count = gl.load(kv_counts_ptr + qblock * stride_ci + kv_head * stride_ch)
    n_off = (count - 1) * (SPARSE_BLOCK // BLOCK_N)
    diag_start = (pos_start // SPARSE_BLOCK) * SPARSE_BLOCK
    last_pos = pos_start + gl.minimum(num_rows, (sub + 1) * BLOCK_Q) - 1
    n_tiles = gl.where(sub * BLOCK_Q < num_rows, n_off + (last_pos - diag_start) // BLOCK_N + 1, 0)

    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M // 2, HEAD_SIZE], gl.bfloat16)
    q_smem0 = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_M // 2, HEAD_SIZE], q_layout)
    q_smem1 = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_M // 2, HEAD_SIZE], q_layout)
    k_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, PAGES, PAGE_SIZE, 1, HEAD_SIZE], k_desc.layout)
    v_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, PAGES, PAGE_SIZE, 1, HEAD_SIZE], v_desc.layout)
    k_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(k_full.index(i), count=1)
        mbarrier.init(v_full.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)
        mbarrier.init(v_empty.index(i), count=2)
    fence_async_shared()

    gl.warp_specialize([
        (_consumer, (q_smem0, 0, q_ptr, out_ptr, k_bufs, v_bufs, k_full, v_full, k_empty, v_empty, row_start,
                     pos_start, num_rows, sub, kv_head, seq_len, n_tiles, n_off, idx_row, diag_start, sm_scale_log2,
                     stride_qt, stride_qh, stride_ot, stride_oh, GQA, BLOCK_Q, BLOCK_N, HEAD_SIZE, SPARSE_BLOCK,
                     STAGES)),
        (_consumer, (q_smem1, BLOCK_M // 2, q_ptr, out_ptr, k_bufs, v_bufs, k_full, v_full, k_empty, v_empty,
                     row_start, pos_start, num_rows, sub, kv_head, seq_len, n_tiles, n_off, idx_row, diag_start,
                     sm_scale_log2, stride_qt, stride_qh, stride_ot, stride_oh, GQA, BLOCK_Q, BLOCK_N, HEAD_SIZE,
                     SPARSE_BLOCK, STAGES)),
        (_producer, (k_desc, v_desc, k_bufs, v_bufs, k_full, v_full, k_empty, v_empty, n_tiles, n_off, idx_row,
                     diag_start, bt_row, kv_head, seq_len, SPARSE_BLOCK, BLOCK_N, PAGE_SIZE, STAGES)),
    ], [4, 1], [CONSUMER_REGS, 24])


def tile_layout(head_size: int):
    return gl.NVMMASharedLayout.get_default_for([1, 64, 1, head_size], gl.bfloat16)


def sparse_prefill_attention(q, k_cache, v_cache, out, block_table, seq_lens, qblocks, kv_indices, kv_counts,
                             scale, sparse_block, config=None):
    """``kernels/attention.sparse_prefill_attention`` for bf16, head size 128, pages of 64; of ``config``
    only ``num_warps`` (4 or 8), ``block_n`` (64 or 128), ``stages`` and ``warp_specialized`` (a producer
    warp and two consumer warpgroups; ``num_warps`` is then ignored) are read."""
    num_tokens, num_q_heads, head_size = q.shape
    _, page_size, num_kv_heads, _ = k_cache.shape
    gqa = num_q_heads // num_kv_heads
    if q.dtype != torch.bfloat16 or head_size != 128 or page_size != 64 or sparse_block % 64:
        raise ValueError("the Gluon experiment covers bf16, head size 128, pages of 64")
    num_warps = (config or {}).get("num_warps", 8)
    block_n = (config or {}).get("block_n", 128)
    stages = (config or {}).get("stages", 2)
    if sparse_block % block_n:
        raise ValueError(f"block_n {block_n} must divide the sparse block {sparse_block}")
    block_q = 128 // triton.next_power_of_2(gqa)
    k_desc, v_desc = (TensorDescriptor(c, list(c.shape), list(c.stride()), [1, 64, 1, head_size],
                                       tile_layout(head_size)) for c in (k_cache, v_cache))
    grid = (qblocks.shape[0] * (sparse_block // block_q), num_kv_heads)
    args = (q, out, k_desc, v_desc, block_table, seq_lens, qblocks, kv_indices, kv_counts,
            scale * 1.4426950408889634,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            block_table.stride(0),
            kv_indices.stride(0), kv_indices.stride(1) if kv_indices.shape[1] > 1 else 0,
            kv_counts.stride(0), kv_counts.stride(1) if kv_counts.shape[1] > 1 else 0)
    shape = dict(GQA=gqa, BLOCK_Q=block_q, BLOCK_M=128, BLOCK_N=block_n, HEAD_SIZE=head_size,
                 SPARSE_BLOCK=sparse_block, PAGE_SIZE=64, STAGES=stages)
    if (config or {}).get("warp_specialized"):
        _gluon_ws_sparse_prefill_kernel[grid](*args, **shape, CONSUMER_REGS=240, num_warps=4)
    else:
        _gluon_sparse_prefill_kernel[grid](*args, **shape, NUM_WARPS=num_warps, num_warps=num_warps)
    return out


def main() -> None:
    import argparse
    import json
    import statistics
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from common import bootstrap, causal_flops, static_pattern_prompt  # benchmarks/common.py
    from plotting import plot_result_file

    bootstrap()
    from vllm_flashprefill.kernels.attention import sparse_prefill_attention as package_kernel

    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="32800:hybrid,32768:hybrid,131072:hybrid,16384:dense", help="tokens:pattern,...")
    ap.add_argument("--variants", default="8x128x3,wsx128x2,wsx128x3",
                    help="Gluon variants to run: num_warps x block_n x stages (num_warps 'ws': warp-specialized)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup-ms", type=int, default=1500)
    ap.add_argument("--rep-ms", type=int, default=600)
    ap.add_argument("--out", default=None)
    ap.add_argument("--dump-cubins", type=Path, help="keep each compiled Gluon variant's binary here "
                    "(for kernel_sass.py --cubin)")
    args = ap.parse_args()
    impls = {"triton": (package_kernel, None)}
    for variant in args.variants.split(","):
        warps, block_n, stages = variant.split("x")
        cfg = dict(block_n=int(block_n), stages=int(stages), warp_specialized=warps == "ws")
        if warps != "ws":
            cfg["num_warps"] = int(warps)
        impls[f"gluon, {warps} warps, {block_n} keys, {stages} stages"] = (sparse_prefill_attention, cfg)
    rows = []
    for case in args.cases.split(","):
        seq_len, pattern = case.split(":")
        p = static_pattern_prompt(int(seq_len), 32, 8, 128, 64, pattern, 128, torch.bfloat16, "cuda")
        call = (p.block_table, p.seq_lens, p.qblocks.table, p.kv_indices, p.kv_counts, 128**-0.5, 128)
        reference = torch.empty_like(p.q)
        package_kernel(p.q, p.k_cache, p.v_cache, reference, *call)
        out = torch.empty_like(p.q)
        times = {name: [] for name in impls}
        diffs = {}
        for name, (fn, cfg) in impls.items():
            out.fill_(float("nan"))
            fn(p.q, p.k_cache, p.v_cache, out, *call, cfg)
            diffs[name] = float((out.float() - reference.float()).abs().nan_to_num(float("inf")).max())
        for _ in range(args.rounds):
            for name, (fn, cfg) in impls.items():
                times[name].append(triton.testing.do_bench(
                    lambda fn=fn, cfg=cfg: fn(p.q, p.k_cache, p.v_cache, out, *call, cfg),
                    warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median"))
        flops = p.density * causal_flops(32, 128, int(seq_len))
        for name in impls:
            ms = statistics.median(times[name])
            rows.append(dict(impl=name, seq_len=int(seq_len), pattern=pattern, density=p.density, ms=ms,
                             rounds_ms=times[name], tflops=flops / ms / 1e9, max_abs_diff_vs_triton=diffs[name]))
            print(rows[-1], flush=True)
    if args.dump_cubins:
        args.dump_cubins.mkdir(parents=True, exist_ok=True)
        for kernel in (_gluon_sparse_prefill_kernel, _gluon_ws_sparse_prefill_kernel):
            for compiled in (c for cache in kernel.device_caches.values() for c in cache[0].values()):
                name = f"{kernel.fn.__name__}-{compiled.metadata.num_warps}warps-{compiled.metadata.shared}B.cubin"
                (args.dump_cubins / name).write_bytes(compiled.asm["cubin"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(card=torch.cuda.get_device_name(), triton=triton.__version__, torch=torch.__version__,
                           settings=vars(args), rows=rows), f, indent=1, default=str)
        plot_result_file(args.out)


if __name__ == "__main__":
    main()
