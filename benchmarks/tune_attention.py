"""Sweep the sparse attention kernel's tile shapes on one GPU; prints TFLOP/s per configuration.

    python3 benchmarks/tune_attention.py --seq-len 32768 [--out results.json]

Times one prompt (context 0) over a shuffled paged cache (page 16, bf16) for the dense pattern
(every causal block) and hybrid; effective TFLOP/s counts only the blocks computed.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import triton

from vllm_flashprefill.config import FlashPrefillConfig
from vllm_flashprefill.kernels.attention import launch_config, sparse_prefill_attention
from vllm_flashprefill.patterns import forced_block_mask, mask_to_lists
from vllm_flashprefill.plan import build_query_blocks


def paged_cache(seq_len, num_kv_heads, head_size, page_size, dtype, device):
    pages = -(-seq_len // page_size)
    kv = torch.randn(pages, page_size, num_kv_heads, 2 * head_size, dtype=dtype, device=device)
    k, v = kv.split(head_size, dim=-1)
    table = torch.randperm(pages, device=device, dtype=torch.int32)[None, :]
    return k, v, table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=32768)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--heads", default="32,8,128;14,2,64")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev, dtype, B = "cuda", torch.bfloat16, 128
    rows = []
    for spec in args.heads.split(";"):
        hq, hkv, d = map(int, spec.split(","))
        S = args.seq_len
        k, v, table = paged_cache(S, hkv, d, args.page_size, dtype, dev)
        q = torch.randn(S, hq, d, dtype=dtype, device=dev)
        out = torch.empty_like(q)
        seq_lens = torch.tensor([S], dtype=torch.int32, device=dev)
        qsl = torch.tensor([0, S], dtype=torch.int32)
        qb = build_query_blocks(qsl, seq_lens.cpu(), [0], B, dev)
        causal_pairs = sum(i + 1 for i in range(qb.num_blocks))
        flops_dense = 4.0 * hq * d * S * (S + 1) / 2
        base = launch_config(d, hq // hkv, B)
        gqa = hq // hkv
        sweep = [base] + [
            dict(BLOCK_Q=bq, BLOCK_M=max(16, triton.next_power_of_2(bq * gqa)), BLOCK_N=bn,
                 num_warps=w, num_stages=st)
            for bq, bn, w, st in itertools.product((4, 8, 16, 32, 64), (32, 64, 128), (4, 8), (2, 3, 4))
            if 64 <= triton.next_power_of_2(bq * gqa) <= 128
        ]
        for pattern in ("dense",):
            cfg = FlashPrefillConfig(pattern=pattern, block_size=B, min_seq_len=0)
            mask = forced_block_mask(qb.block_index, qb.num_kv_blocks, cfg)
            idx, cnt = mask_to_lists(mask)
            density = mask.sum().item() / causal_pairs
            for c in sweep:
                try:
                    fn = lambda: sparse_prefill_attention(q, k, v, out, table, seq_lens, qb.table, idx, cnt, d**-0.5, B, c)
                    ms = triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")
                except Exception as exc:  # an infeasible tile shape (shared memory) is a data point too
                    print(spec, pattern, c, "FAILED", type(exc).__name__, str(exc)[:120])
                    continue
                tf = density * flops_dense / ms / 1e9
                rows.append(dict(heads=spec, pattern=pattern, seq_len=S, density=density, ms=ms, tflops=tf, **c))
                print(f"{spec:>10} {pattern:>6} dens={density:.3f} {c} {ms:8.3f} ms {tf:6.1f} TF/s", flush=True)
    best = {}
    for r in rows:
        key = (r["heads"], r["pattern"])
        if key not in best or r["tflops"] > best[key]["tflops"]:
            best[key] = r
    print("BEST:")
    for key, r in best.items():
        print(key, f"{r['tflops']:.1f} TF/s {r['ms']:.3f} ms", {k: r[k] for k in ("BLOCK_Q", "BLOCK_M", "BLOCK_N", "num_warps", "num_stages")})
    if args.out:
        json.dump(dict(card=torch.cuda.get_device_name(), rows=rows), open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
