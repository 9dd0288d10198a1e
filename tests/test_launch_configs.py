"""Launch configs per card (kernels/limits.py and the choosers in kernels/attention.py, kernels/scoring.py):
every config fits the card's shared memory, no TMA below sm_90, and sm_90 gets the configs tuned on
the H200. tests/test_kernel_codegen.py compiles them for sm_80/86/89/120."""

import itertools
from types import SimpleNamespace

import pytest
import torch

from tests.paged import make_paged_batch, query_blocks_of
from vllm_flashprefill.block_lists import BlockLists
from vllm_flashprefill.kernels import attention, limits, scoring
from vllm_flashprefill.kernels.limits import DeviceLimits, device_limits, limits_for

TARGETS = (80, 86, 89, 90, 100, 120)
SHAPES = list(itertools.product((64, 128, 256), (1, 4, 8), (16, 64), (2, 4)))  # d, GQA, page, element size
BLOCK = 128
SPARSE_BLOCK = 64  # the sparse tile of the forced-config run


def chosen(capability, head_size, gqa, page_size, element_size=2):
    card = limits_for(capability)
    return (attention.launch_config(head_size, gqa, BLOCK, page_size, card, element_size),
            scoring.scores_config(head_size, gqa, BLOCK, page_size, card, element_size))


@pytest.mark.parametrize("capability", TARGETS)
def test_configs_fit_the_card_and_use_tma_only_from_sm90(capability):
    card = limits_for(capability)
    for d, gqa, page, size in SHAPES:
        if size == 4 and d == 256 and card.shared_memory < 128 * 1024:
            continue  # fp32 d 256: the 128 scoring rows alone take 128 KB (vLLM serves fp16/bf16 only)
        attn, scores = chosen(capability, d, gqa, page, size)
        assert attention.shared_memory_estimate(attn, d, size) <= card.shared_memory
        assert scoring.shared_memory_estimate(scores, d, size) <= card.shared_memory
        for cfg in (attn, scores):
            assert cfg["TMA"] == (capability >= 90 and d in (64, 128) and page == 64), (d, gqa, page, cfg)
            assert BLOCK % cfg["BLOCK_N"] == 0 and cfg["BLOCK_N"] >= 16
            assert not cfg["TMA"] or page % cfg["BLOCK_N"] == 0
        assert attn["BLOCK_M"] >= attn["BLOCK_Q"] * gqa and BLOCK % attn["BLOCK_Q"] == 0


# The H200-tuned configs (kernels/attention.py, kernels/scoring.py before per-card limits), per
# (head size, page size): attention (BLOCK_M, BLOCK_N, TMA) with 4 warps and 2 stages; scoring
# (BLOCK_N, num_stages, TMA) with 128 rows, 4 warps and 32 KV blocks per program.
SM90_ATTENTION = {(64, 16): (128, 128, False), (64, 64): (64, 64, True), (128, 16): (128, 32, False),
                  (128, 64): (128, 64, True), (256, 16): (64, 32, False), (256, 64): (64, 32, False)}
SM90_SCORES = {(64, 16): (128, 3, False), (64, 64): (64, 2, True), (128, 16): (128, 3, False),
               (128, 64): (64, 2, True), (256, 16): (64, 3, False), (256, 64): (64, 3, False)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sm90_keeps_the_h200_configs(dtype):
    for d, gqa, page, _ in SHAPES:
        attn, scores = chosen(90, d, gqa, page, dtype.itemsize)
        block_m, block_n, tma = SM90_ATTENTION[d, page]
        assert attn == dict(BLOCK_Q=min(block_m // gqa, BLOCK), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
                            num_stages=2, TMA=tma)
        block_n, stages, tma = SM90_SCORES[d, page]
        assert scores == dict(BLOCK_M=128, KV_BLOCKS_PER_PROGRAM=32, BLOCK_N=block_n, num_warps=4,
                              num_stages=stages, TMA=tma)


def test_small_cards_step_down_only_where_the_h200_config_does_not_fit():
    """99 KB: scoring at d 128 keeps 128-key tiles with 2 stages, at d 256 takes 32-key tiles; the
    attention tiles (gathers) stay as on the H200; sm_80's 163 KB keeps sm_90's gather configs."""
    for d, gqa, page, _ in SHAPES:
        h200 = chosen(90, d, gqa, 16)
        assert chosen(80, d, gqa, page) == h200
        attn, scores = chosen(89, d, gqa, page)
        assert attn == h200[0]
        expected = dict(h200[1], **{128: dict(num_stages=2), 256: dict(num_stages=2, BLOCK_N=32)}.get(d, {}))
        assert scores == expected
        assert chosen(86, d, gqa, page) == chosen(120, d, gqa, 16) == (attn, scores)


def test_a_tight_limit_halves_key_tiles_then_rows_then_stages():
    tight = DeviceLimits(89, 2 * 128 * (64 + 2 * 2 * 16))  # d 128 bf16: 64 rows, 2 stages of 16-key K and V
    assert attention.launch_config(128, 4, BLOCK, 16, tight) == dict(
        BLOCK_Q=16, BLOCK_M=64, BLOCK_N=16, num_warps=4, num_stages=2, TMA=False)
    tighter = DeviceLimits(89, 2 * 128 * (16 + 2 * 16))  # 16 rows, 1 stage
    assert attention.launch_config(128, 1, BLOCK, 16, tighter)["num_stages"] == 1
    with pytest.raises(ValueError, match="no attention tile fits"):
        attention.launch_config(128, 1, BLOCK, 16, DeviceLimits(89, 1024))
    with pytest.raises(ValueError, match="no scoring tile fits"):
        scoring.scores_config(256, 4, BLOCK, 16, limits_for(89), element_size=4)


def test_unknown_capability_gets_the_smallest_table_entry():
    assert limits_for(75) == DeviceLimits(75, 101_376)
    assert limits_for(120).shared_memory == limits_for(89).shared_memory == 101_376
    assert limits_for(80).shared_memory == 166_912 and limits_for(90).shared_memory == 232_448


def test_device_limits_read_the_opt_in_limit_with_the_table_as_fallback(monkeypatch):
    assert device_limits(torch.device("cpu")) == limits.INTERPRETER and limits.INTERPRETER.tma
    cards = {0: SimpleNamespace(major=8, minor=9, shared_memory_per_block_optin=99 * 1024),
             1: SimpleNamespace(major=12, minor=0)}  # a torch build without the opt-in property
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: cards[device.index])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    limits._cuda_limits.cache_clear()
    try:
        assert device_limits(torch.device("cuda", 0)) == DeviceLimits(89, 101_376)
        assert device_limits(torch.device("cuda")) == DeviceLimits(120, 101_376)
        assert not device_limits(torch.device("cuda", 0)).tma and device_limits(torch.device("cuda")).tma
    finally:
        limits._cuda_limits.cache_clear()


@pytest.mark.parametrize("head_size", [64, 128])
def test_forced_small_card_configs_compute_the_same_attention(head_size):
    """``limits=limits_for(89)`` runs an RTX 4090's configs (no TMA) where the interpreter would run
    sm_90's (TMA copies of pages of 64): same numbers."""
    batch = make_paged_batch([200, 90], [60, 128], 8, 2, head_size, 64, torch.float32, seed=3)
    qblocks = query_blocks_of(batch, 4, SPARSE_BLOCK)
    causal = torch.arange(qblocks.num_kv_blocks)[None, None, :] <= qblocks.block_index[:, None, None]
    indices, counts = BlockLists.from_mask(causal)
    configs = [attention.launch_config(head_size, 4, SPARSE_BLOCK, 64, card, 4)
               for card in (device_limits(batch.q.device), limits_for(89))]
    assert configs[0]["TMA"] and not configs[1]["TMA"]
    outs = []
    for card in (None, limits_for(89)):
        out = torch.full_like(batch.q, float("nan"))
        attention.sparse_prefill_attention(
            batch.q, batch.k_cache, batch.v_cache, out, batch.block_table, batch.seq_lens, qblocks.table,
            indices, counts, head_size**-0.5, SPARSE_BLOCK, limits=card)
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    assert not outs[1].isnan().any()
