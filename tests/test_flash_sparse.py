"""Static patterns through FA3 (``sparse_kernel: flash_attn``): the per-query-block block tables,
checked on CPU by running FA3's documented semantics (paged keys, causal mask aligned to the end
of each sequence) in plain PyTorch against the sparse reference. The FA3 call itself runs in the
GPU tests (tests/test_backend.py on CUDA)."""

import pytest
import torch
from vllm_flashprefill.kernels.reference import gather_kv, sparse_attention_reference

from tests.paged import make_paged_batch
from vllm_flashprefill.config import FlashPrefillConfig
from vllm_flashprefill.flash_sparse import plan_runs, virtual_block_tables
from vllm_flashprefill.patterns import forced_block_mask, mask_to_lists
from vllm_flashprefill.plan import build_query_blocks

HQ, HKV, HEAD, BLOCK = 4, 2, 32, 64


def flash_attn_semantics(q, k_cache, v_cache, runs, scale):
    """What FA3's varlen call with a block table and ``causal=True`` computes, in fp32."""
    gqa = q.shape[1] // k_cache.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float32)
    for run in runs:
        cu = run.cu_seqlens_q.tolist()
        for i, used in enumerate(run.seqused_k.tolist()):
            lo, hi = run.token_start + cu[i], run.token_start + cu[i + 1]
            assert hi - lo <= run.max_seqlen_q and used <= run.max_seqlen_k
            k = gather_kv(k_cache, run.block_tables[i], used).float().repeat_interleave(gqa, 1)
            v = gather_kv(v_cache, run.block_tables[i], used).float().repeat_interleave(gqa, 1)
            rows = torch.arange(hi - lo)
            visible = torch.arange(used)[None, :] <= (used - (hi - lo) + rows)[:, None]
            logits = torch.einsum("thd,shd->hts", q[lo:hi].float(), k) * scale
            probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
            out[lo:hi] = torch.einsum("hts,shd->thd", probs, v)
    return out


@pytest.mark.parametrize("page", [16, 32, 64])
def test_block_tables_give_the_pattern_under_fa3s_causal_mask(page):
    # A long prompt, a short (dense) one between, and a chunk whose cached context ends inside a
    # block: two runs, a partial first query block, and partial diagonal blocks.
    query_lens, context_lens = [300, 40, 250], [0, 0, 150]
    batch = make_paged_batch(query_lens, context_lens, HQ, HKV, HEAD, page, torch.float32, seed=3)
    qblocks = build_query_blocks(batch.query_start_loc, batch.seq_lens, [0, 2], BLOCK, "cpu")
    cfg = FlashPrefillConfig(pattern="hybrid", block_size=BLOCK, min_seq_len=0, sink_blocks=1,
                             local_blocks=1, stride=3, dense_tail_blocks=1)
    mask = forced_block_mask(qblocks.block_index, qblocks.last_block, qblocks.num_kv_blocks, cfg)
    assert not mask.all(), "the pattern must skip blocks for the test to mean anything"
    indices, counts = mask_to_lists(mask)
    runs = plan_runs(qblocks.table_cpu, batch.block_table, indices, counts, BLOCK, page)
    qsl = batch.query_start_loc.tolist()
    assert [(r.token_start, r.token_end) for r in runs] == [(0, qsl[1]), (qsl[2], qsl[3])]
    out = flash_attn_semantics(batch.q, batch.k_cache, batch.v_cache, runs, HEAD**-0.5)
    ref = sparse_attention_reference(
        batch.q, batch.k_cache, batch.v_cache, batch.block_table, batch.seq_lens,
        qblocks.table, mask, HEAD**-0.5, BLOCK,
    )
    assert not ref.isnan().any()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_seqused_counts_listed_blocks_and_the_diagonal_up_to_the_last_row():
    batch = make_paged_batch([100], [130], HQ, HKV, HEAD, 16, torch.float32)  # positions 130..229
    qblocks = build_query_blocks(batch.query_start_loc, batch.seq_lens, [0], BLOCK, "cpu")
    indices = torch.tensor([[[0, 2, 7]], [[1, 3, 9]]], dtype=torch.int32)  # slot 2: junk
    counts = torch.tensor([[2], [2]], dtype=torch.int32)
    tables, seqused = virtual_block_tables(
        qblocks.table_cpu, batch.block_table, indices, counts, BLOCK, 16)
    # Query block 2 holds positions 130..191 (diagonal keys 128..191), block 3 192..229.
    assert seqused.tolist() == [BLOCK + 64, BLOCK + 38]
    pages, table = BLOCK // 16, batch.block_table[0].tolist()  # 15 pages: 0..239
    assert tables[0, : 2 * pages].tolist() == table[:pages] + table[2 * pages : 3 * pages]
    # Block 3's last page (240..255) lies past the request's table: never read, any valid page.
    assert tables[1, : 2 * pages - 1].tolist() == table[pages : 2 * pages] + table[3 * pages :]
    assert tables.min() >= 0 and tables.max() < batch.kv_cache.shape[0]
    assert tables.dtype == seqused.dtype == torch.int32


def test_pages_larger_than_the_sparse_block_are_refused():
    batch = make_paged_batch([10], [0], HQ, HKV, HEAD, 128, torch.float32)
    qblocks = build_query_blocks(batch.query_start_loc, batch.seq_lens, [0], BLOCK, "cpu")
    one = torch.zeros(1, 1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple of the page size"):
        virtual_block_tables(qblocks.table_cpu, batch.block_table, one, one[:, :, 0] + 1, BLOCK, 128)
