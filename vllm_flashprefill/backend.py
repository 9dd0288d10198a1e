"""The FLASHPREFILL attention backend: vLLM's FLASH_ATTN everywhere except long prefill rows.

Per step the builder splits the batch: decode rows, short prompts and whatever a layer cannot run
sparse go through FlashAttention (FA3 on Hopper) exactly as FLASH_ATTN would run them; prefill
rows of requests that reach ``min_seq_len`` go through our block-sparse kernels (Triton; on Hopper
its Gluon dialect), reading the same paged KV cache that vLLM's own cache write filled.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import ClassVar

import numpy as np
import torch
from vllm.logger import init_logger
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadata,
    FlashAttentionMetadataBuilder,
)
from vllm.v1.attention.backends.fa_utils import get_flash_attn_version
from vllm.v1.attention.backends.utils import split_decodes_and_prefills

from vllm_flashprefill import compat
from vllm_flashprefill.config import FlashPrefillConfig
from vllm_flashprefill.flash_sparse import FlashSparseRun, flash_sparse_attention, plan_runs
from vllm_flashprefill.kernels.attention import (
    SUPPORTED_HEAD_SIZES,
    preferred_page_size,
    sparse_prefill_attention,
)
from vllm_flashprefill.kernels.block_tables import sparse_block_tables
from vllm_flashprefill.kernels.dispatch import choose_sparse_kernel, disable_hopper_kernel, kernel_shape
from vllm_flashprefill.kernels.scoring import block_scores, blocks_per_group
from vllm_flashprefill.patterns import forced_block_mask, mask_to_lists, select_dynamic_lists
from vllm_flashprefill.plan import QueryBlocks, build_query_blocks
from vllm_flashprefill.registration import BACKEND_NAME
from vllm_flashprefill.stats import STATS

# Under "vllm." so that vLLM's handler and VLLM_LOGGING_LEVEL apply: a logger outside that tree
# has no handler, and its INFO lines would be dropped.
logger = init_logger("vllm.flashprefill")


def flashprefill_config(vllm_config) -> FlashPrefillConfig:
    """The validated config of this engine, read anew (FLASHPREFILL_* as they are now), its
    settings logged once per process."""
    cfg = FlashPrefillConfig.from_vllm_config(vllm_config)
    logger.info_once(cfg.summary())
    return cfg


class FlashPrefillBackend(FlashAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type["FlashPrefillImpl"]:
        return FlashPrefillImpl

    @staticmethod
    def get_builder_cls() -> type["FlashPrefillMetadataBuilder"]:
        return FlashPrefillMetadataBuilder

    @classmethod
    def get_preferred_block_size(cls, default_block_size: int) -> int:
        """KV pages that hold whole key tiles of the sparse kernel (TMA copies instead of row
        gathers); vLLM asks with the engine's config current, and ``--block-size`` overrides it."""
        preferred = super().get_preferred_block_size(default_block_size)
        from vllm.config import get_current_vllm_config

        vllm_config = get_current_vllm_config()
        if flashprefill_config(vllm_config).is_dense or vllm_config.model_config is None:
            return preferred
        pages = preferred_page_size(vllm_config.model_config.get_head_size())
        return max(preferred, pages) if pages else preferred


@dataclasses.dataclass
class DenseRun:
    """Consecutive requests FlashAttention handles: their token range and their own metadata."""

    token_start: int
    token_end: int
    metadata: FlashAttentionMetadata


@dataclasses.dataclass
class SparseStep:
    """What the sparse rows of one step need; shared by every layer."""

    query_blocks: QueryBlocks
    kv_indices: torch.Tensor | None  # static patterns: lists ready for the kernel; dynamic: per layer
    kv_counts: torch.Tensor | None
    dense_runs: list[DenseRun]
    workspace: "DynamicWorkspace | None"
    # sparse_kernel "flash_attn": the FA3 calls that replace our kernel, and for static
    # patterns their block tables and key counts (dynamic: the workspace's, per layer).
    flash_runs: list[FlashSparseRun] | None = None
    flash_tables: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclasses.dataclass
class FlashPrefillMetadata(FlashAttentionMetadata):
    sparse: SparseStep | None = None


class FlashPrefillMetadataBuilder(FlashAttentionMetadataBuilder):
    # Batches with prefills pick their kernels from the data, so they must not replay inside
    # full CUDA graphs; uniform decode batches (FlashAttention only) still do.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_BATCH
    # vLLM reuses one group's metadata for other KV-cache groups of the same spec by swapping the
    # block table (update_block_table); the dense runs hold slices of the table, so build per group.
    supports_update_block_table: bool = False

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        return AttentionCGSupport.UNIFORM_BATCH

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1, supports_spec_as_decode=True)
        self.cfg = flashprefill_config(vllm_config)
        self.page_size = kv_cache_spec.block_size  # vLLM's KV page, in tokens
        # Micro-batches (DBO) would run their sparse rows concurrently on one shared workspace.
        self.micro_batched = vllm_config.parallel_config.use_ubatching
        if self.micro_batched and not self.cfg.is_dense:
            logger.info_once("FlashPrefill: micro-batching (DBO) is on; every row runs on FlashAttention")
        self.flash_sparse = self._flash_sparse_usable()
        self.workspace = (
            DynamicWorkspace.shared(
                vllm_config, self.cfg, self.num_heads_q, self.num_heads_kv, self.headdim, device,
                self.page_size if self.flash_sparse else None,
            )
            if self.cfg.pattern == "dynamic"
            else None
        )
        if (not (self.cfg.is_dense or self.micro_batched) and self.dcp_world_size == 1
                and self.headdim in SUPPORTED_HEAD_SIZES):
            self._compile_kernels()

    def _flash_sparse_usable(self) -> bool:
        if self.cfg.sparse_kernel != "flash_attn" or self.cfg.is_dense:
            return False
        if fa3_sparse_usable(self.cfg, self.page_size, self.headdim):
            return True
        logger.warning_once(
            "FlashPrefill: sparse_kernel 'flash_attn' needs FlashAttention 3 (found %s) and KV pages "
            "that divide block_size %d (found %d); our kernels run the sparse rows",
            get_flash_attn_version(head_size=self.headdim), self.cfg.sparse_block, self.page_size,
        )
        return False

    def _compile_kernels(self) -> None:
        """Run the sparse path once on a tiny batch, so that Triton compiles its kernels at start-up
        instead of during the first long request (vLLM's profiling run passes no metadata), and the
        log says which attention kernel runs the sparse rows. With ``sparse_kernel: flash_attn``
        that includes one FA3 call (precompiled; it compiles nothing), and our attention kernel,
        which then runs only on layers whose FlashAttention version is not 3, is left to compile
        on first use."""
        if self.kv_cache_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return
        tokens, d = 2 * self.cfg.sparse_block, self.headdim
        pages = -(-tokens // self.page_size)
        kv = torch.randn(pages, self.page_size, self.num_heads_kv, 2 * d, device=self.device)
        kv = kv.to(self.kv_cache_dtype)
        q = torch.randn(tokens, self.num_heads_q, d, device=self.device).to(self.kv_cache_dtype)
        block_table = torch.arange(pages, dtype=torch.int32, device=self.device)[None]
        seq_lens = torch.tensor([tokens], dtype=torch.int32, device=self.device)
        # Its two blocks need no scores (they lie below min_seq_len); scored anyway, so that the
        # scoring kernels compile here too.
        step = self._sparse_step(np.array([0, tokens]), np.array([tokens]), [0], [], block_table,
                                 score_every_block=True)
        key_cache, value_cache = kv[..., :d], kv[..., d:]
        args = (q, key_cache, value_cache, torch.empty_like(q), block_table, seq_lens, step, self.cfg, d**-0.5)
        try:
            attend_sparse_rows(*args, on_fa3=self.flash_sparse)
        except Exception as e:
            if sparse_kernel_for(self.cfg, q, key_cache) is sparse_prefill_attention:
                raise
            # E.g. a Triton release whose Gluon API the Hopper kernel does not know.
            reason = f"the Hopper kernel failed its start-up run ({type(e).__name__}: {str(e)[:300]})"
            logger.warning("FlashPrefill: %s; the portable Triton kernel runs the sparse rows", reason)
            disable_hopper_kernel(reason)
            sparse_attention_kernel.cache_clear()
            attend_sparse_rows(*args, on_fa3=self.flash_sparse)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> FlashPrefillMetadata:
        fa = super().build(common_prefix_len, common_attn_metadata, fast_build)
        fields = {f.name: getattr(fa, f.name) for f in dataclasses.fields(FlashAttentionMetadata)}
        metadata = FlashPrefillMetadata(**fields)
        # Decode context parallelism, and batch features the sparse path does not model, keep
        # FlashAttention's own paths for the whole batch.
        if (self.cfg.is_dense or self.micro_batched or self.dcp_world_size > 1
                or compat.flash_attention_only(fa)):
            return metadata
        metadata.sparse = self._plan_sparse_step(common_attn_metadata, metadata)
        return metadata

    def _plan_sparse_step(
        self, cm: CommonAttentionMetadata, fa: FlashAttentionMetadata
    ) -> SparseStep | None:
        num_decodes, _, _, _ = split_decodes_and_prefills(
            cm, decode_threshold=self.reorder_batch_threshold
        )
        qsl = cm.query_start_loc_cpu.numpy()
        seq_lens = compat.seq_lens_cpu(cm).numpy()
        bs = self.cfg.sparse_block
        sparse = [
            r
            for r in range(num_decodes, cm.num_reqs)
            if ((int(seq_lens[r]) - 1) // bs) * bs >= self.cfg.min_seq_len
        ]
        if not sparse:
            return None
        return self._sparse_step(
            qsl, seq_lens, sparse, self._dense_runs(cm, fa, set(sparse), qsl, seq_lens), fa.block_table
        )

    def _sparse_step(self, qsl, seq_lens, requests, dense_runs, block_table,
                     score_every_block: bool = False) -> SparseStep:
        qblocks = build_query_blocks(
            qsl, seq_lens, requests, self.cfg.sparse_block, self.device,
            blocks_per_group(self.num_heads_q // self.num_heads_kv),
            self.cfg if self.cfg.pattern == "dynamic" and not score_every_block else None,
        )
        step = SparseStep(
            query_blocks=qblocks, kv_indices=None, kv_counts=None, dense_runs=dense_runs,
            workspace=self.workspace,
        )
        if self.cfg.pattern != "dynamic":
            forced = forced_block_mask(
                qblocks.block_index, qblocks.last_block, qblocks.num_kv_blocks, self.cfg
            )
            step.kv_indices, step.kv_counts = mask_to_lists(forced)
        if self.flash_sparse:
            step.flash_runs = plan_runs(qblocks.table_cpu, self.device)
            if step.kv_indices is not None:
                step.flash_tables = fa3_block_tables(
                    step, block_table, step.kv_indices, step.kv_counts, self.page_size)
        return step

    @staticmethod
    def _dense_runs(cm, fa, sparse: set[int], qsl, seq_lens) -> list[DenseRun]:
        runs, start = [], None
        for r in range(cm.num_reqs + 1):
            dense = r < cm.num_reqs and r not in sparse
            if dense and start is None:
                start = r
            if not dense and start is not None:
                t0, t1 = int(qsl[start]), int(qsl[r])
                if t1 > t0:
                    runs.append(
                        DenseRun(
                            t0,
                            t1,
                            dataclasses.replace(
                                fa,
                                num_actual_tokens=t1 - t0,
                                max_query_len=int((qsl[start + 1 : r + 1] - qsl[start:r]).max()),
                                query_start_loc=fa.query_start_loc[start : r + 1] - t0,
                                max_seq_len=int(seq_lens[start:r].max()),
                                seq_lens=fa.seq_lens[start:r],
                                block_table=fa.block_table[start:r],
                                slot_mapping=fa.slot_mapping[t0:t1],
                                scheduler_metadata=None,
                                max_num_splits=0,
                            ),
                        )
                    )
                start = None
        return runs


@dataclasses.dataclass(eq=False)
class DynamicWorkspace:
    """Buffers for dynamic selection, shared by all layers. The first attention layer allocates
    them while vLLM loads the model, so the memory counts with the weights: builders come only
    after vLLM has measured memory and sized the KV cache, and they take the same buffers. Rows
    keep the full width: the selection kernel is compiled for it once, whatever the prompt length."""

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
    def shared(cls, vllm_config, cfg: FlashPrefillConfig, num_q_heads, num_kv_heads, head_size,
               device, fa3_page_size: int | None = None):
        """The engine's workspace for these heads on this device: allocated on first use, reused
        while large enough (vLLM may lower ``max_model_len`` between model load and the
        builders), freed with the last layer or builder holding it. ``fa3_page_size``: the KV
        page size FA3 block tables are needed for (None: none needed). The model's layers guess
        it (vLLM settles it after loading the model); a builder that finds it smaller adds
        larger tables to the same workspace, which vLLM has not counted: it says so."""
        device = torch.empty(0, device=device).device  # "cuda" and "cuda:0" name one device
        sched = vllm_config.scheduler_config
        rows = sched.max_num_batched_tokens // cfg.sparse_block + 2 * sched.max_num_seqs
        width = -(-vllm_config.model_config.max_model_len // cfg.sparse_block)
        key = (device, num_q_heads, num_kv_heads, head_size)
        workspace = _WORKSPACES.get(key)
        if workspace is None or workspace.scores.shape[0] < rows or workspace.scores.shape[2] < width:
            workspace = cls(
                scores=torch.empty(rows, num_q_heads, width, dtype=torch.float32, device=device),
                pooled=torch.empty(rows, num_q_heads, head_size, dtype=torch.float32, device=device),
                indices=torch.empty(rows, num_kv_heads, width, dtype=torch.int32, device=device),
                counts=torch.empty(rows, num_kv_heads, dtype=torch.int32, device=device),
            )
            _WORKSPACES[key] = workspace
        if fa3_page_size:
            workspace._add_fa3_tables(cfg.sparse_block // fa3_page_size)
        return workspace

    def _add_fa3_tables(self, pages_per_block: int) -> None:
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

    def fits(self, num_q_heads: int, num_kv_heads: int, head_size: int) -> bool:
        return (self.scores.shape[1], self.indices.shape[1], self.pooled.shape[2]) == (
            num_q_heads, num_kv_heads, head_size)

    def views(self, num_qblocks: int):
        n = slice(0, num_qblocks)
        return self.scores[n], self.pooled[n], self.indices[n], self.counts[n]

    def fa3_views(self, num_qblocks: int):
        return self.tables[:, :num_qblocks], self.seqused[:, :num_qblocks]


_WORKSPACES: "weakref.WeakValueDictionary[tuple, DynamicWorkspace]" = weakref.WeakValueDictionary()


class FlashPrefillImpl(FlashAttentionImpl):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
        **ignored_kwargs,
    ) -> None:
        super().__init__(
            num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
            kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks=sinks,
        )
        from vllm.config import get_current_vllm_config

        vllm_config = get_current_vllm_config()
        self.cfg = flashprefill_config(vllm_config)
        self.dense_reason = self._dense_reason(
            alibi_slopes, sliding_window, kv_cache_dtype, logits_soft_cap, attn_type, sinks
        )
        if self.dense_reason and not self.cfg.is_dense:
            logger.info_once("FlashPrefill: layers with %s run dense (FlashAttention)", self.dense_reason)
        self._layer_sparse: bool | None = None
        # Held so that the buffers outlive model loading until the builders take them.
        self._workspace = None
        if self.cfg.pattern == "dynamic" and not self.dense_reason:
            self._workspace = DynamicWorkspace.shared(
                vllm_config, self.cfg, num_heads, num_kv_heads, head_size,
                vllm_config.device_config.device,
                _expected_fa3_page_size(vllm_config, self.cfg, head_size),
            )

    def _dense_reason(self, alibi, window, kv_dtype, soft_cap, attn_type, sinks) -> str | None:
        if attn_type != AttentionType.DECODER:
            return f"attention type {getattr(attn_type, 'value', attn_type)}"
        if window is not None:
            return "a sliding window"
        if sinks is not None:
            return "attention sinks"
        if alibi is not None:
            return "ALiBi"
        if soft_cap:
            return "logit soft-capping"
        if self.head_size not in SUPPORTED_HEAD_SIZES:
            return f"head size {self.head_size} (sparse kernels: {SUPPORTED_HEAD_SIZES})"
        if kv_dtype not in ("auto", "float16", "bfloat16"):
            return f"KV cache dtype {kv_dtype}"
        return None

    def _runs_sparse(self, layer) -> bool:
        if self._layer_sparse is None:
            name = getattr(layer, "layer_name", None)
            index = _layer_index(name)
            dense_layers = self.cfg.dense_layers
            if index is None and dense_layers and not (self.dense_reason or self.cfg.is_dense):
                logger.warning_once(
                    "FlashPrefill: no layer index in the layer name %r, so dense_layers %s does not apply "
                    "to it; it runs the %s pattern", name,
                    str(list(dense_layers) if isinstance(dense_layers, tuple) else dense_layers), self.cfg.pattern)
            self._layer_sparse = not (self.dense_reason or self.cfg.layer_is_dense(index))
        return self._layer_sparse

    def forward(
        self,
        layer,
        query,
        key,
        value,
        kv_cache,
        attn_metadata,
        output,
        output_scale=None,
        output_block_scale=None,
    ):
        step = getattr(attn_metadata, "sparse", None)
        # A builder sized for other head counts (vLLM 0.26 takes them from the model config, so
        # models whose layers differ get one workspace for all) cannot score this layer.
        misfit = step is not None and step.workspace is not None and not step.workspace.fits(
            self.num_heads, self.num_kv_heads, self.head_size)
        if step is None or output_scale is not None or not self._runs_sparse(layer) or misfit:
            return super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale, output_block_scale,
            )
        for run in step.dense_runs:
            lo, hi = run.token_start, run.token_end
            super().forward(  # KV-sharing layers pass no key/value: they read another layer's cache
                layer, query[lo:hi], None if key is None else key[lo:hi],
                None if value is None else value[lo:hi], kv_cache, run.metadata, output[lo:hi],
            )
        self.forward_sparse(query, kv_cache, attn_metadata, step, output)
        return output

    def forward_sparse(self, query, kv_cache, attn_metadata, step: SparseStep, output) -> None:
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        # The builder checked the platform's FlashAttention version; a layer may still run another
        # (vLLM picks it per head size), and only FA3 takes these block tables.
        counts = attend_sparse_rows(
            query, key_cache, value_cache, output, attn_metadata.block_table, attn_metadata.seq_lens,
            step, self.cfg, self.scale, on_fa3=self.vllm_flash_attn_version == 3,
        )
        STATS.record(counts, step.query_blocks.causal_pairs, self.num_kv_heads)


def attend_sparse_rows(query, key_cache, value_cache, output, block_table, seq_lens, step: SparseStep,
                       cfg: FlashPrefillConfig, scale: float, on_fa3: bool) -> torch.Tensor:
    """Attention of the step's sparse rows into ``output``: FA3 over per-query-block block tables
    when the step planned it and ``on_fa3``, else our kernel for this shape. Returns the KV block
    counts."""
    indices, counts = block_lists(query, key_cache, block_table, seq_lens, step, cfg, scale)
    if step.flash_runs is not None and on_fa3:
        tables, seqused = step.flash_tables or fa3_block_tables(
            step, block_table, indices, counts, key_cache.shape[1])
        flash_sparse_attention(query, key_cache, value_cache, output, step.flash_runs, tables, seqused, scale)
    else:
        sparse_kernel_for(cfg, query, key_cache)(
            query, key_cache, value_cache, output, block_table, seq_lens, step.query_blocks.table, indices,
            counts, scale, cfg.sparse_block)
    return counts


def sparse_kernel_for(cfg: FlashPrefillConfig, query: torch.Tensor, key_cache: torch.Tensor):
    """Our attention kernel for these rows (``sparse_attention_kernel`` of their shape)."""
    return sparse_attention_kernel(cfg.sparse_kernel, *kernel_shape(query, key_cache, cfg.sparse_block))


@functools.cache
def sparse_attention_kernel(sparse_kernel: str, device: torch.device, dtype: torch.dtype, kv_dtype: torch.dtype,
                            head_size: int, page_size: int, sparse_block: int, gqa: int):
    """``kernels.dispatch.choose_sparse_kernel``, logged once per shape (a warning when "hopper" was
    asked for and cannot run)."""
    kernel, reason = choose_sparse_kernel(sparse_kernel, device, dtype, kv_dtype, head_size, page_size,
                                          sparse_block, gqa)
    shape = f"d {head_size}, pages of {page_size}, GQA {gqa}"
    if reason is None:
        logger.info("FlashPrefill: sparse rows (%s) run on the Hopper kernel", shape)
    else:
        log = logger.warning if sparse_kernel == "hopper" else logger.info
        log("FlashPrefill: sparse rows (%s) run on the portable Triton kernel: %s", shape, reason)
    return kernel


def block_lists(query, key_cache, block_table, seq_lens, step: SparseStep, cfg: FlashPrefillConfig,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The KV blocks each query block visits: the step's static lists ([n, 1, L], shared by all
    heads), or this layer's dynamic selection ([n, Hkv, L], in the workspace), with their counts."""
    if step.kv_indices is not None:
        return step.kv_indices, step.kv_counts
    qblocks = step.query_blocks
    scores, pooled, indices, counts = step.workspace.views(qblocks.num_blocks)
    block_scores(
        query, key_cache, block_table, seq_lens, qblocks.table, qblocks.score_groups,
        scores, pooled, scale, qblocks.sparse_block,
    )
    select_dynamic_lists(
        scores, qblocks.table, seq_lens, key_cache.shape[2], qblocks.num_kv_blocks, cfg,
        indices, counts,
    )
    return indices, counts


def fa3_block_tables(step: SparseStep, block_table, indices, counts, page_size: int):
    """FA3 block tables for the step's lists: new tensors for static lists (built once per step),
    the workspace's buffers for a layer's dynamic selection."""
    qblocks = step.query_blocks
    buffers = step.workspace.fa3_views(qblocks.num_blocks) if step.kv_indices is None else (None, None)
    return sparse_block_tables(
        qblocks.table, block_table, indices, counts, qblocks.sparse_block, page_size, *buffers)


def fa3_sparse_usable(cfg: FlashPrefillConfig, page_size: int | None, head_size: int) -> bool:
    """Whether FA3 can compute the sparse rows: asked for, FA3 for this head size (vLLM picks the
    version per head size), and KV pages that tile a sparse block (each block maps to whole pages
    in the per-query-block block tables); ``page_size`` None: not known yet, leave that check out."""
    return (cfg.sparse_kernel == "flash_attn" and not cfg.is_dense
            and get_flash_attn_version(head_size=head_size) == 3
            and (page_size is None or cfg.sparse_block % page_size == 0))


def _expected_fa3_page_size(vllm_config, cfg: FlashPrefillConfig, head_size: int) -> int | None:
    """The KV page size the sparse rows' FA3 block tables will be for, or None when they will
    not run on FA3. vLLM settles the page size only after loading the model, when the dynamic
    workspace is already allocated: ``--block-size``, else this backend's preference."""
    if not fa3_sparse_usable(cfg, None, head_size):
        return None
    cache = vllm_config.cache_config
    if cache.user_specified_block_size:
        page = cache.block_size
    else:
        page = FlashPrefillBackend.get_preferred_block_size(cache.DEFAULT_BLOCK_SIZE)
    return page if fa3_sparse_usable(cfg, page, head_size) else None


def _layer_index(layer_name: str | None) -> int | None:
    if not layer_name:
        return None
    from vllm.model_executor.models.utils import extract_layer_index

    try:
        return extract_layer_index(layer_name)
    except (AssertionError, ValueError):
        return None
