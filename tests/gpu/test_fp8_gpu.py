"""An fp8 (e4m3) KV cache on a GPU, bf16 model, with calibrated scales (tests/fp8.py): the portable
attention kernel and the scoring kernel against kernels/reference.py on the dequantized values,
with the query in bf16 or, as vLLM passes it where FA3 runs an fp8 cache, in fp8; and what fp8
costs against the bf16 cache it was quantized from (noted, loosely bounded).

Skipped without CUDA, like test_kernels_gpu.py (FP_TEST_DEVICE=cpu: the interpreter, fp32).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.fp8 import quantize_batch
from tests.gpu.test_kernels_gpu import SAMPLE_BLOCKS, config, make, reference_rows
from vllm_flashprefill.block_lists import BlockLists
from vllm_flashprefill.kernels.attention import sparse_prefill_attention
from vllm_flashprefill.kernels.reference import block_scores_reference
from vllm_flashprefill.kernels.scoring import block_scores
from vllm_flashprefill.patterns import content_selectable


def static_call(env, b, pattern: str):
    """(layer call, block mask) of one layer call of a static pattern."""
    call = env.common.LayerCall(b, config(env, pattern))
    return call, call.mask()


def attend(env, b, call, mask, scales: dict) -> torch.Tensor:
    """The portable kernel's output for the batch's fp8 cache (NaN where it writes nothing)."""
    out = torch.full(b.q.shape, float("nan"), dtype=env.dtype, device=b.q.device)
    sparse_prefill_attention(b.q, b.k_cache, b.v_cache, out, b.block_table, b.seq_lens, call.query_blocks.table,
                             *BlockLists.from_mask(mask), call.scale, call.cfg.sparse_block, **scales)
    return out


@pytest.mark.parametrize("fp8_query", [False, True], ids=["q-bf16", "q-fp8"])
@pytest.mark.parametrize("pattern", ["dense", "hybrid"])
@pytest.mark.parametrize("case", ["multi8k", "long64k", "gqa7", "d256"])
def test_fp8_cache_matches_reference(env, note, case, pattern, fp8_query):
    b = make(env, case)
    scales = quantize_batch(b, per_head=case == "gqa7", fp8_query=fp8_query)
    call, mask = static_call(env, b, pattern)
    out = attend(env, b, call, mask, scales)
    assert not torch.isnan(out).any(), "rows left unwritten, or an unused slot read"
    blocks = env.common.pick_blocks(call.query_blocks.num_blocks, SAMPLE_BLOCKS, seed=len(pattern))
    rows, ref = reference_rows(env, b, call, mask, blocks, **scales)
    query = "fp8" if fp8_query else "bf16"
    # An fp8 query's dots run in fp16: on the interpreter's fp32 batches that is the looser bound.
    tol = dict(atol=max(env.atol, 2e-3), rtol=max(env.rtol, 2e-3), rel_l2=max(env.rel_l2, 1e-3)) if fp8_query else {}
    env.check_close(out[rows], ref, f"{case}/{pattern}/fp8 cache, {query} q vs reference", note, **tol)


@pytest.mark.parametrize("fp8_query", [False, True], ids=["q-bf16", "q-fp8"])
@pytest.mark.parametrize("case", ["multi8k", "gqa7"])
def test_fp8_block_scores_match_reference(env, note, case, fp8_query):
    b = make(env, case)
    scales = quantize_batch(b, fp8_query=fp8_query)
    scales.pop("v_scale")
    cfg = dataclasses.replace(config(env, "dynamic"), dense_tail_blocks=0)
    call = env.common.LayerCall(b, cfg)
    qb, device = call.query_blocks, b.q.device
    scores = torch.empty(qb.num_blocks, b.q.shape[1], qb.num_kv_blocks, device=device)
    pooled = torch.empty(qb.num_blocks, b.q.shape[1], b.q.shape[2], device=device)
    block_scores(b.q, b.k_cache, b.block_table, b.seq_lens, qb.table, qb.score_groups, scores, pooled, call.scale,
                 call.cfg.sparse_block, **scales)
    scored = content_selectable(qb.block_index, qb.last_block, cfg).nonzero().flatten().tolist()
    blocks = [scored[i] for i in env.common.pick_blocks(len(scored), SAMPLE_BLOCKS, seed=3)]
    ref = block_scores_reference(b.q, b.k_cache, b.block_table, b.seq_lens,
                                 torch.from_numpy(qb.table_cpu[blocks]).to(device), call.scale, call.cfg.sparse_block,
                                 qb.num_kv_blocks, **scales)
    got = scores[torch.tensor(blocks, device=device)]
    causal = torch.isfinite(ref)
    assert torch.isfinite(got[causal]).all(), "non-finite block scores"
    err, top = float((got[causal] - ref[causal]).abs().max()), float(ref[causal].abs().max())
    query = "fp8" if fp8_query else "bf16"
    note(f"{case}/fp8 cache, {query} q block scores: max error {err:.2e} (max {top:.2f})")
    # The pooled query enters the dot rounded to bf16 (fp16 for an fp8 query).
    assert err <= 1e-2 * top + 1e-3


@pytest.mark.parametrize("case", ["multi8k", "long64k"])
def test_fp8_cache_against_the_bf16_cache(env, note, case):
    """The dense pattern on the fp8 cache against the bf16 cache it came from: e4m3 keeps 3 bits of
    mantissa, so this is fp8's own error, noted for the accuracy runs, not the kernel's."""
    b = make(env, case)
    call, mask = static_call(env, b, "dense")
    blocks = env.common.pick_blocks(call.query_blocks.num_blocks, SAMPLE_BLOCKS)
    rows, ref16 = reference_rows(env, b, call, mask, blocks)
    out = attend(env, b, call, mask, quantize_batch(b))
    d = env.common.diff(out[rows], ref16)
    note(f"{case}/dense: fp8 cache vs the bf16 cache's reference: {d}")
    assert d.nonfinite == 0 and d.rel_l2 < 0.1
