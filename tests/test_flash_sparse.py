"""flash_sparse.py, the sparse rows through FA3 (``sparse_kernel: flash_attn``): the per-query-block
block tables and ``flash_sparse_attention``'s calls (head and cache slices per table group), with
FA3 replaced by its documented semantics (``kernels/reference.py``: paged keys, causal mask aligned
to the end of each sequence) in plain PyTorch, against the sparse reference. The real FA3 call runs
in tests/test_backend.py on CUDA; the tables alone in tests/test_block_tables.py."""

import pytest
import torch

from tests.paged import make_paged_batch
from vllm_flashprefill.block_lists import BlockLists
from vllm_flashprefill.config import FlashPrefillConfig
from vllm_flashprefill.flash_sparse import flash_sparse_attention, plan_runs
from vllm_flashprefill.kernels.block_tables import sparse_block_tables
from vllm_flashprefill.kernels.reference import sparse_attention_reference
from vllm_flashprefill.patterns import forced_block_mask
from vllm_flashprefill.plan import build_query_blocks

HQ, HKV, HEAD, BLOCK = 4, 2, 32, 64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def per_head_mask(qblocks, seed):
    """Random causal lists per KV head, always with the diagonal block (as dynamic selection)."""
    gen = torch.Generator().manual_seed(seed)
    n, nkb = qblocks.num_blocks, qblocks.num_kv_blocks
    kb = torch.arange(nkb, device=DEVICE)
    causal = kb[None, None, :] <= qblocks.block_index[:, None, None]
    mask = (torch.rand(n, HKV, nkb, generator=gen).to(DEVICE) < 0.4) & causal
    return mask | (kb[None, None, :] == qblocks.block_index[:, None, None])


@pytest.mark.parametrize("page", [16, 32, 64])
@pytest.mark.parametrize("lists", ["shared", "per_head"])
def test_block_tables_give_the_pattern_under_fa3s_causal_mask(page, lists, fake_fa3):
    # A long prompt, a short (dense) one between, and a chunk whose cached context ends inside a
    # block: two runs, a partial first query block, and partial diagonal blocks.
    query_lens, context_lens = [300, 40, 250], [0, 0, 150]
    batch = make_paged_batch(query_lens, context_lens, HQ, HKV, HEAD, page, torch.float32, seed=3, device=DEVICE)
    qblocks = build_query_blocks(batch.query_start_loc.cpu(), batch.seq_lens.cpu(), [0, 2], BLOCK, DEVICE)
    if lists == "shared":  # a static pattern: one list for all heads
        cfg = FlashPrefillConfig(pattern="hybrid", sparse_block=BLOCK, min_seq_len=0, sink_blocks=1,
                                 local_blocks=1, stride=3, dense_tail_blocks=1)
        mask = forced_block_mask(qblocks.block_index, qblocks.tail_end, qblocks.num_kv_blocks, cfg)
    else:  # dynamic selection: one list per KV head
        mask = per_head_mask(qblocks, seed=page)
        assert not torch.equal(mask[:, 0], mask[:, 1])
    assert not mask.all(), "the pattern must skip blocks for the test to mean anything"
    indices, counts = BlockLists.from_mask(mask)
    runs = plan_runs(qblocks.table_cpu, DEVICE)
    qsl = batch.query_start_loc.tolist()
    assert [(r.token_start, r.token_end) for r in runs] == [(0, qsl[1]), (qsl[2], qsl[3])]
    tables, seqused = sparse_block_tables(qblocks.table, batch.block_table, indices, counts, BLOCK, page)
    assert tables.shape[0] == seqused.shape[0] == mask.shape[1]
    out = torch.full_like(batch.q, float("nan"))
    flash_sparse_attention(batch.q, batch.k_cache, batch.v_cache, out, runs, tables, seqused, HEAD**-0.5)
    # One call per run, and per KV head when the lists are per head (its query heads, its cache).
    groups = mask.shape[1]
    assert fake_fa3 == [(HQ // groups, HKV // groups, r.qblock_end - r.qblock_start)
                          for r in runs for _ in range(groups)]
    ref = sparse_attention_reference(
        batch.q, batch.k_cache, batch.v_cache, batch.block_table, batch.seq_lens,
        qblocks.table, mask, HEAD**-0.5, BLOCK,
    )
    assert not ref.isnan().any()
    rows = torch.cat([torch.arange(r.token_start, r.token_end) for r in runs])
    assert out[rows].isfinite().all()
    torch.testing.assert_close(out[rows], ref[rows], atol=1e-5, rtol=1e-5)


def test_fa3_gets_each_kv_head_slice_with_size_one_strides_set_as_a_contiguous_layout(monkeypatch):
    """Per-head tables slice one KV head off the cache (and a rank may hold one only): FA3 gets that
    size-1 head dimension with the stride a contiguous layout gives it, as vLLM's FLASH_ATTN passes
    its caches, not whatever the view carried."""
    from vllm.v1.attention.backends import fa_utils

    strides = []
    monkeypatch.setattr(fa_utils, "flash_attn_varlen_func",
                        lambda q, k, v, **kw: strides.append((k.stride(), v.stride())), raising=False)
    batch = make_paged_batch([64], [0], HQ, 1, HEAD, 16, torch.float32, device=DEVICE)
    k_cache, v_cache = (c.as_strided(c.shape, (*c.stride()[:2], 1, 1)) for c in (batch.k_cache, batch.v_cache))
    qblocks = build_query_blocks(batch.query_start_loc.cpu(), batch.seq_lens.cpu(), [0], BLOCK, DEVICE)
    runs = plan_runs(qblocks.table_cpu, DEVICE)
    tables = torch.zeros(1, 1, 4, dtype=torch.int32, device=DEVICE)
    seqused = torch.full((1, 1), 64, dtype=torch.int32, device=DEVICE)
    flash_sparse_attention(batch.q, k_cache, v_cache, torch.empty_like(batch.q), runs, tables, seqused, 1.0)
    row = batch.k_cache.stride(1)
    assert strides == [((16 * row, row, HEAD, 1), (16 * row, row, HEAD, 1))]
