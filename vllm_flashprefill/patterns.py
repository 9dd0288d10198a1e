"""Which KV blocks each query block visits: the patterns, their block masks, dynamic selection.

A pattern's selection is a boolean mask over (query block, KV head, KV block), always causal and always
holding the diagonal block. Static patterns depend on block indices only (one mask row shared by
every head); ``dynamic`` keeps sink, local and strided blocks and adds the blocks whose score passes
a threshold relative to the row maximum and stands out from the other candidates' mean.
Query blocks that start below ``min_seq_len``, and the last ``dense_tail_blocks`` query blocks of
a chunk, keep every causal block (dense).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from .block_lists import BlockLists

if TYPE_CHECKING:
    from .config import FlashPrefillConfig


@dataclasses.dataclass(frozen=True)
class Pattern:
    """What a pattern keeps on top of the sink blocks, the diagonal block and its dense rows."""

    name: str
    keeps_all: bool = False  # every causal block (dense)
    keeps_local: bool = False  # the local_blocks before the diagonal
    keeps_strided: bool = False  # every stride-th block back from the diagonal
    scores_content: bool = False  # adds blocks by score, per layer and KV head (dynamic)

    def __str__(self) -> str:
        return self.name


_BY_NAME = {
    p.name: p
    for p in (
        Pattern("dense", keeps_all=True),
        Pattern("local", keeps_local=True),
        Pattern("strided", keeps_strided=True),
        Pattern("hybrid", keeps_local=True, keeps_strided=True),
        Pattern("dynamic", keeps_local=True, keeps_strided=True, scores_content=True),
    )
}


def pattern_named(name: str) -> Pattern:
    """The pattern of a config's ``pattern`` option."""
    return _BY_NAME[name]


def dense_query_blocks(
    block_index: torch.Tensor | np.ndarray, last_block: torch.Tensor | np.ndarray | int, cfg: FlashPrefillConfig
) -> torch.Tensor | np.ndarray:
    """[n] bool: query blocks that attend densely (below ``min_seq_len`` or in the chunk's tail).

    last_block: the absolute index of the last block of the chunk each query block belongs to.
    Tensors or numpy arrays."""
    return (block_index * cfg.sparse_block < cfg.min_seq_len) | (block_index > last_block - cfg.dense_tail_blocks)


def content_selectable(
    block_index: torch.Tensor | np.ndarray, last_block: torch.Tensor | np.ndarray | int, cfg: FlashPrefillConfig
) -> torch.Tensor | np.ndarray:
    """[n] bool: query blocks where ``dynamic`` content selection can add a block; every other one
    keeps all its causal blocks anyway (dense, or sink and local window cover them), so its scores
    are not needed. Tensors or numpy arrays (see :func:`dense_query_blocks`)."""
    return ~dense_query_blocks(block_index, last_block, cfg) & (block_index > cfg.sink_blocks + cfg.local_blocks)


def forced_block_mask(
    block_index: torch.Tensor,
    last_block: torch.Tensor | int,
    num_kv_blocks: int,
    cfg: FlashPrefillConfig,
) -> torch.Tensor:
    """[n, 1, num_kv_blocks] mask of the blocks a pattern keeps regardless of content
    (``last_block``: see :func:`dense_query_blocks`)."""
    qb = block_index.long()[:, None]
    kb = torch.arange(num_kv_blocks, device=block_index.device)[None, :]
    causal = kb <= qb
    dense = dense_query_blocks(block_index, last_block, cfg)[:, None]
    keep = (kb == qb) | (kb < cfg.sink_blocks) | dense
    pattern = cfg.block_pattern
    if pattern.keeps_local:
        keep = keep | (kb >= qb - cfg.local_blocks)
    if pattern.keeps_strided and cfg.stride:
        keep = keep | ((qb - kb) % cfg.stride == 0)
    if pattern.keeps_all:
        keep = causal
    return (keep & causal)[:, None, :]


def relative_scores(
    scores: torch.Tensor, block_index: torch.Tensor, forced: torch.Tensor, to_mean: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Block scores [n, Hq, nkb] per query head, in log units: relative to the head's maximum over
    its causal blocks (-inf past the diagonal), and, with ``to_mean``, relative to the log of the
    mean ``exp(score)`` over the head's candidates (causal, not ``forced`` [n, 1 or Hkv, nkb]) —
    what ``threshold`` and ``above_mean`` of :func:`select_dynamic` are compared with."""
    n, num_q_heads, nkb = scores.shape
    causal = torch.arange(nkb, device=scores.device)[None, None, :] <= block_index[:, None, None]
    s = scores.masked_fill(~causal, float("-inf"))
    to_max = s - s.amax(-1, keepdim=True)
    if not to_mean:
        return to_max, None
    gqa = num_q_heads // forced.shape[1] if forced.shape[1] > 1 else 1
    candidate = causal & ~forced.repeat_interleave(gqa, 1)
    log_mean = torch.logsumexp(s.masked_fill(~candidate, float("-inf")), -1, keepdim=True) - torch.log(
        candidate.sum(-1, keepdim=True).clamp(min=1))
    return to_max, s - log_mean


def select_dynamic(
    scores: torch.Tensor,
    block_index: torch.Tensor,
    last_block: torch.Tensor | int,
    num_kv_heads: int,
    cfg: FlashPrefillConfig,
    forced: torch.Tensor | None = None,
) -> torch.Tensor:
    """[n, Hkv, nkb] mask from block scores [n, Hq, nkb] (max logit of the pooled query per block).

    Per query head a candidate (causal, not forced) block passes when ``exp(s - max) >= threshold``
    (``max`` over the head's causal blocks) and ``exp(s) >= above_mean * mean(exp(s))`` over the
    head's candidates; the heads sharing a KV head keep the union of the blocks that pass (query
    head h belongs to KV head h // (Hq / Hkv), as in vLLM). Candidates rank by their best ``s - max``
    over the group, ties going to the later (nearer) block: ``min_budget`` adds the best
    ``min_budget`` candidates, and ``max_budget`` then keeps the best ``max_budget`` of the blocks
    content selection kept, so that it adds at least ``min_budget`` (where the row has that many
    candidates) and at most ``max_budget`` blocks per query block and KV head on top of the forced
    blocks of :func:`forced_block_mask` (``forced``: that mask, if the caller already has it;
    ``last_block``: see :func:`dense_query_blocks`).
    """
    n, num_q_heads, nkb = scores.shape
    gqa = num_q_heads // num_kv_heads
    if forced is None:
        forced = forced_block_mask(block_index, last_block, nkb, cfg)
    rel, to_mean = relative_scores(scores, block_index, forced, cfg.above_mean > 0)
    passes = rel >= (math.log(cfg.threshold) if cfg.threshold > 0 else float("-inf"))
    if to_mean is not None:
        passes &= to_mean >= math.log(cfg.above_mean)
    keep = passes.view(n, num_kv_heads, gqa, nkb).any(2)
    rel = rel.view(n, num_kv_heads, gqa, nkb).amax(2).masked_fill(forced, float("-inf"))
    keep &= rel > float("-inf")
    if cfg.min_budget:
        keep |= best_blocks(rel, cfg.min_budget)
    if cfg.max_budget:
        keep = best_blocks(rel.masked_fill(~keep, float("-inf")), cfg.max_budget)
    return keep | forced


def best_blocks(rel: torch.Tensor, k: int) -> torch.Tensor:
    """[..., nkb] bool: the ``k`` largest finite entries of ``rel`` along the last dim, ties going to
    the later block (all finite entries where there are fewer)."""
    later_first = rel.flip(-1)  # a stable sort keeps the later of two tied blocks first
    order = later_first.argsort(dim=-1, descending=True, stable=True)[..., :k]
    chosen = torch.zeros_like(rel, dtype=torch.bool).scatter_(-1, order, True).flip(-1)
    return chosen & (rel > float("-inf"))


def select_dynamic_lists(
    scores: torch.Tensor,
    qblocks: torch.Tensor,
    seq_lens: torch.Tensor,
    num_kv_heads: int,
    num_kv_blocks: int,
    cfg: FlashPrefillConfig,
    indices: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> BlockLists:
    """:func:`select_dynamic` + :meth:`BlockLists.from_mask` as a layer runs them: one Triton kernel
    (``kernels/selection.py``) over block scores [n, Hq, W >= num_kv_blocks], the query-block
    table and each request's sequence length after the chunk (vLLM's ``seq_lens``); lists of
    width W, written into ``indices`` [n, Hkv, W] and ``counts`` [n, Hkv] when given."""
    from .kernels.selection import select_blocks

    return BlockLists(*select_blocks(
        scores, qblocks, seq_lens, num_kv_heads, num_kv_blocks,
        sparse_block=cfg.sparse_block, threshold=cfg.threshold, above_mean=cfg.above_mean,
        sink_blocks=cfg.sink_blocks,
        local_blocks=cfg.local_blocks, stride=cfg.stride, min_seq_len=cfg.min_seq_len,
        dense_tail_blocks=cfg.dense_tail_blocks, min_budget=cfg.min_budget,
        max_budget=cfg.max_budget, indices=indices, counts=counts,
    ))
