"""Where the time of dynamic selection goes: pooling + block scores, then thresholding and list
building (the fused Triton kernel the backend runs, and the torch definition it replaces), for one
prompt over a shuffled paged cache (bf16).

    python -m benchmarks.ops.selection --seq-len 131072 --heads 32,8,128 --page-size 64 \
        [--sweep] [--rounds 3] [--alt-scoring OLD.py] [--out results.json]

``--sweep`` times the scoring kernel over the product of its launch axes (KV blocks per program,
warps, stages) and query pooling alone over rows per load x heads per program x warps.
``--alt-scoring FILE`` (repeatable) times another version of ``kernels/scoring.py`` (e.g.
``git show REV:kernels/scoring.py``) on the same inputs, interleaved with the package's in every
round, and checks that it gives the same scores (printed, not enforced: a different summation order
moves them by ~1e-6). TFLOP/s counts the causal pairs scored, 2 x Hq x d per (query block, key)
pair, over the time of pooling + scores.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics

import torch
import triton

from benchmarks.harness import files, provenance
from benchmarks.ops.common import load_kernel_file
from vllm_flashprefill.block_lists import BlockLists
from vllm_flashprefill.config import FlashPrefillConfig
from vllm_flashprefill.kernels import scoring
from vllm_flashprefill.kernels.common import QB_FIRST_POS
from vllm_flashprefill.patterns import select_dynamic, select_dynamic_lists
from vllm_flashprefill.plan import build_query_blocks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=131072)
    ap.add_argument("--heads", default="32,8,128")
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--sweep", action="store_true", help="also sweep the scoring kernel's launch shapes")
    sweep_axes = (("kv-blocks", "16,32,64"), ("warps", "4,8"), ("stages", "2,3,4"), ("pool-rows", "16,32,64,128"),
                  ("pool-heads", "1,2,4,8"))
    for axis, default in sweep_axes:
        ap.add_argument(f"--{axis}", default=default, help="comma-separated values to sweep")
    ap.add_argument("--alt-scoring", action="append", default=[], metavar="FILE",
                    help="another kernels/scoring.py to time beside the package's (repeatable)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--warmup-ms", type=int, default=25)
    ap.add_argument("--rep-ms", type=int, default=100)
    ap.add_argument("--max-budget", type=int, default=0, help="selection's max_budget (its top-k search)")
    ap.add_argument("--width", type=int, default=0,
                    help="score rows this wide (the engine's workspace spans max_model_len: 1025 at 131K)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None, help="results .json, or a folder for "
                    f"selection-<card>-<date>.json (default ./{files.DEFAULT_OUT_DIR}/)")
    args = ap.parse_args()
    hq, hkv, d = map(int, args.heads.split(","))
    S, B, dev = args.seq_len, 128, args.device
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float16  # the interpreter: no bf16 dots
    page = args.page_size
    pages = S // page
    kv = torch.randn(pages, page, hkv, 2 * d, dtype=dtype, device=dev)
    k = kv[..., :d]
    table = torch.randperm(pages, device=dev, dtype=torch.int32)[None]
    seq_lens = torch.tensor([S], dtype=torch.int32, device=dev)
    q = torch.randn(S, hq, d, dtype=dtype, device=dev)

    def plan(per_group: int):
        return build_query_blocks(torch.tensor([0, S]), seq_lens.cpu(), [0], B, dev, per_group)

    per_group = scoring.blocks_per_group(hq // hkv)
    qb = plan(per_group)
    plans = {}
    scores = torch.empty(qb.num_blocks, hq, max(args.width, qb.num_kv_blocks), device=dev)
    pooled = torch.empty(qb.num_blocks, hq, d, device=dev)
    cfg = FlashPrefillConfig(pattern="dynamic", min_seq_len=0, max_budget=args.max_budget)
    flops = 2 * hq * d * B * int((qb.table_cpu[:, QB_FIRST_POS] // B + 1).sum())

    def scorer(module=scoring, config=None):
        """A call of ``module``'s block_scores, on query-block groups of the size its kernel takes."""
        fn = module.block_scores
        per_group = module.blocks_per_group(hq // hkv)
        if per_group not in plans:
            plans[per_group] = plan(per_group)
        groups = plans[per_group].score_groups
        return lambda: fn(q, k, table, seq_lens, qb.table, groups, scores, pooled, d**-0.5, B, config)

    def select_torch():
        return BlockLists.from_mask(select_dynamic(scores[..., :qb.num_kv_blocks], qb.block_index, qb.last_block,
                                                   hkv, cfg))

    def select():
        return select_dynamic_lists(scores, qb.table, seq_lens, hkv, qb.num_kv_blocks, cfg)

    kv_block = torch.arange(scores.shape[2], device=dev)
    causal = (kv_block[None, None, :] <= qb.block_index[:, None, None]).expand_as(scores)
    candidates = {"package": scorer()}
    for i, path in enumerate(args.alt_scoring):
        candidates[path] = scorer(load_kernel_file(path, f"alt_scoring_{i}"))
    if args.sweep:
        axes = [list(map(int, getattr(args, a.replace("-", "_")).split(","))) for a in ("kv-blocks", "warps", "stages")]
        for kvp, warps, stages in itertools.product(*axes):
            config = dict(KV_BLOCKS_PER_PROGRAM=kvp, num_warps=warps, num_stages=stages)
            candidates[json.dumps(config)] = scorer(config=config)
        pool_axes = (map(int, args.pool_rows.split(",")), map(int, args.pool_heads.split(",")), (4, 8))
        for rows, heads, warps in itertools.product(*pool_axes):
            config = dict(ROWS=rows, HEADS=heads, num_warps=warps)
            candidates[f"pool only {json.dumps(config)}"] = functools.partial(
                scoring.pool_queries, q, qb.table, qb.score_groups, pooled, B, per_group, config)
    reference, pooled_reference, max_diff = None, None, {}
    for name, fn in candidates.items():  # compiles each, and checks it against the package
        out, keep = (pooled, slice(None)) if name.startswith("pool only") else (scores, causal)
        out.fill_(float("nan"))
        fn()
        if reference is None:
            reference = scores[causal].clone()
            pooled_reference = pooled.clone()
        expected = pooled_reference if out is pooled else reference
        max_diff[name] = (out[keep] - expected).abs().max().item()  # nan: an entry left unwritten
        print(f"{name}: max abs diff of scores vs the package {max_diff[name]:.2e}", flush=True)

    samples = {name: [] for name in candidates}
    for r in range(args.rounds):
        for name, fn in candidates.items():
            ms = triton.testing.do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median")
            samples[name].append(ms)
            print(f"round {r + 1}/{args.rounds} {name}: {ms:.3f} ms", flush=True)
    rows = []
    for name, v in samples.items():
        ms = statistics.median(v)
        if name.startswith("pool only"):
            rate = dict(gb_s=q.numel() * q.element_size() / ms / 1e6)
        else:
            rate = dict(tflops=flops / ms / 1e9)
        rows.append(dict(name=name, ms=ms, runs=v, max_abs_diff=max_diff[name], **rate))
    for row in sorted(rows, key=lambda r: r["ms"]):
        rate = f"{row['gb_s']:.0f} GB/s" if "gb_s" in row else f"{row['tflops']:.0f} TF/s"
        print(f"  {row['ms']:.3f} ms {rate} {row['name']}")

    pool = functools.partial(scoring.pool_queries, q, qb.table, qb.score_groups, pooled, B, per_group)
    for name, fn in (("pool queries (in scores)", pool),
                     ("select (torch)", select_torch), ("select (fused)", select),
                     ("scores + select", lambda: (candidates["package"](), select()))):
        ms = triton.testing.do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median")
        print(f"{args.heads} S={S} page={page} {name:>24}: {ms:.3f} ms")
        rows.append(dict(name=name, ms=ms))
    card = torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu"
    result = dict(provenance.record(card), settings=vars(args), scoring_tflop=flops / 1e12, rows=rows)
    files.write_result(args.out, "selection", result)


if __name__ == "__main__":
    main()
