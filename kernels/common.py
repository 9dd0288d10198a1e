"""What every kernel file shares: the query-block table's columns, LOG2E, the fp8 format and the
launchers' checks.

The query-block table is the kernels' unit of work: an int32 tensor [n, QB_COLUMNS], one row per
query block (``vllm_flashprefill/plan.py`` builds it). Kernels read a column as
``tl.load(qblocks_ptr + qblock * QB_COLUMNS + QB_FIRST_POS)``; host code indexes numpy tables with
the same names (they are ``tl.constexpr``, which Triton and Gluon kernels may read as globals).
"""

from __future__ import annotations

import torch
import triton.language as tl

QB_REQUEST = tl.constexpr(0)  # the request's index in the batch (its row of block_table, seq_lens)
QB_FIRST_ROW = tl.constexpr(1)  # the block's first row in the query tensor
QB_FIRST_POS = tl.constexpr(2)  # that row's absolute position in its sequence
QB_ROWS = tl.constexpr(3)  # how many rows of the block this chunk holds
QB_COLUMNS = tl.constexpr(4)

# exp(x) = exp2(x * LOG2E): the attention kernels take their softmax scale in log2 units.
LOG2E = 1.4426950408889634

# The fp8 format q and the KV cache may come in (vLLM's "fp8"/"fp8_e4m3" cache on CUDA), with
# float32 scales: x = x8 * scale.
FP8_DTYPE = torch.float8_e4m3fn
# The dtypes the kernels' dots run in.
TRITON_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def check_head_dim_contiguous(*tensors: torch.Tensor) -> None:
    if any(t.stride(-1) != 1 for t in tensors):
        raise ValueError("the head dimension must be contiguous")


def check_index_table(name: str, t: torch.Tensor, layout: str, contiguity: str = "rows") -> None:
    """``t`` as the kernels read an index table: int32, as many dimensions as ``layout`` names
    (e.g. "[requests, pages]"), and with ``contiguity`` "rows" its last dimension contiguous
    (kernels step through a row by 1), "whole" all of it (kernels compute flat offsets), or "none".
    Host-side metadata only: no device sync."""
    dims = layout.count(",") + 1
    if contiguity == "whole":
        laid_out = t.is_contiguous()
    else:
        laid_out = contiguity == "none" or t.dim() == 0 or t.shape[-1] <= 1 or t.stride(-1) == 1
    if t.dtype != torch.int32 or t.dim() != dims or not laid_out:
        how = {"rows": " with contiguous rows", "whole": ", contiguous", "none": ""}[contiguity]
        raise ValueError(f"{name} must be an int32 {layout} tensor{how}; got {t.dtype} of shape "
                         f"{tuple(t.shape)} with strides {t.stride()}")


def check_index_inputs(qblocks: torch.Tensor, block_table: torch.Tensor | None, seq_lens: torch.Tensor | None = None,
                       kv_indices: torch.Tensor | None = None, kv_counts: torch.Tensor | None = None,
                       num_kv_heads: int | None = None) -> None:
    """The launchers' index inputs as the kernels read them (None: not read): the query-block table,
    vLLM's block table and sequence lengths, and block lists of every query block for 1 or ``num_kv_heads``
    KV heads (any heads when None). A wrong layout gave NaN or read out of bounds; a wrong dtype
    read garbage."""
    columns = QB_COLUMNS.value
    check_index_table("qblocks", qblocks, f"[query blocks, {columns}]", "whole")
    if qblocks.shape[1] != columns:
        raise ValueError(f"qblocks must have {columns} columns (kernels/common.py), not {qblocks.shape[1]}")
    if block_table is not None:
        check_index_table("block_table", block_table, "[requests, pages]")
    if seq_lens is not None:
        check_index_table("seq_lens", seq_lens, "[requests]")
    if kv_indices is None:
        return
    check_index_table("kv_indices", kv_indices, "[query blocks, heads, blocks]")
    check_index_table("kv_counts", kv_counts, "[query blocks, heads]", "none")
    heads = kv_counts.shape[1]
    if (kv_indices.shape[:2] != kv_counts.shape or kv_counts.shape[0] != qblocks.shape[0]
            or (num_kv_heads is not None and heads not in (1, num_kv_heads))):
        raise ValueError(
            f"kv_indices {tuple(kv_indices.shape)} and kv_counts {tuple(kv_counts.shape)} must list the "
            f"{qblocks.shape[0]} query blocks for the same heads"
            + ("" if num_kv_heads is None else f" (1, or one list per KV head: {num_kv_heads})"))


def canonical_strides(t: torch.Tensor) -> torch.Tensor:
    """``t`` (no copy) with the stride of each size-1 dimension set as a contiguous layout would
    set it: the next dimension's extent times its stride (1 for the last dimension). Such a stride
    never addresses an element, so a view may carry any value there (vLLM's KV-cache views with one
    KV head per rank may have 1); TMA descriptors need 16-byte aligned strides, and Triton
    specializes its kernels on stride values."""
    strides = list(t.stride())
    inner = 1
    for dim in reversed(range(t.dim())):
        if t.shape[dim] == 1:
            strides[dim] = inner
        inner = strides[dim] * t.shape[dim]
    return t if strides == list(t.stride()) else t.as_strided(t.shape, strides)


def dot_dtype(q: torch.Tensor) -> torch.dtype:
    """What the kernels' dots run in: q's dtype; for an fp8 q fp16, which holds every e4m3 value
    exactly (and probabilities more precisely than bf16)."""
    return torch.float16 if q.dtype == FP8_DTYPE else q.dtype


def check_dtypes(dtype: torch.dtype, **inputs: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    """Each input (tensor, scale) in ``dtype``, the one the dots run in (``dot_dtype``), or in fp8
    (e4m3) with its scale."""
    if dtype not in TRITON_DTYPES:
        raise ValueError(f"dtype {dtype} not in {list(TRITON_DTYPES)}")
    for name, (x, scale) in inputs.items():
        if x.dtype not in (dtype, FP8_DTYPE):
            raise ValueError(f"{name} dtype {x.dtype}: the kernels take {dtype} here, or {FP8_DTYPE}")
        if (x.dtype == FP8_DTYPE) != (scale is not None):
            raise ValueError(f"{name} is {x.dtype}: a scale comes with fp8 data, and only with it")


def scale_args(num_kv_heads: int, *scales: torch.Tensor | None) -> tuple:
    """Kernel arguments of fp8 scales (float32 tensors of one element or of one per KV head; None
    for 16-bit data): the scales as vectors, then their stride across KV heads (0: one scale)."""
    given = [s for s in scales if s is not None]
    sizes = {s.numel() for s in given}
    if len(sizes) > 1 or not sizes <= {1, num_kv_heads} or any(s.dtype != torch.float32 for s in given):
        raise ValueError(f"fp8 scales must be float32, all of one element or all of one per KV head "
                         f"({num_kv_heads}), not {[(tuple(s.shape), s.dtype) for s in given]}")
    vectors = [None if s is None else s.reshape(-1) for s in scales]
    return (*vectors, 1 if sizes == {num_kv_heads} and num_kv_heads > 1 else 0)


def list_strides(kv_indices: torch.Tensor, kv_counts: torch.Tensor) -> tuple[int, int, int, int]:
    """Strides of the block lists by query block and KV head; 0 across heads for lists that all
    heads share (shape [n, 1, ...])."""
    return (kv_indices.stride(0), kv_indices.stride(1) if kv_indices.shape[1] > 1 else 0,
            kv_counts.stride(0), kv_counts.stride(1) if kv_counts.shape[1] > 1 else 0)


def kernel_shape(query: torch.Tensor, key_cache: torch.Tensor, sparse_block: int) -> tuple:
    """What the choice of attention kernel depends on, from the rows' tensors (query [tokens, Hq,
    D], key cache [pages, page_size, Hkv, D]): the arguments of ``dispatch.choose_sparse_kernel``
    after ``sparse_kernel``, and of ``attention_hopper.unsupported_reason``."""
    return (query.device, query.dtype, key_cache.dtype, query.shape[2], key_cache.shape[1], sparse_block,
            query.shape[1] // key_cache.shape[2])
