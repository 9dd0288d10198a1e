"""Random batches laid out the way vLLM lays them out: a paged KV cache with shuffled pages,
viewed through the logical [pages, Hkv, page_size, 2*D] layout, plus the host-side metadata, and
the real vLLM builder and impl to run them through (vLLM imported on use)."""

from __future__ import annotations

import dataclasses
import types

import torch

# vLLM's KV-cache layouts (vllm.v1.kv_cache_layout.KVCacheLayout, 0.32): the physical order of
# the dims [L]ayers, [B] pages, [H] KV heads, [N] slots of a page, [C] K and V of a slot. A layer's
# cache is the logical [B, H, N, C] view of its layer; NHD and HND are the names of older vLLMs.
KV_CACHE_LAYOUTS = ("LBNHC", "LBHNC", "LHBNC", "BLHNC", "BLNHC", "BHLNC")
LAYOUT_ALIASES = {"NHD": "LBNHC", "HND": "LBHNC"}


@dataclasses.dataclass
class PagedBatch:
    q: torch.Tensor  # [tokens (+ padding), Hq, D]
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
    *,
    num_layers: int = 1,
    layer: int = 0,
    singleton_stride: int | None = None,
    shared_pages: list[int] | None = None,
    block_table_slack: int = 0,
    q_in_qkv: bool = False,
    padding_tokens: int = 0,
) -> PagedBatch:
    """``layout``: NHD, HND or a ``KV_CACHE_LAYOUTS`` name, of a cache holding ``num_layers``
    layers (this batch's is ``layer``). ``singleton_stride``: the stride every size-1 dim of the
    cache view gets (PyTorch allows any; vLLM's FLASH_ATTN canonicalizes them before its calls).
    ``shared_pages[r]``: request r's first pages are those of request r - 1 (a prefix-cache hit;
    both hold them in their context). ``block_table_slack``: the block table is a slice of a
    buffer with that many more rows and columns, which name unused pages (vLLM's persistent
    buffer holds stale entries there). ``q_in_qkv``: q is a view into a fused QKV output.
    ``padding_tokens``: q has that many rows past the batch's (CUDA-graph padding)."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for c, q in zip(context_lens, query_lens)]
    pages_per_req = [-(-s // page_size) for s in seq_lens]
    shared = shared_pages or [0] * len(seq_lens)
    if shared[0] or any(n * page_size > min(context_lens[r - 1], context_lens[r])
                        for r, n in enumerate(shared) if n):
        raise ValueError(f"shared pages {shared} must lie in the context of both requests")
    num_pages = sum(pages_per_req) - sum(shared) + 3  # spare pages stay garbage: nothing may read them
    perm = torch.randperm(num_pages, generator=gen) if shuffle_pages else torch.arange(num_pages)
    max_pages = max(pages_per_req)
    spare = perm[num_pages - 3:]
    table = spare[torch.randint(0, 3, (len(seq_lens) + block_table_slack, max_pages + block_table_slack),
                                generator=gen)] if block_table_slack else torch.zeros(len(seq_lens), max_pages)
    table = table.to(torch.int32)
    used = 0
    for r, n in enumerate(pages_per_req):
        table[r, :shared[r]] = table[r - 1, :shared[r]]
        table[r, shared[r]:n] = perm[used:used + n - shared[r]]
        used += n - shared[r]
    block_table = table[: len(seq_lens)]
    # Random data is drawn on the target device (fast at 128K tokens on a GPU).
    dev_gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=dev_gen, device=device).to(dtype)

    order = LAYOUT_ALIASES.get(layout, layout)
    if sorted(order) != sorted("LBHNC"):
        raise ValueError(f"unknown KV-cache layout {layout!r}")
    sizes = dict(L=num_layers, B=num_pages, H=num_kv_heads, N=page_size, C=2 * head_size)
    physical = randn(*(sizes[d] for d in order))
    kv_cache = physical.permute(*(order.index(d) for d in "LBHNC"))[layer]
    if singleton_stride is not None:
        strides = [singleton_stride if n == 1 else s for n, s in zip(kv_cache.shape, kv_cache.stride())]
        kv_cache = kv_cache.as_strided(kv_cache.shape, strides)
    # Reads of unlisted pages or of slots past a request's end would poison the output.
    kv_cache[spare.to(device)] = float("nan")
    for r, s in enumerate(seq_lens):
        if s % page_size:
            kv_cache[int(block_table[r, pages_per_req[r] - 1]), :, s % page_size:] = float("nan")
    k_cache, v_cache = kv_cache.transpose(1, 2).split(head_size, dim=-1)
    num_tokens = sum(query_lens) + padding_tokens
    if q_in_qkv:  # as vLLM passes it: the query columns of the fused QKV projection's output
        q = randn(num_tokens, num_q_heads + 2 * num_kv_heads, head_size)[:, :num_q_heads]
    else:
        q = randn(num_tokens, num_q_heads, head_size)
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


def tiny_llama(path, num_q_heads: int, num_kv_heads: int, head_size: int) -> str:
    """A Llama config with these attention shapes (no weights: engines load dummy ones)."""
    from transformers import LlamaConfig

    LlamaConfig(
        hidden_size=num_q_heads * head_size, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=num_q_heads, num_key_value_heads=num_kv_heads, head_dim=head_size,
        vocab_size=512, max_position_embeddings=4096,
    ).save_pretrained(path)
    return str(path)


def vllm_config(model_dir: str, **options):
    """An engine config for ``model_dir`` with these flashprefill options (sparse blocks of 64
    unless given); batches of up to 1024 tokens, 8 requests and 2048 positions."""
    from vllm.engine.arg_utils import EngineArgs

    options = {"block_size": 64, **options}
    return EngineArgs(
        model=model_dir, skip_tokenizer_init=True, load_format="dummy",
        attention_backend="FLASHPREFILL", additional_config={"flashprefill": options},
        max_model_len=2048, max_num_batched_tokens=1024, max_num_seqs=8,
    ).create_engine_config()


def attention_layer(device, name: str = "model.layers.7.self_attn.attn"):
    """What the impl reads of vLLM's Attention layer."""
    one = torch.ones((), device=device)
    return types.SimpleNamespace(layer_name=name, _q_scale=one, _k_scale=one, _v_scale=one)


def common_metadata(batch: PagedBatch):
    """vLLM's CommonAttentionMetadata of the batch (the host copies included)."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    page_size = batch.k_cache.shape[1]
    qsl = batch.query_start_loc
    slots = []
    for r, (ctx, q) in enumerate(zip(batch.context_lens, batch.query_lens)):
        pos = torch.arange(ctx, ctx + q)
        slots.append(batch.block_table[r].cpu()[pos // page_size].long() * page_size + pos % page_size)
    return CommonAttentionMetadata(
        query_start_loc=qsl,
        query_start_loc_cpu=qsl.cpu(),
        seq_lens=batch.seq_lens,
        num_reqs=len(batch.query_lens),
        num_actual_tokens=int(qsl[-1]),
        max_query_len=max(batch.query_lens),
        max_seq_len=int(batch.seq_lens.max()),
        block_table_tensor=batch.block_table,
        slot_mapping=torch.cat(slots).to(batch.q.device),
        causal=True,
        seq_lens_cpu_upper_bound=batch.seq_lens.cpu(),
    )


def build(config, batch: PagedBatch, layer_name: str = "model.layers.7.self_attn.attn"):
    """The backend's metadata builder for the batch's KV cache, and its metadata of the batch."""
    from vllm.config import set_current_vllm_config
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_flashprefill.backend import FlashPrefillMetadataBuilder

    _, page_size, num_kv_heads, head_size = batch.k_cache.shape
    spec = FullAttentionSpec(block_size=page_size, num_kv_heads=num_kv_heads, head_size=head_size,
                             dtype=batch.k_cache.dtype)
    with set_current_vllm_config(config):
        builder = FlashPrefillMetadataBuilder(spec, [layer_name], config, batch.q.device)
        return builder, builder.build(0, common_metadata(batch))


def make_impl(config, **kw):
    """The backend's attention impl for the engine's model (``kw`` overrides its arguments)."""
    from vllm.config import set_current_vllm_config

    from vllm_flashprefill.backend import FlashPrefillImpl

    model, parallel = config.model_config, config.parallel_config
    head_size = model.get_head_size()
    args = dict(
        num_heads=model.get_num_attention_heads(parallel), head_size=head_size, scale=head_size**-0.5,
        num_kv_heads=model.get_num_kv_heads(parallel), alibi_slopes=None, sliding_window=None,
        kv_cache_dtype="auto",
    )
    args.update(kw)
    with set_current_vllm_config(config):
        return FlashPrefillImpl(**args)
