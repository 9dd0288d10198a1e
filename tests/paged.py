"""Random batches laid out the way vLLM lays them out: a paged KV cache with shuffled pages,
viewed through the logical [pages, Hkv, page_size, 2*D] layout, plus the host-side metadata."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class PagedBatch:
    q: torch.Tensor  # [tokens, Hq, D]
    kv_cache: torch.Tensor  # logical [pages, Hkv, page_size, 2*D] (strided, like vLLM's)
    k_cache: torch.Tensor  # [pages, page_size, Hkv, D] views of kv_cache
    v_cache: torch.Tensor
    block_table: torch.Tensor  # [requests, max pages] int32
    seq_lens: torch.Tensor  # [requests] int32
    query_start_loc: torch.Tensor  # [requests + 1] int32
    context_lens: list[int]
    query_lens: list[int]


def make_paged_batch(
    query_lens: list[int],
    context_lens: list[int],
    num_q_heads: int,
    num_kv_heads: int,
    head_size: int,
    page_size: int,
    dtype: torch.dtype,
    device: str = "cpu",
    seed: int = 0,
    layout: str = "NHD",
    shuffle_pages: bool = True,
) -> PagedBatch:
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for c, q in zip(context_lens, query_lens)]
    pages_per_req = [-(-s // page_size) for s in seq_lens]
    num_pages = sum(pages_per_req) + 3  # spare pages stay garbage: nothing may read them
    perm = torch.randperm(num_pages, generator=gen) if shuffle_pages else torch.arange(num_pages)
    max_pages = max(pages_per_req)
    block_table = torch.zeros(len(seq_lens), max_pages, dtype=torch.int32)
    used = 0
    for r, n in enumerate(pages_per_req):
        block_table[r, :n] = perm[used:used + n]
        used += n
    # Random data is drawn on the target device (fast at 128K tokens on a GPU).
    dev_gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=dev_gen, device=device).to(dtype)

    # Physical NHD [pages, page_size, Hkv, 2D] or HND [pages, Hkv, page_size, 2D], viewed logically.
    if layout == "NHD":
        kv_cache = randn(num_pages, page_size, num_kv_heads, 2 * head_size).transpose(1, 2)
    else:
        kv_cache = randn(num_pages, num_kv_heads, page_size, 2 * head_size)
    # Reads of unlisted pages or of slots past a request's end would poison the output.
    kv_cache[perm[used:].to(device)] = float("nan")
    for r, s in enumerate(seq_lens):
        if s % page_size:
            kv_cache[int(block_table[r, pages_per_req[r] - 1]), :, s % page_size:] = float("nan")
    k_cache, v_cache = kv_cache.transpose(1, 2).split(head_size, dim=-1)
    q = randn(sum(query_lens), num_q_heads, head_size)
    qsl = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(query_lens), 0)
    return PagedBatch(
        q=q,
        kv_cache=kv_cache,
        k_cache=k_cache,
        v_cache=v_cache,
        block_table=block_table.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        query_start_loc=qsl.to(device),
        context_lens=list(context_lens),
        query_lens=list(query_lens),
    )


def query_blocks_of(batch: PagedBatch, gqa: int, sparse_block: int):
    """Every row of the batch as query blocks (``plan.build_query_blocks``), with score groups
    for a GQA group of ``gqa`` query heads."""
    from vllm_flashprefill.kernels.scoring import blocks_per_group
    from vllm_flashprefill.plan import build_query_blocks

    return build_query_blocks(
        batch.query_start_loc, batch.seq_lens, range(len(batch.query_lens)), sparse_block, "cpu",
        blocks_per_group(gqa),
    )


def dynamic_mask(batch: PagedBatch, qblocks, cfg, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(block scores from the scoring kernel, the torch selection over them) for every query block."""
    from vllm_flashprefill.kernels.scoring import block_scores
    from vllm_flashprefill.patterns import select_dynamic

    heads, head_size = batch.q.shape[1], batch.q.shape[2]
    scores = torch.full((qblocks.num_blocks, heads, qblocks.num_kv_blocks), float("-inf"))
    pooled = torch.empty(qblocks.num_blocks, heads, head_size)
    block_scores(
        batch.q, batch.k_cache, batch.block_table, batch.seq_lens, qblocks.table,
        qblocks.score_groups, scores, pooled, scale, qblocks.sparse_block,
    )
    return scores, select_dynamic(
        scores, qblocks.block_index, qblocks.last_block, batch.k_cache.shape[2], cfg
    )
