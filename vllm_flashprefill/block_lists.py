"""BlockLists: the KV blocks each query block visits, in the form the attention kernels read.

The model is FlexAttention's ``BlockMask`` (``kv_num_blocks``, ``kv_indices``): a boolean block
mask [query blocks, heads, KV blocks] (``patterns.py`` makes them) is stored as, per query block
and head, the ascending indices of its kept KV blocks and their count. Every list of a pattern
ends with the query block's own (diagonal) block, the only one the kernels mask element by element.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

SHOWN_QUERY_BLOCKS = 8  # str() of large lists shows the first ones



def check_diagonals(mask: torch.Tensor, diagonal: torch.Tensor) -> None:
    """Every row (query block i, head h) of ``mask`` [n, H, nkb] keeps block ``diagonal[i]`` and
    none past it."""
    n, heads, nkb = mask.shape
    if diagonal.shape != (n,) or (n and not 0 <= int(diagonal.min()) <= int(diagonal.max()) < nkb):
        raise ValueError(f"diagonal blocks {diagonal.tolist()} must give each of the {n} query blocks a block "
                         f"in [0, {nkb})")
    own = diagonal.long().to(mask.device)[:, None, None]
    missing = ~mask.gather(-1, own.expand(n, heads, 1))[..., 0]
    past = (mask & (torch.arange(nkb, device=mask.device) > own)).any(-1)
    bad = (missing | past).nonzero()
    if len(bad):
        i, h = (int(x) for x in bad[0])
        what = "does not keep" if missing[i, h] else "keeps blocks past"
        raise ValueError(
            f"block mask row of query block {i}, head {h} {what} its diagonal block {int(diagonal[i])} (kept: "
            f"{mask[i, h].nonzero().flatten().tolist()}); the kernels take a list's last block for the diagonal")


class BlockLists(NamedTuple):
    """``indices[i, h, :counts[i, h]]``: the KV blocks query block i visits for KV head h, ascending
    (slots past the count hold anything). H = 1 when every head shares the lists (static patterns).
    A tuple, so it unpacks as ``indices, counts``."""

    indices: torch.Tensor  # [n, H, L] int32
    counts: torch.Tensor  # [n, H] int32

    @classmethod
    def from_mask(cls, mask: torch.Tensor, diagonal: torch.Tensor | None = None) -> BlockLists:
        """Lists of a block mask [n, H, nkb] (L = nkb). ``diagonal`` [n]: each query block's own
        block; given, every row must keep it and no block past it, since the kernels take a list's
        last block for the diagonal (the one they mask element by element), or a ValueError names
        the first row that does not. The check reads the mask back (a device sync on a GPU);
        ``patterns.forced_block_mask`` keeps the diagonal by construction, so plans skip it."""
        n, heads, nkb = mask.shape
        if diagonal is not None:
            check_diagonals(mask, diagonal)
        counts = mask.sum(-1, dtype=torch.int32)
        slots = torch.cumsum(mask, -1, dtype=torch.int32) - 1
        slots = torch.where(mask, slots, nkb)  # dropped blocks land in a spare last column
        indices = torch.zeros(n, heads, nkb + 1, dtype=torch.int32, device=mask.device)
        kb = torch.arange(nkb, dtype=torch.int32, device=mask.device).expand(n, heads, nkb)
        indices.scatter_(-1, slots.long(), kb)
        return cls(indices[..., :nkb], counts)

    def to_mask(self, num_kv_blocks: int) -> torch.Tensor:
        """The block mask [n, H, num_kv_blocks] these lists keep (inverse of :meth:`from_mask`)."""
        n, heads, width = self.indices.shape
        mask = torch.zeros(n, heads, num_kv_blocks + 1, dtype=torch.bool, device=self.indices.device)
        valid = torch.arange(width, device=self.indices.device)[None, None, :] < self.counts[..., None]
        mask.scatter_(-1, torch.where(valid, self.indices.long(), num_kv_blocks), True)
        return mask[..., :num_kv_blocks]

    @property
    def num_query_blocks(self) -> int:
        return self.counts.shape[0]

    @property
    def num_heads(self) -> int:
        return self.counts.shape[1]

    def density(self) -> float:
        """Listed blocks over the causal blocks of their query blocks. A list's last block is its
        query block's diagonal block, so list (i, h) has ``indices[i, h, counts[i, h] - 1] + 1``
        causal blocks."""
        last = (self.counts.long() - 1).clamp(min=0)
        diagonal = self.indices.gather(-1, last[..., None])[..., 0]
        causal = int((diagonal.long() + 1).sum())
        return int(self.counts.sum()) / causal if causal else 0.0

    def __repr__(self) -> str:
        return (f"BlockLists({self.num_query_blocks} query blocks x {self.num_heads} heads, "
                f"width {self.indices.shape[-1]}, {int(self.counts.sum())} blocks kept, "
                f"density {self.density():.3f})")

    def __str__(self) -> str:
        lines = [repr(self)]
        rows = min(SHOWN_QUERY_BLOCKS, self.num_query_blocks)
        for i in range(rows):
            kept = [self.indices[i, h, : self.counts[i, h]].tolist() for h in range(self.num_heads)]
            lines.append(f"  query block {i}: " + " | ".join(map(str, kept)))
        if self.num_query_blocks > rows:
            lines.append(f"  ... {self.num_query_blocks - rows} more")
        return "\n".join(lines)
