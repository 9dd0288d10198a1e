"""How fast does FA3 run our sparse rows? ``sparse_kernel: flash_attn`` against our kernel.

    python -m benchmarks.experiments.fa3_virtual_table --seq-lens 32768,131072 --out fa3-vt.json
    python -m benchmarks.experiments.fa3_virtual_table --pattern dynamic --max-budget 16

Times one layer call on one shuffled paged cache (bf16, one prompt, ``min_seq_len`` 0, the
package's defaults for the pattern otherwise) three ways, each through the package's own
``sparse_prefill.plan``/``run``: block lists + our kernel; block lists + FA3 over per-query-block
block tables (``sparse_kernel: flash_attn``: tables built by ``kernels/block_tables.py``, calls by
``vllm_flashprefill/flash_sparse.py``; one table per KV head for ``dynamic``); FA3 dense. Static
lists are built once (per step in the engine); ``dynamic`` scores and selects inside every timed
call, as each layer does, on data with planted hot blocks (``benchmarks/ops/common.py:
plant_structure``). Interleaved rounds, the card held at its power limit first (``--warmup-ms``).
Checks that both sparse paths agree. Needs vLLM (the devkit) on CUDA.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import triton

from benchmarks.harness import files, provenance
from benchmarks.ops.common import (
    LayerCall,
    causal_flops,
    fa3_attention,
    fa3_status,
    make_batch,
    make_config,
    plant_structure,
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-lens", default="32768,131072")
    ap.add_argument("--heads", default="32,8,128")
    ap.add_argument("--pattern", default="hybrid", choices=["local", "strided", "hybrid", "dynamic"])
    ap.add_argument("--max-budget", type=int, default=0, help="dynamic: content-selected block cap")
    ap.add_argument("--hot-frac", type=float, default=0.05, help="dynamic: planted hot KV blocks")
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--warmup-ms", type=int, default=1500)
    ap.add_argument("--rep-ms", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None, help="results .json, or a folder for "
                    f"fa3-virtual-table-<card>-<date>.json (default ./{files.DEFAULT_OUT_DIR}/)")
    args = ap.parse_args()
    fa3, reason = fa3_status("cuda")
    if fa3 is None:
        raise SystemExit(f"FA3 unavailable: {reason}")

    hq, hkv, d = map(int, args.heads.split(","))
    cfg = make_config(args.pattern, 128, max_budget=args.max_budget)
    rows = []
    for seq_len in map(int, args.seq_lens.split(",")):
        rows += measure(seq_len, hq, hkv, d, cfg, fa3, args)
    result = dict(provenance.record(torch.cuda.get_device_name()), settings=vars(args), rows=rows)
    files.write_result(args.out, "fa3-virtual-table", result)


def measure(seq_len, hq, hkv, d, cfg, fa3, args) -> list[dict]:
    """One prompt of ``seq_len`` tokens: the three ways timed in interleaved rounds, and the check."""
    batch = make_batch([seq_len], [0], hq, hkv, d, args.page_size, torch.bfloat16)
    if cfg.block_pattern.scores_content:
        plant_structure(batch, cfg.sparse_block, args.hot_frac)
    # Each layer call as the backend runs it: a static pattern's lists (and FA3 tables) come with
    # the plan, once per step; dynamic scores and selects (and builds its tables) in every call.
    ours, on_fa3 = LayerCall(batch, cfg), LayerCall(batch, cfg, on_fa3=True)
    outs = {name: torch.empty_like(batch.q) for name in ("triton", "fa3_sparse", "fa3_dense")}
    calls = {"triton": lambda: ours.run(outs["triton"]),
             "fa3_sparse": lambda: on_fa3.run(outs["fa3_sparse"]),
             "fa3_dense": lambda: fa3_attention(fa3, batch, outs["fa3_dense"], ours.scale)}
    for fn in calls.values():
        fn()
    torch.cuda.synchronize()
    diff = (outs["triton"].float() - outs["fa3_sparse"].float()).abs().max().item()
    density = ours.lists().density()
    times = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, fn in calls.items():
            times[name].append(triton.testing.do_bench(
                fn, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median"))
    full = causal_flops(hq, d, seq_len)
    rows = []
    for name, samples in times.items():
        ms = statistics.median(samples)
        flops = full if name == "fa3_dense" else density * full
        rows.append({"impl": name, "seq_len": seq_len, "pattern": cfg.pattern,
                     "density": density, "ms": ms, "rounds_ms": samples,
                     "tflops": flops / ms / 1e9})
        print(f"S={seq_len:>6} {name:<12} {ms:8.3f} ms {flops / ms / 1e9:6.1f} TF/s"
              f" (density {density:.3f})", flush=True)
    print(f"S={seq_len:>6} max |triton - fa3_sparse| = {diff:.3e}", flush=True)
    rows.append({"check": "max_abs_diff_triton_vs_fa3_sparse", "seq_len": seq_len, "value": diff})
    return rows


if __name__ == "__main__":
    main()
