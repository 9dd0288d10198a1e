"""FLASHPREFILL's block selection as a transformers attention function (pure torch, CPU or GPU).

``use_flashprefill(model, cfg)`` registers ``"block_sparse_ref"`` with transformers'
``AttentionInterface`` and switches the model to it. For a prefill (more than one query row) every
attention layer then does what the vLLM backend does for one request:

* query blocks are aligned to absolute positions 0, B, 2B, ... (B = ``cfg.sparse_block``); a block the
  forward pass holds only part of (a chunk boundary) is cut to the rows it holds;
* the block mask comes from the package itself: ``patterns.forced_block_mask`` for static patterns,
  ``patterns.select_dynamic`` on block scores for ``dynamic``. A block score is
  ``scale * mean(query rows of the block) . key`` maxed over the keys of each KV block (the
  definition of ``kernels/reference.block_scores_reference``); GQA query heads sharing a KV head get
  the union of their blocks (inside ``select_dynamic``); query blocks starting below
  ``min_seq_len`` keep every causal block, and so do the last ``dense_tail_blocks`` query blocks of
  the forward pass (the chunk) and ``cfg.dense_layers``;
* attention is plain fp32 softmax attention over the kept blocks, causal inside them.

Decode steps (one query row) are dense (transformers' SDPA). Padding masks are ignored: run one
prompt at a time, or batches of equal-length prompts. ``STATS`` counts kept / causal (query block, KV head,
KV block) triples.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from vllm_flashprefill.config import FlashPrefillConfig
from vllm_flashprefill.patterns import forced_block_mask, select_dynamic

ATTN_NAME = "block_sparse_ref"  # no "flash" in it: transformers treats such names as flash-attn kernels


@dataclasses.dataclass
class Stats:
    kept: int = 0  # kept causal (query block, KV head, KV block) triples, sparse layers only
    causal: int = 0  # all causal triples of the same query blocks
    prefill_calls: int = 0

    @property
    def density(self) -> float | None:
        return self.kept / self.causal if self.causal else None

    def reset(self) -> None:
        self.kept = self.causal = self.prefill_calls = 0


STATS = Stats()
_active: dict[str, FlashPrefillConfig] = {"cfg": FlashPrefillConfig(pattern="dense")}


def block_scores(q: torch.Tensor, k: torch.Tensor, q_start: int, sparse_block: int, scale: float):
    """Scores [nqb, Hq, nkb] and absolute block indices [nqb] of one sequence.

    q [Hq, q_len, D] holds positions q_start .. q_start + q_len - 1; k [Hkv, kv_len, D] positions
    0 .. kv_len - 1 with kv_len = q_start + q_len. Non-causal entries are -inf."""
    hq, q_len, d = q.shape
    kv_len = k.shape[1]
    first, last = q_start // sparse_block, (kv_len - 1) // sparse_block
    nqb, nkb = last - first + 1, last + 1
    lead = q_start - first * sparse_block  # rows of the first block before this forward pass
    padded = F.pad(q.float(), (0, 0, lead, nqb * sparse_block - lead - q_len))
    rows = torch.full((nqb,), sparse_block, dtype=torch.float32, device=q.device)
    rows[0] -= lead
    rows[-1] -= nqb * sparse_block - lead - q_len
    pooled = padded.view(hq, nqb, sparse_block, d).sum(2) / rows[None, :, None]  # [Hq, nqb, D]
    kf = k.float().repeat_interleave(hq // k.shape[0], dim=0)  # [Hq, kv_len, D]
    logits = scale * pooled @ kf.transpose(1, 2)  # [Hq, nqb, kv_len]
    logits = F.pad(logits, (0, nkb * sparse_block - kv_len), value=float("-inf"))
    scores = logits.view(hq, nqb, nkb, sparse_block).amax(-1).transpose(0, 1)
    block_index = torch.arange(first, last + 1, device=q.device)
    scores = scores.masked_fill(
        torch.arange(nkb, device=q.device)[None, None, :] > block_index[:, None, None], float("-inf")
    )
    return scores.contiguous(), block_index


def block_mask_for(q, k, q_start: int, cfg: FlashPrefillConfig, scale: float, dense: bool):
    """[nqb, Hkv, nkb] bool mask of one sequence, and the query blocks' absolute indices."""
    bs = cfg.sparse_block
    kv_len = k.shape[1]
    first, last = q_start // bs, (kv_len - 1) // bs
    block_index = torch.arange(first, last + 1, device=q.device)
    if dense:
        mask = forced_block_mask(block_index, last, last + 1, FlashPrefillConfig(pattern="dense"))
    elif cfg.block_pattern.scores_content:
        scores, block_index = block_scores(q, k, q_start, bs, scale)
        mask = select_dynamic(scores, block_index, last, k.shape[0], cfg)
    else:
        mask = forced_block_mask(block_index, last, last + 1, cfg)
    return mask.expand(-1, k.shape[0], -1), block_index


def masked_attention(q, k, v, q_start: int, mask: torch.Tensor, sparse_block: int, scale: float):
    """fp32 softmax attention [Hq, q_len, D] over the KV blocks ``mask`` [nqb, Hkv, nkb] keeps,
    causal inside the diagonal block. Works one query block at a time and only on the union of the
    blocks its KV heads keep, so its cost follows the pattern's density."""
    hq, q_len, d = q.shape
    hkv, kv_len, _ = k.shape
    group = hq // hkv
    # Query head h reads KV head h // group; [Hkv, q_len, group, D] makes a block's rows of all
    # heads of one KV head one [rows * group, D] matrix.
    qf = q.float().view(hkv, group, q_len, d).permute(0, 2, 1, 3).contiguous()
    kf, vf = k.float(), v.float()
    out = torch.empty(hkv, q_len, group, v.shape[-1], dtype=torch.float32, device=q.device)
    first = q_start // sparse_block
    offsets = torch.arange(sparse_block, device=q.device)
    for i in range(mask.shape[0]):
        qb = first + i
        p0, p1 = max(qb * sparse_block, q_start), min((qb + 1) * sparse_block, kv_len)
        rows = slice(p0 - q_start, p1 - q_start)
        blocks = mask[i].any(0).nonzero().squeeze(1)  # ascending: the diagonal block is last
        keys = (blocks[:, None] * sparse_block + offsets).flatten()
        keys = keys[keys < p1]
        n = keys.numel()
        logits = qf[:, rows].reshape(hkv, -1, d) @ kf[:, keys].transpose(1, 2) * scale
        drop = ~mask[i][:, blocks].repeat_interleave(sparse_block, 1)[:, None, :n]  # [Hkv, 1, n]
        qpos = torch.arange(p0, p1, device=q.device).repeat_interleave(group)
        drop = drop | (keys[None, :] > qpos[:, None])  # [Hkv, rows * group, n]
        probs = torch.softmax(logits.masked_fill_(drop, float("-inf")), dim=-1)
        out[:, rows] = (probs @ vf[:, keys]).view(hkv, p1 - p0, group, -1)
    return out.permute(0, 2, 1, 3).reshape(hq, q_len, -1)


def flashprefill_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                           **kwargs):
    """transformers attention function: query [b, Hq, q_len, D], key/value [b, Hkv, kv_len, D]
    (cache included). Returns ([b, q_len, Hq, D], None)."""
    cfg = _active["cfg"]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    b, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    # attention_mask is ignored: masking is causal + block mask only (no padding support).
    if q_len == 1:  # decode: dense, transformers' own SDPA path in the model's dtype
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    q_start = kv_len - q_len
    layer = getattr(module, "layer_idx", None)
    dense = cfg.layer_is_dense(layer)
    outs = []
    for i in range(b):
        mask, block_index = block_mask_for(query[i], key[i], q_start, cfg, scale, dense)
        if not dense:
            causal = (torch.arange(mask.shape[-1])[None, :] <= block_index[:, None].cpu()).sum()
            STATS.kept += int(mask.sum())
            STATS.causal += int(causal) * mask.shape[1]
        outs.append(masked_attention(query[i], key[i], value[i], q_start, mask, cfg.sparse_block, scale))
    STATS.prefill_calls += 1
    return torch.stack(outs).to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_NAME, flashprefill_attention)


def use_flashprefill(model, cfg: FlashPrefillConfig | dict | None) -> FlashPrefillConfig:
    """Route ``model``'s attention through the reference with ``cfg`` (a config or its options)."""
    if not isinstance(cfg, FlashPrefillConfig):
        cfg = FlashPrefillConfig.from_dict(cfg or {"pattern": "dense"})
    _active["cfg"] = cfg
    model.set_attn_implementation(ATTN_NAME)
    return cfg
