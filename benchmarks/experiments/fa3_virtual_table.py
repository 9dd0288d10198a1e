"""How fast does FA3 run our static patterns? ``sparse_kernel: flash_attn`` against our kernel.

    python3 benchmarks/experiments/fa3_virtual_table.py --seq-lens 32768,131072 --out fa3-vt.json

Times one layer call on one shuffled paged cache (bf16, one prompt, the package's default static
pattern with ``min_seq_len`` 0) three ways: our Triton kernel; vLLM's FA3 over per-query-block
block tables, exactly as the backend runs it (``vllm_flashprefill/flash_sparse.py``); FA3 dense.
Interleaved rounds, the card held at its power limit first (``--warmup-ms``). Checks that both
sparse paths agree. Needs vLLM (the devkit) on a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import causal_flops, static_pattern_prompt  # noqa: E402  (benchmarks/common.py)

from vllm_flashprefill.flash_sparse import flash_sparse_attention, plan_runs  # noqa: E402
from vllm_flashprefill.kernels.attention import sparse_prefill_attention  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-lens", default="32768,131072")
    ap.add_argument("--heads", default="32,8,128")
    ap.add_argument("--pattern", default="hybrid", choices=["local", "strided", "hybrid"])
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--warmup-ms", type=int, default=1500)
    ap.add_argument("--rep-ms", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func

    block = 128
    hq, hkv, d = map(int, args.heads.split(","))
    rows = []
    for seq_len in map(int, args.seq_lens.split(",")):
        p = static_pattern_prompt(seq_len, hq, hkv, d, args.page_size, args.pattern, block)
        runs = plan_runs(p.qblocks.table_cpu, p.block_table, p.kv_indices, p.kv_counts, block,
                         args.page_size)
        outs = {name: torch.empty_like(p.q) for name in ("triton", "fa3_sparse", "fa3_dense")}
        whole = torch.tensor([0, seq_len], dtype=torch.int32, device=p.q.device)

        def triton_sparse(p=p, out=outs["triton"]):
            sparse_prefill_attention(p.q, p.k_cache, p.v_cache, out, p.block_table, p.seq_lens,
                                     p.qblocks.table, p.kv_indices, p.kv_counts, d**-0.5, block)

        def fa3_sparse(p=p, out=outs["fa3_sparse"], runs=runs):
            flash_sparse_attention(p.q, p.k_cache, p.v_cache, out, runs, d**-0.5)

        def fa3_dense(p=p, out=outs["fa3_dense"], whole=whole, seq_len=seq_len):
            flash_attn_varlen_func(
                q=p.q, k=p.k_cache, v=p.v_cache, out=out, max_seqlen_q=seq_len, cu_seqlens_q=whole,
                max_seqlen_k=seq_len, seqused_k=p.seq_lens, softmax_scale=d**-0.5, causal=True,
                block_table=p.block_table, fa_version=3)

        calls = {"triton": triton_sparse, "fa3_sparse": fa3_sparse, "fa3_dense": fa3_dense}
        for fn in calls.values():
            fn()
        torch.cuda.synchronize()
        diff = (outs["triton"].float() - outs["fa3_sparse"].float()).abs().max().item()
        times = {name: [] for name in calls}
        for _ in range(args.rounds):
            for name, fn in calls.items():
                times[name].append(triton.testing.do_bench(
                    fn, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median"))
        full = causal_flops(hq, d, seq_len)
        for name, samples in times.items():
            ms = statistics.median(samples)
            flops = full if name == "fa3_dense" else p.density * full
            rows.append({"impl": name, "seq_len": seq_len, "pattern": args.pattern,
                         "density": p.density, "ms": ms, "rounds_ms": samples,
                         "tflops": flops / ms / 1e9})
            print(f"S={seq_len:>6} {name:<12} {ms:8.3f} ms {flops / ms / 1e9:6.1f} TF/s"
                  f" (density {p.density:.3f})", flush=True)
        print(f"S={seq_len:>6} max |triton - fa3_sparse| = {diff:.3e}", flush=True)
        rows.append({"check": "max_abs_diff_triton_vs_fa3_sparse", "seq_len": seq_len, "value": diff})
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "triton": triton.__version__,
                       "torch": torch.__version__, "settings": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
