"""The sparse rows of a prefill step, without vLLM: :func:`plan` once per step, :func:`run` per layer.

``plan`` takes the host-side batch metadata (where each request's rows start, each request's
sequence length after its chunk and, where known, where its prefill ends) and the requests to run
sparse, and gives an immutable :class:`SparsePlan`: their query blocks, the block lists of a
static pattern (shared by every layer), views of the dynamic workspace, and the FA3 calls when
``sparse_kernel`` is "flash_attn".
``run`` computes one layer's sparse rows into its output: ``dynamic`` scores and selects the
layer's blocks first; then our attention kernel for these rows (or FA3) attends.

Which of our kernels attends (the Hopper one or the portable one) is chosen here per shape, logged
once, and falls back to the portable kernel for the rest of the process when the Hopper kernel
fails its start-up run (:func:`warm_up`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import weakref
from collections.abc import Sequence

import numpy as np
import torch

from .block_lists import BlockLists
from .config import FlashPrefillConfig
from .flash_sparse import FlashSparsePlan, flash_sparse_rows, plan_flash_sparse
from .kernels.attention import sparse_prefill_attention
from .kernels.common import FP8_DTYPE, kernel_shape
from .kernels.dispatch import choose_sparse_kernel
from .kernels.scoring import block_scores, blocks_per_group
from .patterns import forced_block_mask, select_dynamic_lists
from .plan import QueryBlocks, build_query_blocks

# Under "vllm." so that vLLM's handler and VLLM_LOGGING_LEVEL apply inside an engine.
logger = logging.getLogger("vllm.flashprefill")


@dataclasses.dataclass(frozen=True)
class WorkspaceViews:
    """One step's rows of the dynamic workspace (see :class:`DynamicWorkspace`)."""

    scores: torch.Tensor
    pooled: torch.Tensor
    indices: torch.Tensor
    counts: torch.Tensor
    tables: torch.Tensor | None
    seqused: torch.Tensor | None

    def fits(self, num_q_heads: int, num_kv_heads: int, head_size: int) -> bool:
        return (self.scores.shape[1], self.indices.shape[1], self.pooled.shape[2]) == (
            num_q_heads, num_kv_heads, head_size)


@dataclasses.dataclass(eq=False)
class DynamicWorkspace:
    """Buffers for dynamic selection, shared by all layers. Inside vLLM the first attention layer
    allocates them while vLLM loads the model, so the memory counts with the weights: builders come
    only after vLLM has measured memory and sized the KV cache, and they take the same buffers.
    Rows keep the full width: the selection kernel is compiled for it once, whatever the prompt
    length."""

    scores: torch.Tensor  # [max query blocks, Hq, max KV blocks] fp32
    pooled: torch.Tensor  # [max query blocks, Hq, D] fp32
    indices: torch.Tensor  # [max query blocks, Hkv, max KV blocks] int32
    counts: torch.Tensor  # [max query blocks, Hkv] int32
    # sparse_kernel "flash_attn": FA3 block tables [Hkv, max query blocks, max KV blocks x pages
    # per block] and key counts [Hkv, max query blocks], int32. FA3 reads no table slot past a
    # count; zero-filled all the same, so that every slot names a real page.
    tables: torch.Tensor | None = None
    seqused: torch.Tensor | None = None

    @classmethod
    def allocate(cls, rows: int, width: int, num_q_heads: int, num_kv_heads: int, head_size: int,
                 device: torch.device | str, fa3_pages_per_block: int | None = None) -> DynamicWorkspace:
        """Room for ``rows`` query blocks over ``width`` KV blocks (and FA3 tables when
        ``fa3_pages_per_block`` is given)."""
        workspace = cls(
            scores=torch.empty(rows, num_q_heads, width, dtype=torch.float32, device=device),
            pooled=torch.empty(rows, num_q_heads, head_size, dtype=torch.float32, device=device),
            indices=torch.empty(rows, num_kv_heads, width, dtype=torch.int32, device=device),
            counts=torch.empty(rows, num_kv_heads, dtype=torch.int32, device=device),
        )
        if fa3_pages_per_block:
            workspace.add_fa3_tables(fa3_pages_per_block)
        return workspace

    @classmethod
    def shared(cls, rows: int, width: int, num_q_heads: int, num_kv_heads: int, head_size: int,
               device: torch.device | str, fa3_pages_per_block: int | None = None) -> DynamicWorkspace:
        """The process's workspace for these heads on this device: allocated on first use, reused
        while large enough (vLLM may lower ``max_model_len`` between model load and the
        builders), freed with the last holder. ``fa3_pages_per_block``: KV pages per sparse block
        of the FA3 block tables needed (None: none). A caller that needs more pages per block
        (smaller pages) than the first one adds larger tables to the same workspace."""
        device = torch.empty(0, device=device).device  # "cuda" and "cuda:0" name one device
        key = (device, num_q_heads, num_kv_heads, head_size)
        workspace = _WORKSPACES.get(key)
        if workspace is None or workspace.scores.shape[0] < rows or workspace.scores.shape[2] < width:
            workspace = cls.allocate(rows, width, num_q_heads, num_kv_heads, head_size, device)
            _WORKSPACES[key] = workspace
        if fa3_pages_per_block:
            workspace.add_fa3_tables(fa3_pages_per_block)
        return workspace

    def add_fa3_tables(self, pages_per_block: int) -> None:
        rows, num_kv_heads, width = self.indices.shape
        if self.tables is not None and self.tables.shape[2] >= width * pages_per_block:
            return
        if self.tables is not None:
            logger.warning(
                "FlashPrefill: KV pages are smaller than expected at model load; FA3 block tables "
                "grow to %d pages per row after vLLM sized the KV cache", width * pages_per_block)
        self.tables = torch.zeros(
            num_kv_heads, rows, width * pages_per_block, dtype=torch.int32, device=self.indices.device)
        self.seqused = torch.zeros(num_kv_heads, rows, dtype=torch.int32, device=self.indices.device)

    def views(self, num_qblocks: int, num_kv_blocks: int) -> WorkspaceViews:
        """The rows of a step of ``num_qblocks`` query blocks over ``num_kv_blocks`` KV blocks; a
        step the workspace cannot hold raises (the kernels would write past its buffers)."""
        rows, _, width = self.indices.shape
        if num_qblocks > rows or num_kv_blocks > width:
            raise ValueError(
                f"the step has {num_qblocks} query blocks over {num_kv_blocks} KV blocks; the dynamic "
                f"workspace holds {rows} query blocks over {width} KV blocks")
        n = slice(0, num_qblocks)
        tables = seqused = None
        if self.tables is not None:
            tables, seqused = self.tables[:, n], self.seqused[:, n]
        return WorkspaceViews(self.scores[n], self.pooled[n], self.indices[n], self.counts[n], tables, seqused)


_WORKSPACES: weakref.WeakValueDictionary[tuple, DynamicWorkspace] = weakref.WeakValueDictionary()


@dataclasses.dataclass(frozen=True)
class SparsePlan:
    """What the sparse rows of one step need; shared by every layer."""

    cfg: FlashPrefillConfig
    query_blocks: QueryBlocks
    # Static patterns: every layer's block lists ([n, 1, L], shared by all heads); dynamic: None.
    static_lists: BlockLists | None
    # Dynamic: where each layer scores and selects its blocks; static patterns: None.
    workspace: WorkspaceViews | None
    # sparse_kernel "flash_attn": the FA3 calls that replace our kernel where FA3 runs.
    flash: FlashSparsePlan | None = None


def sparse_requests(cfg: FlashPrefillConfig, seq_lens: np.ndarray, candidates: Sequence[int]) -> list[int]:
    """The requests among ``candidates`` (prefills) whose chunk reaches a block that starts at or
    beyond ``min_seq_len``; ``seq_lens``: each request's length after its chunk."""
    bs = cfg.sparse_block
    return [r for r in candidates if ((int(seq_lens[r]) - 1) // bs) * bs >= cfg.min_seq_len]


def plan(
    cfg: FlashPrefillConfig,
    query_start_loc: torch.Tensor | np.ndarray,
    seq_lens: torch.Tensor | np.ndarray,
    requests: Sequence[int],
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_size: int,
    device: torch.device | str,
    workspace: DynamicWorkspace | None = None,
    fa3_page_size: int | None = None,
    block_table: torch.Tensor | None = None,
    score_every_block: bool = False,
    prefill_lens: np.ndarray | None = None,
) -> SparsePlan:
    """The plan of one step's sparse rows: ``requests`` of the batch described by the host-side
    ``query_start_loc`` [requests + 1] and ``seq_lens`` [requests], for layers of these head
    counts and head size.

    workspace: where ``dynamic`` layers score and select (None: one allocated for this step).
    fa3_page_size: plan the FA3 calls for KV pages of this size (None: our kernels only); static
    patterns then build their block tables from ``block_table`` (vLLM's [requests, pages]).
    score_every_block: ``dynamic`` scores every query block, not only those where content
    selection can add a block (the start-up run, so that the scoring kernels compile).
    prefill_lens: [requests] the length each request's prefill reaches (0 where this chunk ends
    it), so that only the prompt's last blocks keep the dense tail; None: unknown, every chunk's
    last blocks keep it.
    """
    pattern = cfg.block_pattern
    query_blocks = build_query_blocks(
        query_start_loc, seq_lens, requests, cfg.sparse_block, device,
        blocks_per_group(num_q_heads // num_kv_heads),
        cfg if pattern.scores_content and not score_every_block else None, prefill_lens,
    )
    static_lists = views = None
    if pattern.scores_content:
        if workspace is None:
            workspace = DynamicWorkspace.allocate(
                query_blocks.num_blocks, query_blocks.num_kv_blocks, num_q_heads, num_kv_heads, head_size, device,
                cfg.sparse_block // fa3_page_size if fa3_page_size else None)
        views = workspace.views(query_blocks.num_blocks, query_blocks.num_kv_blocks)
    else:
        static_lists = BlockLists.from_mask(forced_block_mask(
            query_blocks.block_index, query_blocks.tail_end, query_blocks.num_kv_blocks, cfg))
    flash = None
    if fa3_page_size is not None:
        flash = plan_flash_sparse(query_blocks, static_lists, block_table, fa3_page_size, device)
    return SparsePlan(cfg, query_blocks, static_lists, views, flash)


def run(
    plan: SparsePlan,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    output: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    on_fa3: bool = False,
    q_scale: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """One layer's sparse rows into ``output`` (rows of other requests are left as they are).

    query, output: [tokens, Hq, D]; key_cache, value_cache: [pages, page_size, Hkv, D] views of
    the paged cache; block_table: [requests, pages] int32; seq_lens: [requests] int32 (context +
    chunk), on the device. on_fa3: this layer runs FA3, so the plan's FA3 calls (if any) replace
    our kernel. q_scale, k_scale, v_scale: the float32 scales of query, key_cache and value_cache
    where they are fp8 (e4m3; x = x8 * scale), device tensors the kernels read; fp8 rows go to our
    kernels, never to the FA3 route. Returns the block counts of the layer's lists ([n, Hkv], or
    [n, 1] when shared).
    """
    lists = layer_block_lists(plan, query, key_cache, block_table, seq_lens, scale, q_scale, k_scale)
    fp8_scales = {name: s for name, s in (("q_scale", q_scale), ("k_scale", k_scale), ("v_scale", v_scale))
                  if s is not None}
    if plan.flash is not None and on_fa3 and not fp8_scales:
        buffers = (None, None) if plan.workspace is None else (plan.workspace.tables, plan.workspace.seqused)
        flash_sparse_rows(plan.flash, plan.query_blocks, lists, query, key_cache, value_cache, output,
                          block_table, scale, *buffers)
    else:
        kernel = kernel_for(plan.cfg.sparse_kernel, query, key_cache, plan.cfg.sparse_block)
        kernel(query, key_cache, value_cache, output, block_table, seq_lens, plan.query_blocks.table,
               *lists, scale, plan.cfg.sparse_block, **fp8_scales)
    return lists.counts


def layer_block_lists(plan: SparsePlan, query: torch.Tensor, key_cache: torch.Tensor, block_table: torch.Tensor,
                      seq_lens: torch.Tensor, scale: float, q_scale: torch.Tensor | None = None,
                      k_scale: torch.Tensor | None = None) -> BlockLists:
    """The KV blocks each query block visits: the plan's static lists, or this layer's dynamic
    selection ([n, Hkv, L], in the workspace)."""
    if plan.static_lists is not None:
        return plan.static_lists
    query_blocks, workspace = plan.query_blocks, plan.workspace
    block_scores(
        query, key_cache, block_table, seq_lens, query_blocks.table, query_blocks.score_groups,
        workspace.scores, workspace.pooled, scale, query_blocks.sparse_block, q_scale=q_scale, k_scale=k_scale,
    )
    return select_dynamic_lists(
        workspace.scores, query_blocks.table, query_blocks.tail_end, key_cache.shape[2], query_blocks.num_kv_blocks,
        plan.cfg, workspace.indices, workspace.counts,
    )


# Why the Hopper kernel failed in this process (the portable kernel then runs), or None.
_hopper_failure: str | None = None


def disable_hopper_kernel(reason: str) -> None:
    """The portable kernel from now on, in this process: the Hopper kernel failed (e.g. a Triton
    release whose Gluon API it does not know)."""
    global _hopper_failure
    _hopper_failure = reason
    attention_kernel.cache_clear()


def kernel_for(sparse_kernel: str, query: torch.Tensor, key_cache: torch.Tensor, sparse_block: int):
    """Our attention kernel for these rows (:func:`attention_kernel` of their shape)."""
    return attention_kernel(sparse_kernel, *kernel_shape(query, key_cache, sparse_block))


@functools.cache
def attention_kernel(sparse_kernel: str, device: torch.device, dtype: torch.dtype, kv_dtype: torch.dtype,
                     head_size: int, page_size: int, sparse_block: int, gqa: int):
    """``kernels.dispatch.choose_sparse_kernel``, logged once per shape (a warning when "hopper"
    was asked for and cannot run)."""
    kernel, reason = choose_sparse_kernel(sparse_kernel, device, dtype, kv_dtype, head_size, page_size,
                                          sparse_block, gqa, hopper_failure=_hopper_failure)
    shape = f"d {head_size}, pages of {page_size}, GQA {gqa}"
    if reason is None:
        logger.info("FlashPrefill: sparse rows (%s) run on the Hopper kernel", shape)
    else:
        log = logger.warning if sparse_kernel == "hopper" else logger.info
        log("FlashPrefill: sparse rows (%s) run on the portable Triton kernel: %s", shape, reason)
    return kernel


def warm_up(cfg: FlashPrefillConfig, *, num_q_heads: int, num_kv_heads: int, head_size: int, page_size: int,
            dtype: torch.dtype, device: torch.device | str, workspace: DynamicWorkspace | None = None,
            on_fa3: bool = False, fp8_cache: bool = False, fp8_query: bool = False) -> None:
    """Run the sparse path once on a tiny batch, so that Triton compiles its kernels now instead
    of during the first long prompt, and the log says which attention kernel runs the sparse
    rows. ``dtype``: the output's (the model's); ``fp8_cache``, ``fp8_query``: the KV cache, the
    query in fp8 (e4m3) with scales, as the layers will pass them. ``on_fa3``: through FA3
    (precompiled; it compiles nothing), as the layers will; our attention kernel is then left to
    compile on first use. A Hopper kernel that fails here (e.g. a Triton release whose Gluon API
    it does not know) gives way to the portable one, with a warning."""
    tokens, d = 2 * cfg.sparse_block, head_size
    pages = -(-tokens // page_size)
    kv = torch.randn(pages, page_size, num_kv_heads, 2 * d, device=device)
    kv = kv.to(FP8_DTYPE if fp8_cache else dtype)
    q = torch.randn(tokens, num_q_heads, d, device=device).to(FP8_DTYPE if fp8_query else dtype)
    one = torch.ones((), device=device)
    scales = dict(q_scale=one if fp8_query else None, k_scale=one if fp8_cache else None,
                  v_scale=one if fp8_cache else None)
    block_table = torch.arange(pages, dtype=torch.int32, device=device)[None]
    seq_lens = torch.tensor([tokens], dtype=torch.int32, device=device)
    # Its two blocks need no scores (they lie below min_seq_len); scored anyway, so that the
    # scoring kernels compile here too.
    step = plan(cfg, np.array([0, tokens]), np.array([tokens]), [0], num_q_heads=num_q_heads,
                num_kv_heads=num_kv_heads, head_size=head_size, device=device, workspace=workspace,
                fa3_page_size=page_size if on_fa3 else None, block_table=block_table, score_every_block=True)
    key_cache, value_cache = kv[..., :d], kv[..., d:]
    args = (step, q, key_cache, value_cache, torch.empty(q.shape, dtype=dtype, device=device), block_table, seq_lens,
            d**-0.5)
    try:
        run(*args, on_fa3=on_fa3, **scales)
    except Exception as e:
        if kernel_for(cfg.sparse_kernel, q, key_cache, cfg.sparse_block) is sparse_prefill_attention:
            raise
        reason = f"the Hopper kernel failed its start-up run ({type(e).__name__}: {str(e)[:300]})"
        logger.warning("FlashPrefill: %s; the portable Triton kernel runs the sparse rows", reason)
        disable_hopper_kernel(reason)
        run(*args, on_fa3=on_fa3, **scales)
