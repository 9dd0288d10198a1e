"""Everything that differs between the vLLM versions we support (>=0.26, <0.34)."""

from __future__ import annotations

import dataclasses
import threading
from enum import Enum

import numpy as np
import torch


def add_backend_member(enum_cls: type[Enum], name: str, class_path: str) -> Enum:
    """A new ``AttentionBackendEnum`` name: 0.32+ has an API for it, 0.26 does not."""
    if hasattr(enum_cls, "register"):
        return enum_cls.register(name, class_path)
    from .patches.enum_member import add_enum_member

    return add_enum_member(enum_cls, name, class_path)


def seq_lens_cpu(common_attn_metadata) -> torch.Tensor:
    """Per-request KV lengths on the host (exact for prefill rows) without a device sync."""
    upper_bound = getattr(common_attn_metadata, "seq_lens_cpu_upper_bound", None)
    if upper_bound is not None:
        return upper_bound
    legacy = getattr(common_attn_metadata, "_seq_lens_cpu", None)  # 0.26 only
    if legacy is not None:
        return legacy
    return common_attn_metadata.seq_lens.cpu()


def flash_attention_only(fa_metadata) -> str | None:
    """A batch feature that FlashAttention's metadata carries and the sparse path does not model
    (the builder then leaves the whole batch to FlashAttention), or None."""
    if getattr(fa_metadata, "use_cascade", False):  # 0.26: cascade attention over a shared prefix
        return "cascade attention"
    if fa_metadata.causal is not True:
        return "non-causal attention"
    for name in ("mm_prefix_range_tensor", "mm_prefix_query_range_tensor"):  # 0.26, 0.32 spelling
        if getattr(fa_metadata, name, None) is not None:
            return "bidirectional multimodal prefix ranges"
    if getattr(fa_metadata, "rswa_prefix_lens", None) is not None:
        return "reference sliding-window attention"
    return None


# Per request of the step being prepared on this thread: how far its prefill reaches, published by
# the model runner's input preparation (patches/prefill_lens.py) for the builder of the same step.
_published = threading.local()


@dataclasses.dataclass(frozen=True)
class PublishedPrefillLens:
    query_start_loc: np.ndarray  # [num_reqs + 1] the batch the runner prepared, to recognise it
    seq_lens: np.ndarray  # [num_reqs]
    prefill_lens: np.ndarray  # [num_reqs]


def watch_prefill_lens() -> None:
    """Make the model runners of this process publish their prefill lengths (idempotent)."""
    from .patches.prefill_lens import install

    install()


def publish_prefill_lens(lens: PublishedPrefillLens | None) -> None:
    _published.lens = lens


def prefill_lens(common_attn_metadata) -> np.ndarray | None:
    """[num_reqs] per request the length its prefill reaches (its prompt, plus the output tokens
    of a request recomputed after preemption): a chunk ends its prompt, and its last row yields a
    token, when its sequence length reaches it. vLLM's metadata carries no prompt length (0.26 to
    0.33 fill ``rswa_prefix_lens`` for R-SWA models only), so the model runner publishes these
    while it prepares the step; None when it did not, or when the batch is not the one it
    prepared (a dummy or capture run, a batch split or reordered since): every chunk then counts
    as ending its prompt. Rows the runner samples from, and padding rows, hold 0."""
    lens = getattr(_published, "lens", None)
    if lens is None:
        return None
    n, num_reqs = len(lens.seq_lens), common_attn_metadata.num_reqs
    qsl = np.asarray(common_attn_metadata.query_start_loc_cpu[: num_reqs + 1])
    seq_lens = seq_lens_cpu(common_attn_metadata).numpy()[:num_reqs]
    same_batch = (
        num_reqs >= n and np.array_equal(qsl[: n + 1], lens.query_start_loc)
        and np.array_equal(seq_lens[:n], lens.seq_lens) and (qsl[n:] == qsl[n]).all()  # padding
    )
    if not same_batch:
        return None
    out = np.zeros(num_reqs, dtype=np.int64)
    out[:n] = lens.prefill_lens
    return out
