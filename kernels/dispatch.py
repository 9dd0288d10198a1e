"""Which of our attention kernels computes a layer's sparse rows."""

from __future__ import annotations

from typing import Callable

import torch

from vllm_flashprefill.kernels.attention import sparse_prefill_attention

# Why the Hopper kernel may not run in this process any more (it failed to build or run), or None.
_hopper_failure: str | None = None


def disable_hopper_kernel(reason: str) -> None:
    """The portable kernel from now on, in this process: the Hopper kernel failed (e.g. a Triton
    release whose Gluon API it does not know)."""
    global _hopper_failure
    _hopper_failure = reason


def kernel_shape(query: torch.Tensor, key_cache: torch.Tensor, sparse_block: int) -> tuple:
    """What the choice depends on, from the rows' tensors (query [tokens, Hq, D], key cache [pages,
    page_size, Hkv, D]): the arguments of ``choose_sparse_kernel`` after ``sparse_kernel``, and of
    ``attention_hopper.unsupported_reason``."""
    return (query.device, query.dtype, key_cache.dtype, query.shape[2], key_cache.shape[1], sparse_block,
            query.shape[1] // key_cache.shape[2])


def choose_sparse_kernel(sparse_kernel: str, device: torch.device, dtype: torch.dtype, kv_dtype: torch.dtype,
                         head_size: int, page_size: int, sparse_block: int,
                         gqa: int) -> tuple[Callable, str | None]:
    """(kernel, why it is not the Hopper one): for ``sparse_kernel`` "auto" and "hopper" (and
    "flash_attn" where FA3 cannot take the rows) the Hopper kernel (kernels/attention_hopper.py)
    where it can run these rows, else the portable one (kernels/attention.py); "triton": always the
    portable one. Both take the same arguments."""
    if sparse_kernel == "triton":
        return sparse_prefill_attention, "sparse_kernel 'triton' asks for the portable kernel"
    if _hopper_failure is not None:
        return sparse_prefill_attention, _hopper_failure
    try:
        from vllm_flashprefill.kernels import attention_hopper
    except (ImportError, AttributeError) as e:  # a Triton without Gluon, or with another Gluon API
        return sparse_prefill_attention, f"this Triton's Gluon cannot build it ({type(e).__name__}: {e})"
    reason = attention_hopper.unsupported_reason(device, dtype, kv_dtype, head_size, page_size, sparse_block, gqa)
    if reason is None:
        return attention_hopper.sparse_prefill_attention, None
    return sparse_prefill_attention, reason
