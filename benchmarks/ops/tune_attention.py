"""Sweep the sparse attention kernel's launch configurations on one GPU; prints TFLOP/s of each.

    python -m benchmarks.ops.tune_attention --seq-len 131072 --pattern hybrid --page-sizes 64 \
        --rows 128,256 --block-n 64,128 --warps 4,8 --stages 2,3 --rounds 3 [--out results.json]

Times one prompt (context 0) over a shuffled paged cache (bf16) for one pattern (``dense``: every
causal block; ``hybrid``: the package's default sink/local/stride). Per page size: the default
launch configuration, the pointer-gather tiles of the page-16 default, and (pages >= 64) TMA tiles
over the product of the axes given. TFLOP/s counts the kept blocks only (effective throughput).
With ``--rounds`` N the whole sweep is timed N times, interleaved, and each configuration reports
the median of its rounds: clocks drift by a few percent over a sweep, more than some effects.
``--alt-kernel FILE`` (repeatable) times other versions of ``kernels/attention.py`` (e.g. ``git
show BRANCH:kernels/attention.py > alt.py``) on the same inputs, interleaved with the package's in
every round, so that clock drift falls on all alike.
A 131K prefill keeps the card at its power limit, where clocks sit ~25% below the boost clock that
short timings see (``profile-h100-2026-11-28-*``): ``--warmup-ms 1500 --rep-ms 1000`` times that.
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch
import triton

from benchmarks.harness import files, provenance
from benchmarks.ops.common import causal_flops, load_kernel_file, static_pattern_prompt
from vllm_flashprefill.kernels.attention import launch_config, sparse_prefill_attention
from vllm_flashprefill.kernels.limits import device_limits


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=32768)
    ap.add_argument("--page-sizes", default="16,64,128")
    ap.add_argument("--heads", default="32,8,128;14,2,64")
    ap.add_argument("--pattern", default="dense", choices=["dense", "hybrid", "local", "strided"])
    for axis, default in (("rows", "64,128"), ("block-n", "64,128"), ("warps", "4,8"), ("stages", "2,3")):
        ap.add_argument(f"--{axis}", default=default, help="comma-separated values to sweep")
    ap.add_argument("--rep-ms", type=int, default=100)
    ap.add_argument("--warmup-ms", type=int, default=25,
                    help="~1500 holds the card at its power limit before timing, as a long prefill "
                         "does inside the engine (short bursts run at higher clocks)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--alt-kernel", action="append", default=[], metavar="FILE",
                    help="another kernels/attention.py to time beside the package's (repeatable)")
    ap.add_argument("--out", default=None, help="results .json, or a folder for "
                    f"tune-attention-<card>-<date>.json (default ./{files.DEFAULT_OUT_DIR}/)")
    args = ap.parse_args()
    kernels = {"package": sparse_prefill_attention}
    for i, path in enumerate(args.alt_kernel):
        kernels[path] = load_kernel_file(path, f"alt_attention_{i}").sparse_prefill_attention
    dev, dtype, B = "cuda", torch.bfloat16, 128
    results = []
    for spec, page in itertools.product(args.heads.split(";"), map(int, args.page_sizes.split(","))):
        hq, hkv, d = map(int, spec.split(","))
        gqa, S = hq // hkv, args.seq_len
        prompt = static_pattern_prompt(S, hq, hkv, d, page, args.pattern, B, dtype, dev)
        out = torch.empty_like(prompt.q)
        density = prompt.density
        flops = density * causal_flops(hq, d, S)
        axes = [[int(x) for x in getattr(args, a).split(",")] for a in
                ("rows", "block_n", "warps", "stages")]
        limits = device_limits(prompt.q.device)
        sweep = [launch_config(d, gqa, B, page, limits), launch_config(d, gqa, B, 16, limits)]
        sweep += [
            dict(BLOCK_Q=bm // triton.next_power_of_2(gqa), BLOCK_M=bm, BLOCK_N=bn, num_warps=w,
                 num_stages=st, TMA=True)
            for bm, bn, w, st in itertools.product(*axes)
            if bn <= page
        ]
        configs = [dict(t) for t in dict.fromkeys(tuple(sorted(c.items())) for c in sweep)]
        runs = [(name, c) for c in configs for name in kernels]
        times: list[list[float] | None] = [[] for _ in runs]
        for _ in range(args.rounds):
            for i, (name, c) in enumerate(runs):
                if times[i] is None:
                    continue
                try:
                    times[i].append(triton.testing.do_bench(
                        lambda fn=kernels[name], c=c: fn(
                            prompt.q, prompt.k_cache, prompt.v_cache, out, prompt.block_table,
                            prompt.seq_lens, prompt.qblocks.table, prompt.kv_indices,
                            prompt.kv_counts, d**-0.5, B, c),
                        warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median"))
                except Exception as exc:  # an infeasible tile shape (shared memory) is a data point too
                    print(spec, page, name, c, "FAILED", type(exc).__name__, str(exc)[:120], flush=True)
                    times[i] = None
        for (name, c), samples in zip(runs, times, strict=True):
            if not samples:
                continue
            ms = statistics.median(samples)
            tf = flops / ms / 1e9
            results.append(dict(kernel=name, heads=spec, page_size=page, seq_len=S, pattern=args.pattern,
                                density=density, ms=ms, rounds_ms=samples, tflops=tf, **c))
            print(f"{spec:>10} page={page:<4} {name} {c} {ms:8.3f} ms {tf:6.1f} TF/s", flush=True)
    best = {}
    for r in results:
        key = (r["heads"], r["page_size"], r["kernel"])
        if key not in best or r["tflops"] > best[key]["tflops"]:
            best[key] = r
    print("BEST:")
    for key, r in best.items():
        print(key, f"{r['tflops']:.1f} TF/s {r['ms']:.3f} ms",
              {k: r.get(k) for k in ("BLOCK_Q", "BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "TMA")})
    result = dict(provenance.record(torch.cuda.get_device_name()), settings=vars(args), rows=results)
    files.write_result(args.out, "tune-attention", result)


if __name__ == "__main__":
    main()
