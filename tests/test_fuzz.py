"""A randomized fuzzer of the backend: random batches through vLLM's real metadata builder and our
impl (Triton's interpreter on CPU), against a float64 reference of the attention each row must get.

Each case draws from its own seed a batch in vLLM's decode-first order — decodes, fresh prompts,
chunked continuations (context anywhere) and prefix-cache hits (a context of whole pages, shared
with the request before) — over shuffled pages of 16 to 128 slots in one of vLLM's KV-cache
layouts (size-1 dims with any stride), GQA 1 to 8, head sizes 64/128/256, lengths of 1, a sparse
block +- 1 and min_seq_len +- 1, with a random pattern and options, and the prompt lengths a model
runner publishes (half the prefills stop short of their prompt's end). Sparse blocks are 64 tokens and
min_seq_len small, so that the sparse path engages on short, cheap prompts. fp16 only: the
interpreter's ``tl.dot`` on bf16 returns garbage (Triton 3.9), so bf16 is for the GPU tests.

Rows that go to FlashAttention run on ``fake_flash_attention`` (tests/conftest.py) on CPU, and
``sparse_kernel: flash_attn`` on ``fake_fa3``; the builder's start-up run (``sparse_prefill.warm_up``)
is skipped (its own tests cover it). A static pattern's reference mask is built here from the rule
README states; a dynamic one applies the kernel's own block lists, which must hold those forced
blocks and are checked against ``patterns.select_dynamic`` over the kernel's scores, and the scores
against the reference ones. CPU only for now (a GPU run, larger and on the real FlashAttention, is
still to write).

A failure names its seed. Reproduce one case: ``FLASHPREFILL_FUZZ_SEED=<seed> FUZZ_CASES=1``;
more cases: ``FUZZ_CASES=500`` (seeds from FLASHPREFILL_FUZZ_SEED, default 0, upward). Set
FLASHPREFILL_FUZZ_SEED for this file alone: other tests read ``FLASHPREFILL_*`` as options.
"""

from __future__ import annotations

import dataclasses
import os
import random

import numpy as np
import pytest
import torch

from tests.paged import (
    KV_CACHE_LAYOUTS,
    attention_layer,
    build,
    make_impl,
    make_paged_batch,
    tiny_llama,
    vllm_config,
)
from vllm_flashprefill import backend, compat, flash_sparse, sparse_prefill
from vllm_flashprefill.block_lists import BlockLists
from vllm_flashprefill.kernels.reference import block_scores_reference, sparse_attention_reference
from vllm_flashprefill.patterns import select_dynamic

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="CPU fuzzer: Triton's interpreter, faked FlashAttention")

FIRST_SEED = int(os.environ.get("FLASHPREFILL_FUZZ_SEED", "0"))
CASES = int(os.environ.get("FUZZ_CASES", "64"))
BLOCK = 64  # the sparse block (vllm_config's default)
DTYPE = torch.float16


@dataclasses.dataclass
class Case:
    seed: int
    query_lens: list[int]
    context_lens: list[int]
    shared_pages: list[int]
    num_q_heads: int
    num_kv_heads: int
    head_size: int
    page_size: int
    layout: str
    num_layers: int
    layer: int
    singleton_stride: int | None
    q_in_qkv: bool
    padding_tokens: int
    options: dict
    # Per request where its prefill ends, as the runner publishes it (compat.prefill_lens): past
    # the chunk where the chunk stops short of its prompt's end, else 0.
    prefill_lens: list[int]


def draw_case(seed: int) -> Case:
    rng = random.Random(seed)
    options = dict(
        pattern=rng.choice(["local", "strided", "hybrid", "dynamic"]),
        sink_blocks=rng.choice([0, 1, 2]), local_blocks=rng.choice([0, 1, 2, 3]),
        dense_tail_blocks=rng.choice([0, 0, 0, 1, 2]),
        min_seq_len=rng.choice([0, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK, 3 * BLOCK - 1, 3 * BLOCK + 1]),
        sparse_kernel=rng.choice(["triton", "triton", "flash_attn"]),
    )
    strided = options["pattern"] in ("strided", "hybrid")
    options["stride"] = rng.choice([1, 2, 3, 5, 7] if strided else [0, 2, 3, 5])
    if options["pattern"] == "dynamic":
        min_budget = rng.choice([0, 0, 1, 2])
        options.update(
            threshold=rng.choice([0.0, 0.05, 0.3, 1.0]), above_mean=rng.choice([0.0, 1.5, 2.0]),
            min_budget=min_budget, max_budget=rng.choice([0, max(min_budget, 1), 3]),
        )
    edges = [1, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + 1, 3 * BLOCK - 1]
    m = options["min_seq_len"]
    edges += [x for x in (m - 1, m, m + 1, m + BLOCK - 1, m + BLOCK + 1) if x > 0]

    def length(lo: int = 1, blocks: int = 3) -> int:
        return max(lo, rng.choice(edges) if rng.random() < 0.6 else rng.randint(2, blocks * BLOCK))

    page_size = rng.choice([16, 32, 64, 128])
    # Long contexts before short chunks: query blocks far from the start, where patterns skip
    # blocks, at little cost (the kernels visit only the kept blocks).
    requests = []
    for kind in rng.choices(["decode", "fresh", "chunk", "prefix"], [1, 1, 2, 2], k=rng.randint(1, 4)):
        if kind == "decode":
            requests.append((kind, rng.choice([0, length(1, 16)]), 1))
        elif kind == "fresh":
            requests.append((kind, 0, length(2)))
        elif kind == "chunk":
            requests.append((kind, length(1, 16), length(2)))
        else:
            requests.append((kind, page_size * rng.randint(1, 16 * BLOCK // page_size), length(2)))
    requests.sort(key=lambda r: r[2] > 1)  # vLLM's order: decodes (one-token queries) first
    kinds, context_lens, query_lens = (list(x) for x in zip(*requests))
    head_size = rng.choice([64, 128, 256])
    while sum(query_lens) > (256 if head_size < 256 else 160):  # keep the interpreter's work modest
        i = query_lens.index(max(query_lens))
        query_lens[i] = max(2, query_lens[i] // 2)
    shared = [0] + [
        rng.randint(0, min(context_lens[r - 1], context_lens[r]) // page_size)
        if kinds[r] == "prefix" or rng.random() < 0.2 else 0
        for r in range(1, len(requests))
    ]
    num_kv_heads = rng.choice([1, 1, 2])
    gqa = rng.randint(1, 8)
    num_layers = rng.choice([1, 2, 3])
    return Case(
        seed=seed, query_lens=query_lens, context_lens=context_lens, shared_pages=shared,
        num_q_heads=gqa * num_kv_heads, num_kv_heads=num_kv_heads, head_size=head_size,
        page_size=page_size, layout=rng.choice(KV_CACHE_LAYOUTS), num_layers=num_layers,
        layer=rng.randrange(num_layers),
        singleton_stride=rng.choice([None, 0, 1, 3, 2 * head_size + 8]), q_in_qkv=rng.random() < 0.5,
        padding_tokens=rng.choice([0, 0, 3]), options=options,
        prefill_lens=[  # drawn last, so that each seed draws the batch it drew before these lengths
            context + query + rng.choice([1, BLOCK - 1, BLOCK, 2 * BLOCK + 1, rng.randint(1, 4 * BLOCK)])
            if query > 1 and rng.random() < 0.5 else 0
            for context, query in zip(context_lens, query_lens)
        ],
    )


def expected_mask(block: int, tail_end: int, nkb: int, options: dict) -> torch.Tensor:
    """[nkb] the KV blocks a query block keeps regardless of content, as README states the rule:
    every causal block for a block below min_seq_len or in the prompt's dense tail (the
    dense_tail_blocks blocks up to ``tail_end``, the block holding the prompt's last token), else
    the diagonal, the sink blocks, the local window (local/hybrid/dynamic) and every stride-th
    block back from the diagonal (strided/hybrid/dynamic)."""
    kb = torch.arange(nkb)
    causal = kb <= block
    in_tail = tail_end - options["dense_tail_blocks"] < block <= tail_end
    if block * BLOCK < options["min_seq_len"] or in_tail:
        return causal
    keep = (kb == block) | (kb < options["sink_blocks"])
    if options["pattern"] != "strided":
        keep |= kb >= block - options["local_blocks"]
    if options["pattern"] != "local" and options["stride"]:
        keep |= (block - kb) % options["stride"] == 0
    return keep & causal


def reference_blocks(batch):
    """Every request's query rows cut at absolute block boundaries: [(request, first row, first
    position, rows)]."""
    rows, qsl = [], batch.query_start_loc.tolist()
    for r, (context, query) in enumerate(zip(batch.context_lens, batch.query_lens)):
        seq_len = context + query
        for block in range(context // BLOCK, (seq_len - 1) // BLOCK + 1):
            start, end = max(block * BLOCK, context), min((block + 1) * BLOCK, seq_len)
            rows.append((r, qsl[r] + start - context, start, end - start))
    return rows


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    made = {}

    def model_dir(num_q_heads, num_kv_heads, head_size):
        key = (num_q_heads, num_kv_heads, head_size)
        if key not in made:
            made[key] = tiny_llama(tmp_path_factory.mktemp("llama"), *key)
        return made[key]

    return model_dir


@pytest.mark.usefixtures("fake_flash_attention", "fake_fa3")
@pytest.mark.parametrize("seed", range(FIRST_SEED, FIRST_SEED + CASES))
def test_random_batch_matches_reference(seed, model_dirs, clean_flashprefill_env):
    monkeypatch = clean_flashprefill_env
    case = draw_case(seed)
    where = f"FLASHPREFILL_FUZZ_SEED={seed} FUZZ_CASES=1 reproduces: {case}"
    monkeypatch.setattr(sparse_prefill, "warm_up", lambda *args, **kw: None)
    monkeypatch.setattr(flash_sparse, "flash_attn_version", lambda *args, **kw: 3)
    options = case.options
    config = vllm_config(model_dirs(case.num_q_heads, case.num_kv_heads, case.head_size), **options)
    batch = make_paged_batch(
        case.query_lens, case.context_lens, case.num_q_heads, case.num_kv_heads, case.head_size,
        case.page_size, DTYPE, seed=seed, layout=case.layout, num_layers=case.num_layers,
        layer=case.layer, singleton_stride=case.singleton_stride, shared_pages=case.shared_pages,
        block_table_slack=2, q_in_qkv=case.q_in_qkv, padding_tokens=case.padding_tokens,
    )
    compat.publish_prefill_lens(compat.PublishedPrefillLens(
        query_start_loc=batch.query_start_loc.cpu().numpy(), seq_lens=batch.seq_lens.cpu().numpy(),
        prefill_lens=np.array(case.prefill_lens)))
    try:
        _, meta = build(config, batch)
    finally:
        compat.publish_prefill_lens(None)
    step = meta.sparse
    impl = make_impl(config)
    impl.vllm_flash_attn_version = 3  # what vLLM picks on Hopper (FA3 is faked here)
    out = torch.full(batch.q.shape, float("nan"), dtype=batch.q.dtype)
    failed = set()  # shapes whose sparse rows raised (then FlashAttention runs them, with a warning)
    monkeypatch.setattr(backend, "_FAILED_SPARSE_SHAPES", failed)
    impl.forward(attention_layer("cpu"), batch.q, None, None, batch.kv_cache, meta, out)
    assert not failed, f"the sparse path raised and FlashAttention ran the step; {where}"

    # Which requests run sparse: prefill chunks that reach a block at or past min_seq_len.
    seq_lens = batch.seq_lens.tolist()
    tokens = sum(case.query_lens)
    sparse = {r for r, (q, s) in enumerate(zip(case.query_lens, seq_lens))
              if q > 1 and (s - 1) // BLOCK * BLOCK >= options["min_seq_len"]}
    assert sparse == (set() if step is None else set(step.query_blocks.table_cpu[:, 0].tolist())), where
    blocks = reference_blocks(batch)
    nkb = max(seq_lens[r] - 1 for r, *_ in blocks) // BLOCK + 1
    mask = torch.zeros(len(blocks), case.num_kv_heads, nkb, dtype=torch.bool)
    for i, (r, _, pos, _) in enumerate(blocks):
        block = pos // BLOCK
        tail_end = (max(seq_lens[r], case.prefill_lens[r]) - 1) // BLOCK
        mask[i] = expected_mask(block, tail_end, nkb, options) if r in sparse else (
            torch.arange(nkb) <= block)
    if step is not None:
        qblocks = step.query_blocks
        row_of = {(r, pos // BLOCK): i for i, (r, _, pos, _) in enumerate(blocks)}
        rows = [row_of[(r, pos // BLOCK)] for r, _, pos, _ in qblocks.table_cpu.tolist()]
        if options["pattern"] == "dynamic":
            lists = BlockLists(step.workspace.indices, step.workspace.counts).to_mask(nkb)
            assert (lists | ~mask[rows]).all(), f"dynamic lists lack a forced block; {where}"
            check_scores_and_selection(batch, impl, qblocks, step.workspace.scores, lists, nkb, where)
            mask[rows] = lists
        else:
            lists = step.static_lists.to_mask(nkb)
            assert torch.equal(lists.expand(-1, case.num_kv_heads, -1), mask[rows]), where
    causal_blocks = torch.tensor([pos // BLOCK + 1 for _, _, pos, _ in blocks])
    skipping = int((mask.sum(-1) < causal_blocks[:, None]).any(-1).sum())
    print(f"seed {seed}: {options['pattern']}, {tokens} tokens, {len(sparse)} of {len(seq_lens)} requests "
          f"sparse, {skipping} query blocks skip KV blocks")  # what a case covered (pytest -s)
    table = torch.tensor(blocks, dtype=torch.int32)
    ref = sparse_attention_reference(batch.q.double(), batch.k_cache, batch.v_cache, batch.block_table,
                                     batch.seq_lens, table, mask, impl.scale, BLOCK)
    torch.testing.assert_close(out[:tokens].double(), ref[:tokens], atol=2e-3, rtol=2e-3,
                               msg=lambda m: f"{m}\n{where}")
    assert out[tokens:].isnan().all(), f"rows past the batch (CUDA-graph padding) were written; {where}"


def check_scores_and_selection(batch, impl, qblocks, scores, lists, nkb, where):
    """The kernel's block scores of the query blocks it scored match the reference's, and its
    lists are ``select_dynamic`` of those scores."""
    ref = block_scores_reference(batch.q, batch.k_cache, batch.block_table, batch.seq_lens, qblocks.table,
                                 impl.scale, BLOCK, nkb)
    for first, count in qblocks.score_groups.tolist():
        got, want = scores[first:first + count, :, :nkb], ref[first:first + count]
        causal = torch.isfinite(want)
        torch.testing.assert_close(got[causal], want[causal], atol=2e-2, rtol=1e-2,
                                   msg=lambda m: f"block scores: {m}\n{where}")
    selected = select_dynamic(scores[..., :nkb], qblocks.block_index, qblocks.tail_end, batch.k_cache.shape[2],
                              impl.cfg)
    assert torch.equal(selected, lists), f"fused selection differs from select_dynamic; {where}"


# Inputs the real path never hands the kernels (the builder always lists the diagonal block last,
# and vLLM's block tables have contiguous rows). Each test asks for the right answer or an error.


def _lone_request(seed: int, **layout):
    """One chunk of 3 blocks after 2 cached ones: query blocks 2, 3 and 4 of one request."""
    batch = make_paged_batch([3 * BLOCK], [2 * BLOCK], 2, 1, 64, 16, DTYPE, seed=seed, **layout)
    return batch, torch.tensor([[0, b * BLOCK, (2 + b) * BLOCK, BLOCK] for b in range(3)], dtype=torch.int32)


def _attend(batch, qblocks, indices, counts, block_table=None):
    from vllm_flashprefill.kernels.attention import sparse_prefill_attention

    out = torch.full_like(batch.q, float("nan"))
    sparse_prefill_attention(batch.q, batch.k_cache, batch.v_cache, out, batch.block_table if block_table is None
                             else block_table, batch.seq_lens, qblocks, indices, counts, 0.125, BLOCK)
    return out


@pytest.mark.xfail(strict=True, reason="issue 24: the attention kernel takes the last listed block for the "
                   "diagonal; the launcher cannot read the lists without a device sync (BlockLists.from_mask "
                   "checks a mask given its diagonals)")
def test_a_block_list_without_its_diagonal_is_refused_or_attended_with_it():
    batch, qblocks = _lone_request(1)
    indices = torch.tensor([[[0, 1, 2]], [[0, 1, 3]], [[0, 2, 0]]], dtype=torch.int32)  # the last lacks block 4
    counts = torch.tensor([[3], [3], [2]], dtype=torch.int32)
    try:
        out = _attend(batch, qblocks, indices, counts)
    except ValueError:
        return
    listed = BlockLists(indices, counts).to_mask(5)
    listed[2, 0, 4] = True  # the kernel always attends the diagonal block
    ref = sparse_attention_reference(batch.q.double(), batch.k_cache, batch.v_cache, batch.block_table,
                                     batch.seq_lens, qblocks, listed, 0.125, BLOCK)
    torch.testing.assert_close(out.double(), ref, atol=2e-3, rtol=2e-3)


def test_a_block_table_with_strided_rows_is_refused_or_read_right():
    batch, qblocks = _lone_request(2)
    indices = torch.tensor([[[0, 1, 2]], [[0, 2, 3]], [[0, 3, 4]]], dtype=torch.int32)
    counts = torch.full((3, 1), 3, dtype=torch.int32)
    wide = torch.zeros(1, 2 * batch.block_table.shape[1], dtype=torch.int32)
    wide[:, ::2] = batch.block_table
    try:
        out = _attend(batch, qblocks, indices, counts, wide[:, ::2])
    except ValueError:
        return
    ref = sparse_attention_reference(batch.q.double(), batch.k_cache, batch.v_cache, batch.block_table,
                                     batch.seq_lens, qblocks, BlockLists(indices, counts).to_mask(5), 0.125, BLOCK)
    torch.testing.assert_close(out.double(), ref, atol=2e-3, rtol=2e-3)
