"""The FLASHPREFILL attention backend: vLLM's FLASH_ATTN everywhere except long prefill rows.

Per step the builder splits the batch: decode rows, short prompts and whatever a layer cannot run
sparse go through FlashAttention (FA3 on Hopper) exactly as FLASH_ATTN would run them; prefill
rows of requests that reach ``min_seq_len`` get a ``sparse_prefill.plan``, which every layer's
impl runs (``sparse_prefill.run``) over the same paged KV cache that vLLM's own cache write filled.
This module is the vLLM glue; ``sparse_prefill.py`` and everything it calls import no vLLM.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from vllm import envs
from vllm.logger import init_logger
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadata,
    FlashAttentionMetadataBuilder,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills

from . import compat, sparse_prefill
from .config import FlashPrefillConfig
from .flash_sparse import fa3_sparse_usable, flash_attn_version
from .kernels.attention import SUPPORTED_HEAD_SIZES, preferred_page_size
from .kernels.common import FP8_DTYPE, kernel_shape
from .registration import BACKEND_NAME
from .stats import STATS

# Under "vllm." so that vLLM's handler and VLLM_LOGGING_LEVEL apply: a logger outside that tree
# has no handler, and its INFO lines would be dropped.
logger = init_logger("vllm.flashprefill")


def flashprefill_config(vllm_config) -> FlashPrefillConfig:
    """The validated config of this engine, read anew (FLASHPREFILL_* as they are now), its
    settings logged once per process."""
    cfg = FlashPrefillConfig.from_vllm_config(vllm_config)
    logger.info_once(cfg.summary())
    return cfg


# vLLM's names of an e4m3 KV cache; its other fp8 caches (fp8_e5m2, ...) run dense.
FP8_CACHE_DTYPES = ("fp8", "fp8_e4m3")


def kv_cache_unsupported(cache_dtype: str) -> str | None:
    """Why the sparse kernels cannot read a KV cache of vLLM's ``cache_dtype`` (None: they can)."""
    if cache_dtype in ("auto", "float16", "bfloat16"):
        return None
    if cache_dtype in FP8_CACHE_DTYPES:
        from vllm.platforms import current_platform

        stored = current_platform.fp8_dtype()
        if stored != FP8_DTYPE:
            return f"KV cache dtype {cache_dtype}, stored as {stored} here (the kernels read {FP8_DTYPE})"
        return None
    return f"KV cache dtype {cache_dtype} (the kernels read auto, float16, bfloat16, {', '.join(FP8_CACHE_DTYPES)})"


def queries_arrive_in_fp8(vllm_config, layer_names) -> bool:
    """Whether vLLM quantizes these layers' queries to fp8 before the impl sees them (it does for
    FlashAttention's fp8 KV cache on CUDA: ``Attention.query_quant``)."""
    layers = vllm_config.compilation_config.static_forward_context
    return any(getattr(layers.get(name), "query_quant", None) is not None for name in layer_names)


def dynamic_workspace(vllm_config, cfg: FlashPrefillConfig, num_q_heads: int, num_kv_heads: int, head_size: int,
                      device, fa3_page_size: int | None = None) -> sparse_prefill.DynamicWorkspace:
    """The engine's dynamic workspace, sized for its largest step: every query block of
    ``max_num_batched_tokens``, plus two partial blocks per request (a chunk may start and end
    inside a block), over ``max_model_len``. ``fa3_page_size``: the KV page size its FA3 block
    tables are for (None: none needed)."""
    sched = vllm_config.scheduler_config
    return sparse_prefill.DynamicWorkspace.shared(
        rows=sched.max_num_batched_tokens // cfg.sparse_block + 2 * sched.max_num_seqs,
        width=-(-vllm_config.model_config.max_model_len // cfg.sparse_block),
        num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_size=head_size, device=device,
        fa3_pages_per_block=cfg.sparse_block // fa3_page_size if fa3_page_size else None,
    )


def describe_error(error: Exception) -> str:
    """An exception in one line of at most 300 characters of message, for a warning."""
    return f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"


# Shapes (kernel_shape and the config) whose sparse rows failed in this process: FlashAttention
# runs them from then on, so that a kernel that cannot compile is not compiled again every layer.
_FAILED_SPARSE_SHAPES: set[tuple] = set()


def dense_run_splits() -> int:
    """FlashAttention's ``max_num_splits`` for a dense run: 1 in batch-invariant mode, as vLLM's
    FlashAttention builder sets it (a row's result then does not depend on the batch), else 0 (its
    heuristics; a run has no ahead-of-time schedule)."""
    return 1 if envs.VLLM_BATCH_INVARIANT else 0


@dataclasses.dataclass
class DenseRun:
    """Consecutive requests FlashAttention handles: their token range and their own metadata."""

    token_start: int
    token_end: int
    metadata: FlashAttentionMetadata


@dataclasses.dataclass
class FlashPrefillMetadata(FlashAttentionMetadata):
    # The step's sparse rows (None: FlashAttention runs the whole batch) ...
    sparse: sparse_prefill.SparsePlan | None = None
    # ... and, beside them, the runs of requests FlashAttention runs.
    dense_runs: list[DenseRun] = dataclasses.field(default_factory=list)


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
        cache_dtype = vllm_config.cache_config.cache_dtype
        self.cache_unsupported = kv_cache_unsupported(cache_dtype)
        self.fp8_cache = cache_dtype in FP8_CACHE_DTYPES
        # Micro-batches (DBO) would run their sparse rows concurrently on one shared workspace.
        self.micro_batched = vllm_config.parallel_config.use_ubatching
        if self.micro_batched and not self.cfg.is_dense:
            logger.info_once("FlashPrefill: micro-batching (DBO) is on; every row runs on FlashAttention")
        self.flash_sparse = self._flash_sparse_usable()
        # Only the chunk that ends a prompt needs the dense tail: the runner says which one does.
        compat.watch_prefill_lens()
        self.workspace = None
        if self.cfg.block_pattern.scores_content and not self.cache_unsupported:
            self.workspace = dynamic_workspace(
                vllm_config, self.cfg, self.num_heads_q, self.num_heads_kv, self.headdim, device,
                self.page_size if self.flash_sparse else None,
            )
        if (not (self.cfg.is_dense or self.micro_batched or self.cache_unsupported) and self.dcp_world_size == 1
                and self.headdim in SUPPORTED_HEAD_SIZES):
            sparse_prefill.warm_up(
                self.cfg, num_q_heads=self.num_heads_q, num_kv_heads=self.num_heads_kv, head_size=self.headdim,
                page_size=self.page_size, device=self.device, workspace=self.workspace, on_fa3=self.flash_sparse,
                # An fp8 cache is held as uint8: the output has the model's dtype.
                dtype=vllm_config.model_config.dtype if self.fp8_cache else self.kv_cache_dtype,
                fp8_cache=self.fp8_cache, fp8_query=queries_arrive_in_fp8(vllm_config, layer_names),
            )

    def _flash_sparse_usable(self) -> bool:
        if self.cfg.sparse_kernel != "flash_attn" or self.cfg.is_dense:
            return False
        if self.fp8_cache:
            logger.warning_once("FlashPrefill: sparse_kernel 'flash_attn' takes no fp8 KV cache (its FA3 calls pass "
                                "no descales); our kernels run the sparse rows")
            return False
        if fa3_sparse_usable(self.cfg, self.page_size, self.headdim):
            return True
        logger.warning_once(
            "FlashPrefill: sparse_kernel 'flash_attn' needs FlashAttention 3 (found %s) and KV pages "
            "that divide block_size %d (found %d); our kernels run the sparse rows",
            flash_attn_version(self.headdim), self.cfg.sparse_block, self.page_size,
        )
        return False

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
        if (self.cfg.is_dense or self.micro_batched or self.cache_unsupported or self.dcp_world_size > 1
                or compat.flash_attention_only(fa)):
            return metadata
        cm = common_attn_metadata
        num_decodes, _, _, _ = split_decodes_and_prefills(cm, decode_threshold=self.reorder_batch_threshold)
        qsl = cm.query_start_loc_cpu.numpy()
        seq_lens = compat.seq_lens_cpu(cm).numpy()
        sparse = sparse_prefill.sparse_requests(self.cfg, seq_lens, range(num_decodes, cm.num_reqs))
        if not sparse:
            return metadata
        try:
            metadata.sparse = sparse_prefill.plan(
                self.cfg, qsl, seq_lens, sparse, num_q_heads=self.num_heads_q, num_kv_heads=self.num_heads_kv,
                head_size=self.headdim, device=self.device, workspace=self.workspace,
                fa3_page_size=self.page_size if self.flash_sparse else None, block_table=metadata.block_table,
                prefill_lens=compat.prefill_lens(cm),
            )
        except Exception as e:  # e.g. a step the dynamic workspace cannot hold: FlashAttention runs it
            logger.warning_once("FlashPrefill: cannot plan the sparse rows of this step (%s); the step runs on "
                                "FlashAttention", describe_error(e))
            return metadata
        metadata.dense_runs = self._dense_runs(cm, metadata, set(sparse), qsl, seq_lens)
        return metadata

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
                                max_num_splits=dense_run_splits(),
                            ),
                        )
                    )
                start = None
        return runs


class FlashPrefillBackend(FlashAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[FlashPrefillImpl]:
        return FlashPrefillImpl

    @staticmethod
    def get_builder_cls() -> type[FlashPrefillMetadataBuilder]:
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
        self.fp8_cache = kv_cache_dtype in FP8_CACHE_DTYPES
        # Held so that the buffers outlive model loading until the builders take them.
        self._workspace = None
        if self.cfg.block_pattern.scores_content and not self.dense_reason:
            self._workspace = dynamic_workspace(
                vllm_config, self.cfg, num_heads, num_kv_heads, head_size, vllm_config.device_config.device,
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
        return kv_cache_unsupported(kv_dtype)

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
        if self._forward_sparse(layer, query, key, value, kv_cache, attn_metadata, output, output_scale):
            return output
        return super().forward(
            layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale,
        )

    def _forward_sparse(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale) -> bool:
        """The step's sparse rows on the sparse path and its dense runs on FlashAttention; False when
        FlashAttention must run the whole batch instead."""
        plan = getattr(attn_metadata, "sparse", None)
        # A builder sized for other head counts (vLLM 0.26 takes them from the model config, so
        # models whose layers differ get one workspace for all) cannot score this layer.
        misfit = plan is not None and plan.workspace is not None and not plan.workspace.fits(
            self.num_heads, self.num_kv_heads, self.head_size)
        if plan is None or output_scale is not None or not self._runs_sparse(layer) or misfit:
            return False
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        fp8_scales = {}
        if self.fp8_cache:  # vLLM holds it as uint8; the query may come quantized as well
            key_cache, value_cache = key_cache.view(FP8_DTYPE), value_cache.view(FP8_DTYPE)
            fp8_scales = dict(k_scale=layer._k_scale, v_scale=layer._v_scale,
                              q_scale=layer._q_scale if query.dtype == FP8_DTYPE else None)
        shape = (*kernel_shape(query, key_cache, plan.cfg.sparse_block), plan.cfg)
        if shape in _FAILED_SPARSE_SHAPES:
            return False
        try:
            counts = sparse_prefill.run(
                plan, query=query, key_cache=key_cache, value_cache=value_cache, output=output,
                block_table=attn_metadata.block_table, seq_lens=attn_metadata.seq_lens, scale=self.scale,
                # The builder checked the platform's FlashAttention version; a layer may still run
                # another (vLLM picks it per head size), and only FA3 takes the plan's block tables.
                on_fa3=self.vllm_flash_attn_version == 3, **fp8_scales,
            )
        except Exception as e:  # a descriptor, compile or launch failure: dense rows, not a dead engine
            _FAILED_SPARSE_SHAPES.add(shape)
            logger.warning(
                "FlashPrefill: the sparse rows failed (%s); FlashAttention runs every row of this step, and "
                "from now on the rows of this shape (%s KV cache, %s query, d %d, pages of %d, GQA %d)",
                describe_error(e), key_cache.dtype, query.dtype, self.head_size, key_cache.shape[1],
                self.num_heads // self.num_kv_heads)
            return False
        for run in attn_metadata.dense_runs:
            lo, hi = run.token_start, run.token_end
            super().forward(  # KV-sharing layers pass no key/value: they read another layer's cache
                layer, query[lo:hi], None if key is None else key[lo:hi],
                None if value is None else value[lo:hi], kv_cache, run.metadata, output[lo:hi],
            )
        STATS.record(counts, plan.query_blocks.causal_pairs, self.num_kv_heads)
        return True


def _expected_fa3_page_size(vllm_config, cfg: FlashPrefillConfig, head_size: int) -> int | None:
    """The KV page size the sparse rows' FA3 block tables will be for, or None when they will
    not run on FA3. vLLM settles the page size only after loading the model, when the dynamic
    workspace is already allocated: ``--block-size``, else this backend's preference."""
    cache = vllm_config.cache_config
    if not fa3_sparse_usable(cfg, None, head_size) or cache.cache_dtype in FP8_CACHE_DTYPES:
        return None
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
