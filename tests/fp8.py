"""tests/paged.py's batches with the KV cache (and optionally q) in fp8 (e4m3), as vLLM holds them."""

from __future__ import annotations

import torch

from vllm_flashprefill.kernels.common import FP8_DTYPE

FP8_MAX = torch.finfo(FP8_DTYPE).max


def calibrated_scale(x: torch.Tensor, heads_dim: int | None) -> torch.Tensor:
    """A float32 scale that maps the largest finite |x| to e4m3's largest value, as a calibrated
    checkpoint's: 0-d (vLLM's per-tensor scale), or one per head along ``heads_dim``."""
    amax = x.float().nan_to_num(0.0).abs()
    amax = amax.amax() if heads_dim is None else amax.transpose(0, heads_dim).flatten(1).amax(1)
    return amax / FP8_MAX


def to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale in e4m3 (NaN stays NaN)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_batch(batch, per_head: bool = False, fp8_query: bool = False) -> dict[str, torch.Tensor]:
    """Put the batch's KV cache in fp8 the way vLLM holds it (a uint8 tensor of the same layout,
    viewed as e4m3), with calibrated k and v scales (per tensor, or per KV head), and with
    ``fp8_query`` q as well (vLLM quantizes it when FlashAttention runs an fp8 cache). Returns
    the scales as the kernels take them (k_scale, v_scale, q_scale)."""
    num_kv_heads, head_size = batch.k_cache.shape[2], batch.k_cache.shape[3]
    heads_dim = 1 if per_head else None
    kv = batch.kv_cache  # logical [pages, Hkv, page_size, 2 * D]
    k, v = kv[..., :head_size], kv[..., head_size:]
    scales = dict(k_scale=calibrated_scale(k, heads_dim), v_scale=calibrated_scale(v, heads_dim))
    kv8 = torch.empty_like(kv, dtype=torch.uint8).view(FP8_DTYPE)
    kv8[..., :head_size] = to_fp8(k, scales["k_scale"].reshape(-1, 1, 1))
    kv8[..., head_size:] = to_fp8(v, scales["v_scale"].reshape(-1, 1, 1))
    batch.kv_cache = kv8
    batch.k_cache, batch.v_cache = kv8.transpose(1, 2).split(head_size, dim=-1)
    if fp8_query:
        tokens, num_q_heads, _ = batch.q.shape
        by_kv_head = batch.q.view(tokens, num_kv_heads, num_q_heads // num_kv_heads, head_size)
        scales["q_scale"] = calibrated_scale(by_kv_head, heads_dim)
        batch.q = to_fp8(by_kv_head, scales["q_scale"].reshape(-1, 1, 1)).view(batch.q.shape)
    return scales
