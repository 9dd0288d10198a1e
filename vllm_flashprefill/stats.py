"""How sparse this process's prefills were: kept / causal (query block, KV head, KV block) triples.

Counted over every sparse layer call (rows that run dense on FlashAttention are not in it). The kept
count stays on the device, so recording never waits for the GPU; reading it does. Benchmarks read
it from the workers with ``LLM.collective_rpc(read_selection_stats)``.
"""

from __future__ import annotations

import torch


class SelectionStats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._kept: torch.Tensor | None = None
        self.causal = 0
        self.layer_calls = 0

    def record(self, counts: torch.Tensor, causal_pairs: int, num_kv_heads: int) -> None:
        """One layer call. counts: [n, Hkv] blocks kept per (query block, KV head), or [n, 1] when
        every KV head shares the list (static patterns); causal_pairs: its causal (query block,
        KV block) pairs."""
        if self._kept is None or self._kept.device != counts.device:
            self._kept = torch.zeros((), dtype=torch.int64, device=counts.device)
        self._kept += counts.sum(dtype=torch.int64) * (num_kv_heads // counts.shape[1])
        self.causal += causal_pairs * num_kv_heads
        self.layer_calls += 1

    def snapshot(self) -> dict:
        kept = int(self._kept) if self._kept is not None else 0
        return {
            "layer_calls": self.layer_calls,
            "kept_blocks": kept,
            "causal_blocks": self.causal,
            "density": kept / self.causal if self.causal else None,
        }


STATS = SelectionStats()


def read_selection_stats(worker=None, reset: bool = False) -> dict:
    """This process's counts (``worker`` is there for ``collective_rpc``, which passes it)."""
    snapshot = STATS.snapshot()
    if reset:
        STATS.reset()
    return snapshot
