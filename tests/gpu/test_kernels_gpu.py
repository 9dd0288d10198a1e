"""FlashPrefill Triton kernels on a GPU, bf16, 8K-64K tokens, over a shuffled paged cache.

Attention tests run each case on both kernels: "triton" (kernels/attention.py) and "auto" (the
Hopper kernel, kernels/attention_hopper.py, where it can run the case; skipped where "auto" picks
the portable kernel too).

* every pattern's output == kernels/reference.py (fp32) on a sample of query blocks;
* the dense pattern == vLLM's FA3 (and the benchmark's vLLM baseline calls == the reference);
* dynamic selection from the Triton block scores == selection from the reference scores, up to
  blocks within rounding of the threshold or the candidates' mean;
* no NaN/Inf on extreme inputs; a row whose only visible key is itself returns that key's value;
* the kernel reads only the KV blocks in its lists and writes only the rows of its query blocks.

Skipped entirely without CUDA (see conftest.py for running it on the Triton interpreter).
"""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

# Same switch as conftest.py: FP_TEST_DEVICE=cpu runs on the Triton interpreter.
ON_GPU = os.environ.get("FP_TEST_DEVICE", "cuda").strip().lower() != "cpu"
if ON_GPU and not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)", allow_module_level=True)

from vllm_flashprefill.block_lists import BlockLists  # noqa: E402
from vllm_flashprefill.kernels.attention import sparse_prefill_attention  # noqa: E402
from vllm_flashprefill.kernels.reference import (  # noqa: E402 - after the skip
    block_scores_reference,
    sparse_attention_reference,
)
from vllm_flashprefill.patterns import content_selectable, forced_block_mask, relative_scores, select_dynamic  # noqa: E402

BLOCK = 128 if ON_GPU else 64  # must match conftest.env().block


@dataclasses.dataclass(frozen=True)
class Case:
    query_lens: tuple[int, ...]
    context_lens: tuple[int, ...]
    heads: tuple[int, int, int]  # Hq, Hkv, D
    page_size: int
    hot_frac: float = 0.1


# Full-size cases on the GPU; the interpreter gets batches of the same shape, scaled down.
GPU_CASES = {
    # One 8K prompt beside three chunks with cached context (partial first/last blocks).
    "multi8k": Case((8192, 1000, 777, 300), (0, 3000, 129, 5000), (32, 8, 128), 16),
    "long32k": Case((32768,), (0,), (32, 8, 128), 32),
    "long64k": Case((65536,), (0,), (32, 8, 128), 64),  # pages of whole tiles: TMA
    "gqa7": Case((8192, 1500), (0, 2100), (14, 2, 64), 128),  # TMA
    "d256": Case((8192, 700), (0, 1000), (16, 8, 256), 16),
    "mha": Case((2048, 333), (0, 1200), (8, 8, 64), 16),
    # d 128 on pages of a whole tile, lengths off the tile grid: the Hopper kernel zeroes the last
    # tile's V rows past the end in two halves that are strided views of the swizzled tile.
    "d128p128": Case((5000, 777), (0, 3000), (32, 8, 128), 128),
}
CPU_CASES = {
    "multi8k": Case((640, 100, 77, 30), (0, 200, 65, 300), (4, 2, 64), 16),
    "long32k": Case((768,), (0,), (4, 1, 64), 32),
    "long64k": Case((1024,), (0,), (4, 2, 64), 64),
    "gqa7": Case((320, 100), (0, 130), (14, 2, 64), 128),
    "d256": Case((256, 70), (0, 100), (4, 2, 256), 16),
    "mha": Case((256, 33), (0, 120), (2, 2, 64), 16),
    "d128p128": Case((300, 77), (0, 130), (4, 2, 128), 128),
}
CASES = GPU_CASES if ON_GPU else CPU_CASES


def make(env, name: str, seed: int = 0):
    c = CASES[name]
    return env.batch(c.query_lens, c.context_lens, c.heads, c.page_size, c.hot_frac, seed=seed)


@pytest.fixture(scope="module")
def batches(env):
    """Shared read-only batches by case name (tests that modify a batch build their own)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = make(env, name)
        return cache[name]

    yield get
    cache.clear()
    if ON_GPU:
        torch.cuda.empty_cache()


# Query blocks compared with the per-block torch reference in each test.
SAMPLE_BLOCKS = 40 if ON_GPU else 12

# name -> FlashPrefillConfig options (min_seq_len 0 unless given). Windows are small so that 8K
# prompts (64 blocks) are really sparse; the interpreter's prompts (8-16 blocks) get smaller ones.
_W = 4 if ON_GPU else 1
PATTERNS = {
    "dense": dict(pattern="dense"),
    "local": dict(pattern="local", local_blocks=_W),
    "strided": dict(pattern="strided", stride=_W + 1, sink_blocks=2),
    "hybrid": dict(pattern="hybrid", local_blocks=_W, stride=2 * _W + 1),
    "hybrid_minlen": dict(pattern="hybrid", local_blocks=_W // 2, stride=2 * _W + 1,
                          min_seq_len=4096 if ON_GPU else 256),
    "dynamic": dict(pattern="dynamic", local_blocks=_W // 2, threshold=0.1),
    "dynamic_budget": dict(pattern="dynamic", local_blocks=1, sink_blocks=1, threshold=0.3,
                           min_budget=2, max_budget=6),
    "hybrid_b64": dict(pattern="hybrid", block_size=64, local_blocks=_W, stride=_W + 1),
    "dynamic_b256": dict(pattern="dynamic", block_size=2 * BLOCK, local_blocks=_W // 4),
}
REFERENCE_CASES = ["multi8k", "long32k", "gqa7", "d256", "mha"]
# Keep the 32K case to the patterns with distinct code paths (its reference is the slowest).
SKIP = {("long32k", p) for p in ("hybrid_minlen", "hybrid_b64", "dynamic_budget")}


def config(env, name: str):
    options = dict(PATTERNS[name])
    options.setdefault("block_size", env.block)
    return env.common.make_config(**options)


KERNELS = ["auto", "triton"]


def layer_call(env, b, cfg, kernel: str):
    call = env.common.LayerCall(b, dataclasses.replace(cfg, sparse_kernel=kernel))
    if kernel != "triton" and call.kernel is sparse_prefill_attention:
        pytest.skip(f"'{kernel}' runs the portable kernel here, as 'triton' does")
    return call


def run_layer_call(env, b, cfg, kernel: str):
    """(pipeline, mask, out) for one layer call; out starts as NaN so unwritten rows show."""
    call = layer_call(env, b, cfg, kernel)
    mask = call.mask()
    out = torch.full_like(b.q, float("nan"))
    call.attend(BlockLists.from_mask(mask), out)
    return call, mask, out


def reference_rows(env, b, call, mask, blocks, **fp8_scales):
    """(rows, reference output of those rows) for a sample of query blocks."""
    table = torch.from_numpy(call.query_blocks.table_cpu[blocks]).to(b.q.device)
    ref = sparse_attention_reference(
        b.q, b.k_cache, b.v_cache, b.block_table, b.seq_lens, table, mask[blocks], call.scale,
        call.cfg.sparse_block, **fp8_scales,
    )
    rows = env.common.query_block_rows(call.query_blocks.table_cpu, blocks).to(b.q.device)
    return rows, ref[rows]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_matches_reference(env, batches, note, case, pattern, kernel):
    if (case, pattern) in SKIP:
        pytest.skip("covered at other lengths")
    b = batches(case)
    cfg = config(env, pattern)
    call, mask, out = run_layer_call(env, b, cfg, kernel)
    assert not torch.isnan(out).any(), "rows left unwritten"
    density = BlockLists.from_mask(mask).density()
    blocks = env.common.pick_blocks(call.query_blocks.num_blocks, SAMPLE_BLOCKS, seed=len(pattern))
    rows, ref = reference_rows(env, b, call, mask, blocks)
    env.check_close(out[rows], ref, f"{case}/{pattern}/{kernel} density={density:.3f} vs reference", note)
    if cfg.pattern != "dense" and density < 0.9:
        # The sparse result must differ from dense attention, or the lists were ignored.
        dense = torch.ones_like(mask[:, :1])
        _, dense_ref = reference_rows(env, b, call, dense, blocks)
        gap = env.common.diff(ref, dense_ref).rel_l2
        assert gap > 3 * env.rel_l2, f"pattern {pattern} indistinguishable from dense ({gap:.2e})"


def _fa3(env):
    fn, reason = env.common.fa3_status(env.device)
    if fn is None:
        pytest.skip(f"vLLM FA3 unavailable: {reason}")
    return fn


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", ["multi8k", "long64k", "gqa7", "d256"])
def test_dense_matches_fa3(env, note, case, kernel):
    fa3 = _fa3(env)
    b = make(env, case)
    # The NaN this suite plants in the unused slots of a request's last page came out of FA3 as NaN
    # rows with pages of 128 (H200, 2026-11-27; not with pages of 16): it seems to read that page
    # whole and weight the slots past seq_len by zero (0 * NaN). vLLM's cache holds finite values.
    b.kv_cache.nan_to_num_(0.0)
    _, _, out = run_layer_call(env, b, config(env, "dense"), kernel)
    expected = torch.full_like(b.q, float("nan"))
    env.common.fa3_attention(fa3, b, expected, b.q.shape[-1] ** -0.5)
    assert torch.isfinite(expected).all(), "FA3 output has NaN/Inf: bad baseline call"
    env.check_close(out, expected, f"{case}/dense/{kernel} vs fa3 (all {out.shape[0]} rows)", note)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", ["long32k", "long64k"])
def test_dense_matches_torch_sdpa(env, batches, note, case, kernel):
    """Whole-output check of the dense pattern that needs no vLLM: PyTorch SDPA (flash or cuDNN
    backend) over the same K/V gathered out of the paged cache."""
    b = batches(case)
    q4, k4, v4 = env.common.sdpa_inputs(b)
    scale = b.q.shape[-1] ** -0.5
    expected, reasons = None, []
    for sdpa in ("sdpa_flash", "sdpa_cudnn"):
        fn, reason = env.common.sdpa_status(env.device, sdpa)
        if fn is None:
            reasons.append(f"{sdpa}: {reason}")
            continue
        try:
            expected = fn(q4, k4, v4, scale)[0].transpose(0, 1)
            break
        except RuntimeError as e:
            reasons.append(f"{sdpa}: {str(e)[:200]}")
    if expected is None:
        pytest.skip("; ".join(reasons))
    del q4, k4, v4
    _, _, out = run_layer_call(env, b, config(env, "dense"), kernel)
    env.check_close(out, expected, f"{case}/dense/{kernel} vs torch {sdpa} (all {out.shape[0]} rows)", note)


@pytest.mark.parametrize("kernel", ["fa3", "triton_unified"])
def test_vllm_baselines_match_reference(env, batches, note, kernel):
    """The benchmark's baseline calls compute causal attention over the same paged cache."""
    status = env.common.fa3_status if kernel == "fa3" else env.common.unified_status
    fn, reason = status(env.device)
    if fn is None:
        pytest.skip(f"{kernel} unavailable: {reason}")
    call = env.common.fa3_attention if kernel == "fa3" else env.common.unified_attention
    b = batches("multi8k")
    out = torch.full_like(b.q, float("nan"))
    call(fn, b, out, b.q.shape[-1] ** -0.5)
    call = env.common.LayerCall(b, config(env, "dense"))
    mask = call.mask()
    blocks = env.common.pick_blocks(call.query_blocks.num_blocks, SAMPLE_BLOCKS)
    rows, ref = reference_rows(env, b, call, mask, blocks)
    env.check_close(out[rows], ref, f"multi8k/{kernel} vs reference", note)


def _boundary_distance(scores, block_index, tail_end, num_kv_heads, cfg):
    """How close each (query block, KV head, KV block) decision of select_dynamic is to flipping:
    per query head, the distance (log units) of the score relative to the row max from
    log(threshold) and, with above_mean, of the score relative to the candidates' mean from
    log(above_mean); the smallest over the heads of the KV head. Also returns the KV head's best
    score relative to the row max (-inf non-causal)."""
    n, hq, nkb = scores.shape
    forced = forced_block_mask(block_index, tail_end, nkb, cfg)
    rel, to_mean = relative_scores(scores, block_index, forced, cfg.above_mean > 0)
    dist = (rel - (math.log(cfg.threshold) if cfg.threshold > 0 else float("-inf"))).abs()
    if to_mean is not None:
        dist = torch.minimum(dist, (to_mean - math.log(cfg.above_mean)).abs().nan_to_num(float("inf")))
    group = (n, num_kv_heads, hq // num_kv_heads, nkb)
    return dist.view(group).amin(2), rel.view(group).amax(2)


@pytest.mark.parametrize("case", ["multi8k", "long32k", "gqa7", "d256"])
def test_dynamic_selection_matches_reference(env, batches, note, case):
    b = batches(case)
    # Without a dense tail more blocks are scored (the CPU's small d256 case has none otherwise).
    cfg = dataclasses.replace(config(env, "dynamic"), dense_tail_blocks=0)
    call = env.common.LayerCall(b, cfg)
    scores = call.scores()
    # Scores exist where content selection can add a block (the others keep every causal block).
    qb = call.query_blocks
    scored = content_selectable(qb.block_index, qb.tail_end, cfg).nonzero().flatten().tolist()
    blocks = [scored[i] for i in env.common.pick_blocks(len(scored), 2 * SAMPLE_BLOCKS, seed=3)]
    sel = torch.tensor(blocks, device=b.q.device)
    table = torch.from_numpy(qb.table_cpu[blocks]).to(b.q.device)
    ref = block_scores_reference(
        b.q, b.k_cache, b.block_table, b.seq_lens, table, call.scale, call.cfg.sparse_block,
        qb.num_kv_blocks,
    )
    got = scores[sel]
    block_index = qb.block_index[sel]
    causal = (torch.arange(qb.num_kv_blocks, device=b.q.device)[None, :]
              <= block_index[:, None])[:, None, :].expand_as(ref)
    assert torch.isfinite(got[causal]).all(), "non-finite block scores"
    score_err = float((got[causal] - ref[causal]).abs().max())
    score_max = float(ref[causal].abs().max())
    # The kernel rounds the pooled query to the cache dtype before the dot product.
    assert score_err <= 1e-2 * score_max + 1e-3, f"block scores off by {score_err} (max {score_max})"

    num_kv_heads = b.k_cache.shape[2]
    tail_end = qb.tail_end[sel]
    mask_got = select_dynamic(got, block_index, tail_end, num_kv_heads, cfg)
    mask_ref = select_dynamic(ref, block_index, tail_end, num_kv_heads, cfg)
    dist, rel = _boundary_distance(ref, block_index, tail_end, num_kv_heads, cfg)
    band = 1e-2 + 2 * score_err  # a relative score moves by at most twice the score error
    near = dist <= band
    disagree = mask_got != mask_ref
    unexplained = int((disagree & ~near).sum())
    forced = forced_block_mask(block_index, tail_end, qb.num_kv_blocks, cfg).expand_as(mask_ref)
    candidates = int((~forced & (rel > float("-inf"))).sum())
    picked = int((mask_ref & ~forced).sum())
    note(
        f"{case}/dynamic selection: score_err={score_err:.2e} (max {score_max:.2f}); "
        f"{int(disagree.sum())} of {mask_ref.numel()} decisions differ, all within "
        f"{band:.3f} of a boundary: {unexplained == 0}; content picked {picked}/{candidates}"
    )
    assert unexplained == 0, f"{unexplained} selections differ away from the threshold/mean boundaries"
    if candidates >= 100:
        # The structured data must make the threshold matter (some picked, some dropped).
        assert 0 < picked < candidates, f"selection is trivial: {picked} of {candidates} picked"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("pattern", ["dense", "hybrid", "dynamic"])
def test_extreme_inputs(env, note, pattern, kernel):
    """q and k x100 (logits ~1e4), V x1e4: finite output, the first row returns its own value."""
    b = make(env, "mha" if not ON_GPU else "multi8k", seed=7)
    b.q.mul_(100)
    b.k_cache.mul_(100)
    b.v_cache.mul_(1e4)
    cfg = config(env, pattern)
    call, mask, out = run_layer_call(env, b, cfg, kernel)
    assert torch.isfinite(out).all(), f"{int((~torch.isfinite(out)).sum())} non-finite outputs"
    # Request 0 has no context: its row 0 sees only key 0, so the output is exactly v[0].
    page0 = int(b.block_table[0, 0])
    v0 = b.v_cache[page0, 0]  # [Hkv, D]
    gqa = b.q.shape[1] // b.k_cache.shape[2]
    torch.testing.assert_close(out[0].float(), v0.float().repeat_interleave(gqa, 0), atol=0, rtol=1e-2)
    # Logits this large make attention nearly one-hot: allow a few near-ties to resolve apart.
    blocks = env.common.pick_blocks(call.query_blocks.num_blocks, SAMPLE_BLOCKS, seed=1)
    rows, ref = reference_rows(env, b, call, mask, blocks)
    scale = float(ref.abs().max())
    err = (out[rows].float() - ref).abs().amax(-1)  # [rows, Hq]
    off = int((err > 2e-2 * scale).sum())
    note(f"extreme/{pattern}/{kernel}: |ref|max={scale:.3g}, {off} of {err.numel()} (row, head) outputs "
         f"differ by > 2% of it")
    assert off <= max(2, err.numel() // 1000), f"{off} (row, head) outputs far from the reference"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("pattern", ["local", "dynamic"])
def test_reads_only_listed_blocks_and_writes_only_its_rows(env, note, pattern, kernel):
    """NaN in every KV block that the last sparse query blocks' lists skip; rows of other query
    blocks must keep their previous contents."""
    b = make(env, "long64k" if not ON_GPU else "gqa7", seed=11)
    cfg = config(env, pattern)
    call = layer_call(env, b, cfg, kernel)
    mask = call.mask()
    n = call.query_blocks.num_blocks
    # Request 0's last query blocks before its dense tail (which lists every causal block).
    own = [i for i in range(n) if int(call.query_blocks.table_cpu[i][0]) == 0]
    last = own[: max(0, len(own) - cfg.dense_tail_blocks)][-3:]
    assert last, "request 0 has no sparse query block"
    keep = mask[last].any(0).any(0)  # KV blocks any of them lists
    rows, ref = reference_rows(env, b, call, mask, last)  # before poisoning
    skipped = (~keep).nonzero().squeeze(1).tolist()
    assert skipped, "nothing to poison"
    pages, slots = env.common.request_slots(b, 0)
    pos = torch.arange(pages.shape[0], device=pages.device)
    poison = ~keep[pos // call.cfg.sparse_block]
    b.k_cache[pages[poison], slots[poison]] = float("nan")
    b.v_cache[pages[poison], slots[poison]] = float("nan")

    sub = torch.from_numpy(call.query_blocks.table_cpu[last]).to(b.q.device)
    lists = BlockLists.from_mask(mask[last])
    out = torch.full_like(b.q, 123.0)
    call.kernel(b.q, b.k_cache, b.v_cache, out, b.block_table, b.seq_lens, sub, *lists, call.scale,
                call.cfg.sparse_block)
    env.check_close(out[rows], ref, f"{pattern}/{kernel}: last blocks with {len(skipped)} KV blocks poisoned",
                note)
    others = torch.ones(out.shape[0], dtype=torch.bool, device=out.device)
    others[rows] = False
    assert (out[others] == 123.0).all(), "wrote rows outside its query blocks"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", ["multi8k", "d128p128"])
def test_an_empty_list_attends_to_the_diagonal_block_alone(env, batches, note, case, kernel):
    """kv_counts 0 (no pattern makes it: every list holds its diagonal): both kernels then visit the
    diagonal block, as a list holding only it would (the Hopper kernel once left those rows
    unwritten)."""
    b = batches(case)
    cfg = config(env, "hybrid")
    call = layer_call(env, b, cfg, kernel)
    mask = call.mask()
    indices, counts = BlockLists.from_mask(mask)
    emptied = torch.arange(0, call.query_blocks.num_blocks, 3, device=counts.device)
    counts = counts.clone()
    counts[emptied] = 0
    diagonal_only = mask.clone()
    diagonal_only[emptied] = False
    qb = call.query_blocks.block_index.long()[emptied]
    diagonal_only[emptied, :, qb] = True
    out = torch.full_like(b.q, float("nan"))
    call.attend((indices, counts), out)
    assert not torch.isnan(out).any(), "rows left unwritten"
    blocks = emptied[: SAMPLE_BLOCKS].tolist()
    rows, ref = reference_rows(env, b, call, diagonal_only, blocks)
    env.check_close(out[rows], ref, f"empty lists/{case}/{kernel}", note)
