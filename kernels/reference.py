"""Plain-PyTorch references for the Triton kernels (and for the FA3 call of the ``flash_attn`` route):
same inputs, fp32 math, no tiling tricks."""

from __future__ import annotations

import torch


def gather_kv(cache: torch.Tensor, block_table_row: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[seq_len, Hkv, D] of one request from a paged cache view [pages, page_size, Hkv, D]."""
    page_size = cache.shape[1]
    pos = torch.arange(seq_len, device=cache.device)
    return cache[block_table_row[pos // page_size].long(), pos % page_size]


def dequantize(x: torch.Tensor, scale: torch.Tensor | None, gqa: int = 1,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x`` [..., H, D] in ``dtype``, times its fp8 scale (None: none; one element, or one per KV
    head, each covering ``gqa`` of x's heads)."""
    if scale is None:
        return x.to(dtype)
    if scale.numel() == 1:
        return x.to(dtype) * scale.to(dtype).reshape(())
    return x.to(dtype) * scale.to(dtype).repeat_interleave(gqa)[:, None]


def sparse_attention_reference(
    q, k_cache, v_cache, block_table, seq_lens, qblocks, block_mask, scale, sparse_block,
    q_scale=None, k_scale=None, v_scale=None,
) -> torch.Tensor:
    """Attention of every query row over the KV blocks ``block_mask`` [n, Hkv or 1, nkb] keeps,
    causal inside them. Returns [tokens, Hq, D] fp32, float64 for a float64 ``q`` (rows outside
    ``qblocks`` are zero). fp8 inputs come with their scales, as the kernels take them."""
    gqa = q.shape[1] // k_cache.shape[2]
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(q.shape, dtype=dtype, device=q.device)
    table = qblocks.cpu()
    cached = (None, None, None)
    for i in range(table.shape[0]):
        req, row0, pos0, rows = (int(x) for x in table[i])
        seq_len = int(seq_lens[req])
        if cached[0] != req:
            k = dequantize(gather_kv(k_cache, block_table[req], seq_len), k_scale, 1, dtype).repeat_interleave(gqa, 1)
            v = dequantize(gather_kv(v_cache, block_table[req], seq_len), v_scale, 1, dtype).repeat_interleave(gqa, 1)
            cached = (req, k, v)
        _, k, v = cached
        qpos = torch.arange(pos0, pos0 + rows, device=q.device)
        kpos = torch.arange(seq_len, device=q.device)
        allowed = block_mask[i].expand(k_cache.shape[2], -1)[:, kpos // sparse_block]
        allowed = allowed.repeat_interleave(gqa, 0)  # [Hq, seq]
        allowed = allowed[:, None, :] & (kpos[None, None, :] <= qpos[None, :, None])
        logits = torch.einsum("thd,shd->hts", dequantize(q[row0:row0 + rows], q_scale, gqa, dtype), k) * scale
        probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        out[row0:row0 + rows] = torch.einsum("hts,shd->thd", probs, v)
    return out


def block_scores_reference(
    q, k_cache, block_table, seq_lens, qblocks, scale, sparse_block, num_kv_blocks, q_scale=None, k_scale=None,
) -> torch.Tensor:
    """[n, Hq, nkb]: max over keys of each KV block of scale * mean-pooled query . key (fp32);
    -inf for KV blocks after the query block. fp8 inputs come with their scales."""
    n = qblocks.shape[0]
    num_q_heads = q.shape[1]
    gqa = num_q_heads // k_cache.shape[2]
    scores = torch.full((n, num_q_heads, num_kv_blocks), float("-inf"), device=q.device)
    table = qblocks.cpu()
    for i in range(n):
        req, row0, pos0, rows = (int(x) for x in table[i])
        qb = pos0 // sparse_block
        seq_len = int(seq_lens[req])
        pooled = dequantize(q[row0:row0 + rows], q_scale, gqa).mean(0)  # [Hq, D]
        k = dequantize(gather_kv(k_cache, block_table[req], seq_len), k_scale).repeat_interleave(gqa, dim=1)
        logits = torch.einsum("hd,shd->hs", pooled, k) * scale
        for kb in range(qb + 1):
            scores[i, :, kb] = logits[:, kb * sparse_block:(kb + 1) * sparse_block].amax(-1)
    return scores


def flash_attn_varlen_reference(q, k, v, out, cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k,
                                softmax_scale, causal, block_table, num_splits, fa_version):
    """What one FA3 varlen call over a block table computes (keys paged, ``causal=True`` aligned to
    the end of each sequence), in fp32, written into ``out`` like the real call."""
    assert causal and fa_version == 3 and num_splits == 1
    causal_paged_attention(q, k, v, out, cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k, softmax_scale,
                           block_table)


def causal_paged_attention(q, k, v, out, cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k, softmax_scale,
                           block_table):
    """Causal attention of varlen queries ``q`` [tokens, Hq, D] over paged keys and values
    [pages, page_size, Hkv, D], aligned to the end of each sequence (as FlashAttention computes
    it), in fp32, written into ``out``."""
    gqa = q.shape[1] // k.shape[2]
    cu = cu_seqlens_q.tolist()
    for i, used in enumerate(seqused_k.tolist()):
        lo, hi = cu[i], cu[i + 1]
        assert hi - lo <= max_seqlen_q and used <= max_seqlen_k
        keys = gather_kv(k, block_table[i], used).float().repeat_interleave(gqa, 1)
        values = gather_kv(v, block_table[i], used).float().repeat_interleave(gqa, 1)
        rows = torch.arange(hi - lo, device=q.device)
        visible = torch.arange(used, device=q.device)[None, :] <= (used - (hi - lo) + rows)[:, None]
        logits = torch.einsum("thd,shd->hts", q[lo:hi].float(), keys) * softmax_scale
        probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
        out[lo:hi] = torch.einsum("hts,shd->thd", probs, values).to(out.dtype)
