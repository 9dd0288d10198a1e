"""What every kernel file shares: the query-block table's columns, LOG2E and the launchers' checks.

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


def check_head_dim_contiguous(*tensors: torch.Tensor) -> None:
    if any(t.stride(-1) != 1 for t in tensors):
        raise ValueError("the head dimension must be contiguous")


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
