"""kernels/block_tables.py: block lists -> FA3 block tables and key counts (Triton's interpreter on CPU)."""

import pytest
import torch

from tests.paged import make_paged_batch
from vllm_flashprefill.kernels.block_tables import sparse_block_tables
from vllm_flashprefill.plan import build_query_blocks

HQ, HKV, HEAD, BLOCK = 4, 2, 32, 64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_seqused_counts_listed_blocks_and_the_diagonal_up_to_the_last_row():
    batch = make_paged_batch([100], [130], HQ, HKV, HEAD, 16, torch.float32, device=DEVICE)  # 130..229
    qblocks = build_query_blocks(batch.query_start_loc.cpu(), batch.seq_lens.cpu(), [0], BLOCK, DEVICE)
    indices = torch.tensor([[[0, 2, 7]], [[1, 3, 9]]], dtype=torch.int32, device=DEVICE)  # slot 2: junk
    counts = torch.tensor([[2], [2]], dtype=torch.int32, device=DEVICE)
    tables, seqused = sparse_block_tables(qblocks.table, batch.block_table, indices, counts, BLOCK, 16)
    # Query block 2 holds positions 130..191 (diagonal keys 128..191), block 3 192..229.
    assert seqused.tolist() == [[BLOCK + 64, BLOCK + 38]]
    pages, table = BLOCK // 16, batch.block_table[0].tolist()  # 15 pages: 0..239
    assert tables[0, 0, : 2 * pages].tolist() == table[:pages] + table[2 * pages : 3 * pages]
    # Block 3's last page (240..255) lies past the request's table: never read, page 0 stands in.
    assert tables[0, 1, : 2 * pages].tolist() == table[pages : 2 * pages] + table[3 * pages :] + [0]
    assert tables.dtype == seqused.dtype == torch.int32


def test_tables_are_written_into_given_buffers_and_slots_past_the_count_are_left_alone():
    batch = make_paged_batch([200], [0], HQ, HKV, HEAD, 32, torch.float32, device=DEVICE)
    qblocks = build_query_blocks(batch.query_start_loc.cpu(), batch.seq_lens.cpu(), [0], BLOCK, DEVICE)
    # The first three of its four query blocks; slot 1 past a count of 1 holds junk.
    indices = torch.tensor([[[0, 5], [0, 5]], [[1, 5], [0, 1]], [[0, 2], [1, 2]]], dtype=torch.int32,
                           device=DEVICE)
    counts = torch.tensor([[1, 1], [1, 2], [2, 1]], dtype=torch.int32, device=DEVICE)
    tables = torch.full((HKV, 5, 6), -1, dtype=torch.int32, device=DEVICE)
    seqused = torch.full((HKV, 5), -1, dtype=torch.int32, device=DEVICE)
    out = sparse_block_tables(qblocks.table, batch.block_table, indices, counts, BLOCK, 32,
                              tables[:, :3], seqused[:, :3])
    assert out[0].data_ptr() == tables.data_ptr() and out[1].data_ptr() == seqused.data_ptr()
    page = batch.block_table[0].tolist()
    assert tables[1, 1, :4].tolist() == [page[0], page[1], page[2], page[3]]
    assert tables[0, 1].tolist() == [page[2], page[3], -1, -1, -1, -1]
    assert seqused[:, :3].tolist() == [[64, 64, 128], [64, 128, 64]]
    assert (tables[:, 3:] == -1).all() and (seqused[:, 3:] == -1).all()


def test_pages_larger_than_the_sparse_block_are_refused():
    batch = make_paged_batch([10], [0], HQ, HKV, HEAD, 128, torch.float32)
    qblocks = build_query_blocks(batch.query_start_loc, batch.seq_lens, [0], BLOCK, "cpu")
    one = torch.zeros(1, 1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple of the page size"):
        sparse_block_tables(qblocks.table, batch.block_table, one, one[:, :, 0] + 1, BLOCK, 128)


@pytest.mark.parametrize("change,message", [
    (dict(block_table=lambda t: t.long()), "block_table must be an int32 [requests, pages] tensor with contiguous"),
    (dict(kv_indices=lambda t: t.long()), "kv_indices must be an int32 [query blocks, heads, blocks] tensor"),
    (dict(kv_counts=lambda t: t[:, :1]), "kv_indices (4, 2, 2) and kv_counts (4, 1) must list the 4 query blocks for "
                                         "the same heads"),
    (dict(kv_indices=lambda t: torch.cat([t, t]), kv_counts=lambda t: torch.cat([t, t])),
     "kv_indices (8, 2, 2) and kv_counts (8, 2) must list the 4 query blocks"),  # more lists than query blocks
    (dict(tables=lambda t: t.long()), "tables must be an int32 [heads, query blocks, pages] tensor with contiguous"),
    (dict(seqused=lambda t: t.t().contiguous().t()),
     "seqused must be an int32 [heads, query blocks] tensor with contiguous rows; got torch.int32 of shape (2, 4) with "
     "strides (1, 2)"),
], ids=["block-table-int64", "kv-indices-int64", "counts-1-head", "more-lists", "tables-int64", "seqused-strided"])
def test_block_tables_refuse_inputs_the_kernel_would_misread(change, message):
    batch = make_paged_batch([200], [0], HQ, HKV, HEAD, 32, torch.float32, device=DEVICE)
    qblocks = build_query_blocks(batch.query_start_loc.cpu(), batch.seq_lens.cpu(), [0], BLOCK, DEVICE)
    inputs = dict(block_table=batch.block_table, kv_indices=torch.zeros(4, HKV, 2, dtype=torch.int32, device=DEVICE),
                  kv_counts=torch.ones(4, HKV, dtype=torch.int32, device=DEVICE),
                  tables=torch.zeros(HKV, 4, 4, dtype=torch.int32, device=DEVICE),
                  seqused=torch.zeros(HKV, 4, dtype=torch.int32, device=DEVICE))
    inputs = {name: change.get(name, lambda t: t)(t) for name, t in inputs.items()}
    with pytest.raises(ValueError) as refused:
        sparse_block_tables(qblocks.table, **inputs, sparse_block=BLOCK, page_size=32)
    assert str(refused.value).startswith(message)
