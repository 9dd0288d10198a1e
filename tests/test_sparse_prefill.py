"""sparse_prefill.py without vLLM: a step's plan and one layer's run against the reference, which
requests run sparse, the dynamic workspace, and the Hopper kernel's fallback. Inside vLLM's classes
the same calls run in tests/test_backend.py."""

import numpy as np
import pytest
import torch

from tests.paged import make_paged_batch
from vllm_flashprefill import sparse_prefill
from vllm_flashprefill.config import FlashPrefillConfig
from vllm_flashprefill.kernels.attention import sparse_prefill_attention
from vllm_flashprefill.kernels.reference import sparse_attention_reference
from vllm_flashprefill.patterns import select_dynamic
from vllm_flashprefill.sparse_prefill import DynamicWorkspace

HQ, HKV, HEAD, PAGE, BLOCK = 4, 2, 64, 16, 64


def test_requests_run_sparse_from_the_block_that_reaches_min_seq_len():
    cfg = FlashPrefillConfig(pattern="hybrid", sparse_block=BLOCK, min_seq_len=4 * BLOCK)
    # Lengths after the chunk: the last block of 256 starts at 192, of 257 at 256.
    seq_lens = np.array([4 * BLOCK, 4 * BLOCK + 1, 5 * BLOCK, 1000])
    assert sparse_prefill.sparse_requests(cfg, seq_lens, range(4)) == [1, 2, 3]
    assert sparse_prefill.sparse_requests(cfg, seq_lens, [0, 3]) == [3]


@pytest.mark.parametrize("pattern", ["hybrid", "dynamic"])
def test_plan_and_run_write_the_reference_rows(pattern):
    """Two requests (a prompt, a chunk after cached context) planned once and run as a layer:
    static lists shared by the heads, or the layer's own per-KV-head selection in the workspace."""
    batch = make_paged_batch([200, 130], [0, 190], HQ, HKV, HEAD, PAGE, torch.float16, seed=5)
    cfg = FlashPrefillConfig(pattern=pattern, sparse_block=BLOCK, min_seq_len=0, sink_blocks=0, local_blocks=0,
                             stride=2, threshold=1.0, above_mean=0.0, dense_tail_blocks=0, sparse_kernel="triton")
    plan = sparse_prefill.plan(cfg, batch.query_start_loc, batch.seq_lens, [0, 1], num_q_heads=HQ,
                               num_kv_heads=HKV, head_size=HEAD, device="cpu")
    out = torch.full_like(batch.q, float("nan"))
    counts = sparse_prefill.run(plan, batch.q, batch.k_cache, batch.v_cache, out, batch.block_table,
                                batch.seq_lens, HEAD**-0.5)
    qblocks = plan.query_blocks
    if pattern == "dynamic":
        assert plan.static_lists is None and plan.flash is None
        mask = select_dynamic(plan.workspace.scores, qblocks.block_index, qblocks.tail_end, HKV, cfg)
    else:
        assert plan.workspace is None and plan.flash is None
        mask = plan.static_lists.to_mask(qblocks.num_kv_blocks)
    assert torch.equal(counts, mask.sum(-1, dtype=torch.int32))
    causal = sum(pos // BLOCK + 1 for _, _, pos, _ in qblocks.table_cpu) * mask.shape[1]
    assert 0 < mask.sum() < causal, "the pattern must skip blocks for the comparison to mean anything"
    ref = sparse_attention_reference(
        batch.q, batch.k_cache, batch.v_cache, batch.block_table, batch.seq_lens, qblocks.table, mask,
        HEAD**-0.5, BLOCK,
    )
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)


def test_workspace_is_shared_while_large_enough_and_its_fa3_tables_grow(caplog):
    heads = dict(num_q_heads=HQ, num_kv_heads=HKV, head_size=48, device="cpu")  # heads no other test uses
    workspace = DynamicWorkspace.shared(rows=10, width=8, **heads)
    assert DynamicWorkspace.shared(rows=6, width=8, **heads) is workspace
    views = workspace.views(3, 8)
    assert views.scores.shape == (3, HQ, 8) and views.indices.shape == (3, HKV, 8) and views.tables is None
    assert views.fits(HQ, HKV, 48) and not views.fits(HQ // 2, HKV // 2, 48)
    with caplog.at_level("WARNING", logger="vllm.flashprefill"):
        assert DynamicWorkspace.shared(rows=10, width=8, fa3_pages_per_block=2, **heads) is workspace
        assert "grow" not in caplog.text
        assert DynamicWorkspace.shared(rows=10, width=8, fa3_pages_per_block=4, **heads) is workspace
    assert "FA3 block tables grow" in caplog.text
    assert workspace.views(3, 8).tables.shape == (HKV, 3, 8 * 4) and workspace.views(3, 8).seqused.shape == (HKV, 3)
    assert DynamicWorkspace.shared(rows=20, width=8, **heads) is not workspace


@pytest.mark.parametrize("rows,width", [(4, 8), (16, 4)], ids=["too-many-query-blocks", "too-many-kv-blocks"])
def test_a_step_the_dynamic_workspace_cannot_hold_is_refused_at_plan_time(rows, width):
    """A step of 8 query blocks over 5 KV blocks (300 rows, and 130 rows after 190 cached) in a workspace of
    fewer rows or narrower rows: plan() raises, naming both sizes (the kernels wrote past the
    buffers before, up to a segfault)."""
    cfg = FlashPrefillConfig(pattern="dynamic", sparse_block=BLOCK, min_seq_len=0)
    workspace = DynamicWorkspace.allocate(rows, width, HQ, HKV, HEAD, "cpu")
    batch = make_paged_batch([300, 130], [0, 190], HQ, HKV, HEAD, PAGE, torch.float16)
    with pytest.raises(ValueError) as refused:
        sparse_prefill.plan(cfg, batch.query_start_loc, batch.seq_lens, [0, 1], num_q_heads=HQ, num_kv_heads=HKV,
                            head_size=HEAD, device="cpu", workspace=workspace)
    assert str(refused.value) == (f"the step has 8 query blocks over 5 KV blocks; the dynamic workspace holds "
                                  f"{rows} query blocks over {width} KV blocks")
    big_enough = DynamicWorkspace.allocate(8, 5, HQ, HKV, HEAD, "cpu")
    sparse_prefill.plan(cfg, batch.query_start_loc, batch.seq_lens, [0, 1], num_q_heads=HQ, num_kv_heads=HKV,
                        head_size=HEAD, device="cpu", workspace=big_enough)


def test_a_hopper_kernel_that_failed_gives_way_to_the_portable_one(capability, monkeypatch):
    attention_hopper = pytest.importorskip("vllm_flashprefill.kernels.attention_hopper",
                                           reason="this Triton has no Gluon (or another Gluon API)")
    capability(9)
    monkeypatch.setattr(sparse_prefill, "_hopper_failure", None)
    shape = (torch.device("cuda", 0), torch.bfloat16, torch.bfloat16, 128, 64, 128, 4)
    sparse_prefill.attention_kernel.cache_clear()
    try:
        assert sparse_prefill.attention_kernel("auto", *shape) is attention_hopper.sparse_prefill_attention
        sparse_prefill.disable_hopper_kernel("it failed its start-up run (CompilationError: ...)")
        assert sparse_prefill.attention_kernel("auto", *shape) is sparse_prefill_attention
    finally:
        sparse_prefill.attention_kernel.cache_clear()
