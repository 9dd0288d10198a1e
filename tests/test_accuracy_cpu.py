"""The CPU accuracy path (benchmarks/accuracy/hf_reference.py) on a tiny random Llama (no download).

Dense pattern == transformers' own attention; a sparse pattern changes only the rows of query
blocks that lost a KV block; block scores == the package's reference definition.
"""

from __future__ import annotations

import pytest

from vllm_flashprefill.config import FlashPrefillConfig
from vllm_flashprefill.kernels.reference import block_scores_reference
from vllm_flashprefill.patterns import forced_block_mask

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "AttentionInterface") or not hasattr(
    transformers.PreTrainedModel, "set_attn_implementation"
):
    pytest.skip("transformers without AttentionInterface / set_attn_implementation", allow_module_level=True)

hf_reference = pytest.importorskip("benchmarks.accuracy.hf_reference")

BS = 64  # smallest block size the config allows
SEQ = 5 * BS + 17  # 6 blocks, the last one partial


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
    )
    m = transformers.LlamaForCausalLM(cfg).eval().float()
    # Sharper attention than the tiny init gives, so dropped blocks show in the logits.
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return m


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (1, SEQ), generator=torch.Generator().manual_seed(1))


def logits(model, ids, impl, cfg=None, **kw):
    if impl == hf_reference.ATTN_NAME:
        hf_reference.use_flashprefill(model, cfg)
    else:
        model.set_attn_implementation(impl)
    with torch.inference_mode():
        return model(ids, **kw).logits


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_dense_pattern_matches_transformers(model, ids, impl):
    ref = logits(model, ids, impl)
    out = logits(model, ids, hf_reference.ATTN_NAME, {"pattern": "dense", "block_size": BS})
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=1e-4)


def test_chunked_prefill_and_decode_match_one_pass(model, ids):
    """A prefill in two chunks (the second starting inside a block) plus one decode step, dense."""
    full = logits(model, ids, "sdpa")
    hf_reference.use_flashprefill(model, {"pattern": "dense", "block_size": BS})
    cut = 2 * BS + 5
    with torch.inference_mode():
        first = model(ids[:, :cut], use_cache=True)
        second = model(ids[:, cut:-1], past_key_values=first.past_key_values, use_cache=True)
        last = model(ids[:, -1:], past_key_values=second.past_key_values, use_cache=True)
    out = torch.cat([first.logits, second.logits, last.logits], dim=1)
    torch.testing.assert_close(out, full, atol=2e-4, rtol=1e-4)


def test_block_aligned_chunks_select_like_one_pass(model, ids):
    """Blocks sit at absolute positions: a chunk boundary on a block boundary changes nothing."""
    cfg = FlashPrefillConfig(pattern="dynamic", sparse_block=BS, sink_blocks=0, local_blocks=0,
                             threshold=1.0, min_seq_len=0, dense_tail_blocks=0, dense_layers=0)
    one_pass = logits(model, ids, hf_reference.ATTN_NAME, cfg)
    with torch.inference_mode():
        first = model(ids[:, : 3 * BS], use_cache=True)
        second = model(ids[:, 3 * BS :], past_key_values=first.past_key_values, use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), one_pass, atol=2e-4, rtol=1e-4)
    assert (one_pass - logits(model, ids, "sdpa")).abs().amax() > 1e-3  # and it is sparse


def test_sparse_pattern_changes_only_rows_that_lost_blocks(model, ids):
    dense = logits(model, ids, "sdpa")
    cfg = FlashPrefillConfig(pattern="local", sparse_block=BS, sink_blocks=0, local_blocks=1, min_seq_len=0,
                             dense_tail_blocks=0, dense_layers=0)
    hf_reference.STATS.reset()
    out = logits(model, ids, hf_reference.ATTN_NAME, cfg)
    # Query blocks 0 and 1 keep every causal block (diagonal + one local block); 2.. drop some.
    full_rows = 2 * BS
    torch.testing.assert_close(out[:, :full_rows], dense[:, :full_rows], atol=2e-4, rtol=1e-4)
    changed = (out[0] - dense[0]).abs().amax(-1) > 1e-3
    assert changed[full_rows:].float().mean() > 0.9, changed[full_rows:].float().mean()
    # Block density: 6 query blocks keep 1 + 2 * 5 = 11 of the 21 causal blocks, per KV head.
    assert hf_reference.STATS.density == pytest.approx(11 / 21)


def test_min_seq_len_and_dense_layers_stay_dense(model, ids):
    dense = logits(model, ids, "sdpa")
    base = {"pattern": "local", "sparse_block": BS, "sink_blocks": 0, "local_blocks": 0, "dense_tail_blocks": 0,
            "dense_layers": 0}
    out = logits(model, ids, hf_reference.ATTN_NAME, FlashPrefillConfig(**base, min_seq_len=3 * BS))
    torch.testing.assert_close(out[:, : 3 * BS], dense[:, : 3 * BS], atol=2e-4, rtol=1e-4)
    assert (out[:, 3 * BS :] - dense[:, 3 * BS :]).abs().amax() > 1e-3
    out = logits(model, ids, hf_reference.ATTN_NAME, FlashPrefillConfig(**{**base, "dense_layers": 2}, min_seq_len=0))
    torch.testing.assert_close(out, dense, atol=2e-4, rtol=1e-4)


def test_dynamic_threshold_zero_is_dense_and_threshold_one_is_forced(model, ids):
    dense = logits(model, ids, "sdpa")
    base = {"pattern": "dynamic", "sparse_block": BS, "sink_blocks": 0, "local_blocks": 0, "min_seq_len": 0,
            "dense_tail_blocks": 0, "dense_layers": 0, "above_mean": 0.0}
    out = logits(model, ids, hf_reference.ATTN_NAME, FlashPrefillConfig(**base, threshold=0.0))
    torch.testing.assert_close(out, dense, atol=2e-4, rtol=1e-4)
    hf_reference.STATS.reset()
    logits(model, ids, hf_reference.ATTN_NAME, FlashPrefillConfig(**base, threshold=1.0))
    # Per KV head: the diagonal block, plus each of its 3 query heads' top block (score >= 1.0 x
    # the row max) where that is not the diagonal: query block qb keeps 1 to 1 + min(3, qb) of its
    # qb + 1 causal blocks, i.e. 6 to 18 of 21, and fewer than all of them.
    assert 6 / 21 <= hf_reference.STATS.density <= 18 / 21


@pytest.mark.parametrize("q_start", [0, BS + 7])
def test_block_scores_match_package_reference(q_start):
    torch.manual_seed(2)
    hq, hkv, d = 6, 2, 16
    q = torch.randn(hq, SEQ - q_start, d)
    k = torch.randn(hkv, SEQ, d)
    scores, block_index = hf_reference.block_scores(q, k, q_start, BS, 0.25)
    # The package's reference reads a paged cache: one page holding the whole sequence.
    k_cache = k.transpose(0, 1)[None]  # [1 page, SEQ, Hkv, D]
    starts = [max(b * BS, q_start) for b in block_index.tolist()]
    ends = [min((b + 1) * BS, SEQ) for b in block_index.tolist()]
    table = torch.tensor([[0, s - q_start, s, e - s] for s, e in zip(starts, ends)])
    ref = block_scores_reference(
        q.transpose(0, 1), k_cache, torch.zeros(1, 1, dtype=torch.int32), torch.tensor([SEQ]),
        table, 0.25, BS, scores.shape[-1],
    )
    torch.testing.assert_close(scores, ref, atol=1e-5, rtol=1e-5)


def test_static_mask_is_the_package_mask():
    cfg = FlashPrefillConfig(pattern="hybrid", sparse_block=BS, local_blocks=1, stride=2, min_seq_len=0)
    q, k = torch.randn(6, SEQ, 16), torch.randn(2, SEQ, 16)
    mask, block_index = hf_reference.block_mask_for(q, k, 0, cfg, 0.25, dense=False)
    expected = forced_block_mask(block_index, 5, 6, cfg).expand(-1, 2, -1)
    assert torch.equal(mask, expected)
