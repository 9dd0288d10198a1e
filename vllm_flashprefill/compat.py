"""Everything that differs between the vLLM versions we support (>=0.26, <0.34)."""

from __future__ import annotations

from enum import Enum

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
