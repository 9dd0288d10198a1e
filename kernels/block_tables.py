"""Block lists -> FA3 block tables (Triton): one table per (KV-head group, query block).

For ``sparse_kernel: flash_attn`` every query block becomes one FA3 sequence whose block table
lists the KV pages of its selected sparse blocks, in list order (ascending, so the diagonal block
comes last), and whose key count stops after the query block's last row. Written straight into
caller-owned buffers, so a layer that selects its blocks on the fly (``dynamic``) allocates
nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import QB_COLUMNS, QB_FIRST_POS, QB_REQUEST, QB_ROWS, check_index_inputs, check_index_table

_SLOTS = 64


# Strides follow the step's shape (query blocks, pages per request): not specialized, so that
# every step reuses the one compiled kernel.
@triton.jit(do_not_specialize=["request_pages", "stride_bt", "stride_ii", "stride_ih", "stride_ci",
                               "stride_ch", "stride_th", "stride_tq", "stride_uh"])
def _block_tables_kernel(
    indices_ptr, counts_ptr, qblocks_ptr, block_table_ptr, tables_ptr, seqused_ptr,
    request_pages, stride_bt, stride_ii, stride_ih, stride_ci, stride_ch,
    stride_th, stride_tq, stride_uh,
    SPARSE_BLOCK: tl.constexpr, PAGES_PER_BLOCK: tl.constexpr, SLOTS: tl.constexpr,
):
    qblock = tl.program_id(0)
    head = tl.program_id(1)
    row = qblocks_ptr + qblock * QB_COLUMNS
    request = tl.load(row + QB_REQUEST)
    last_pos = tl.load(row + QB_FIRST_POS) + tl.load(row + QB_ROWS) - 1
    count = tl.load(counts_ptr + qblock * stride_ci + head * stride_ch)
    indices = indices_ptr + qblock.to(tl.int64) * stride_ii + head * stride_ih
    pages_of_request = block_table_ptr + request.to(tl.int64) * stride_bt
    table = tables_ptr + head.to(tl.int64) * stride_th + qblock.to(tl.int64) * stride_tq
    for start in range(0, count, SLOTS):
        slot = start + tl.arange(0, SLOTS)
        listed = slot < count
        kv_block = tl.load(indices + slot, mask=listed, other=0)
        for p in tl.static_range(PAGES_PER_BLOCK):
            page_index = kv_block * PAGES_PER_BLOCK + p
            # The diagonal block's later pages may lie past the request's table: never read, so
            # page 0 (always a valid page) stands in.
            page = tl.load(pages_of_request + page_index, mask=listed & (page_index < request_pages),
                           other=0)
            tl.store(table + slot * PAGES_PER_BLOCK + p, page, mask=listed)
    diagonal_keys = last_pos % SPARSE_BLOCK + 1
    tl.store(seqused_ptr + head * stride_uh + qblock, (count - 1) * SPARSE_BLOCK + diagonal_keys)


def sparse_block_tables(
    qblocks: torch.Tensor,
    block_table: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    sparse_block: int,
    page_size: int,
    tables: torch.Tensor | None = None,
    seqused: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per KV-head group h and query block i: ``tables[h, i]``, the pages of its listed KV blocks,
    and ``seqused[h, i]``, how many keys of them it attends to.

    qblocks: the query-block table (kernels/common.py); block_table: vLLM's [requests, pages] int32;
    kv_indices [n, H, L] and kv_counts [n, H] int32 (H = 1 when all heads share the lists).
    tables [H, n, >= L * pages per block] and seqused [H, n] int32 are written when given (slots
    past a count keep what they held: FA3 reads no page past ``seqused``), else zero-filled.
    Every count is at least 1: each list holds its diagonal block.
    """
    if sparse_block % page_size:
        raise ValueError(f"sparse block {sparse_block} is not a multiple of the page size {page_size}")
    # Tables for the first query blocks, as many as are listed.
    check_index_inputs(qblocks[:kv_indices.shape[0]], block_table, kv_indices=kv_indices, kv_counts=kv_counts)
    for name, given, layout in (("tables", tables, "[heads, query blocks, pages]"),
                                ("seqused", seqused, "[heads, query blocks]")):
        if given is not None:
            check_index_table(name, given, layout)
    per_block = sparse_block // page_size
    n, heads, width = kv_indices.shape
    if tables is None:
        tables = torch.zeros(heads, n, width * per_block, dtype=torch.int32, device=kv_indices.device)
    if seqused is None:
        seqused = torch.zeros(heads, n, dtype=torch.int32, device=kv_indices.device)
    if tables.shape[:2] != (heads, n) or tables.shape[2] < width * per_block:
        raise ValueError(f"tables {tuple(tables.shape)} cannot hold {heads}x{n}x{width * per_block} pages")
    if n:
        _block_tables_kernel[(n, heads)](
            kv_indices, kv_counts, qblocks, block_table, tables, seqused,
            block_table.shape[1], block_table.stride(0), kv_indices.stride(0), kv_indices.stride(1),
            kv_counts.stride(0), kv_counts.stride(1), tables.stride(0), tables.stride(1),
            seqused.stride(0),
            SPARSE_BLOCK=sparse_block, PAGES_PER_BLOCK=per_block, SLOTS=_SLOTS, num_warps=1,
        )
    return tables, seqused
