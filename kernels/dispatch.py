"""Which of our attention kernels computes a layer's sparse rows."""

from __future__ import annotations

from typing import Callable

import torch

from .attention import sparse_prefill_attention


def choose_sparse_kernel(sparse_kernel: str, device: torch.device, dtype: torch.dtype, kv_dtype: torch.dtype,
                         head_size: int, page_size: int, sparse_block: int, gqa: int,
                         hopper_failure: str | None = None) -> tuple[Callable, str | None]:
    """(kernel, why it is not the Hopper one): for ``sparse_kernel`` "auto" and "hopper" (and
    "flash_attn" where FA3 cannot take the rows) the Hopper kernel (kernels/attention_hopper.py)
    where it can run these rows, else the portable one (kernels/attention.py); "triton": always the
    portable one. Both take the same arguments. ``hopper_failure``: why the Hopper kernel failed in
    this process (it then runs no more), or None."""
    if sparse_kernel == "triton":
        return sparse_prefill_attention, "sparse_kernel 'triton' asks for the portable kernel"
    if hopper_failure is not None:
        return sparse_prefill_attention, hopper_failure
    try:
        from . import attention_hopper
    except (ImportError, AttributeError) as e:  # a Triton without Gluon, or with another Gluon API
        return sparse_prefill_attention, f"this Triton's Gluon cannot build it ({type(e).__name__}: {e})"
    reason = attention_hopper.unsupported_reason(device, dtype, kv_dtype, head_size, page_size, sparse_block, gqa)
    if reason is None:
        return attention_hopper.sparse_prefill_attention, None
    return sparse_prefill_attention, reason
