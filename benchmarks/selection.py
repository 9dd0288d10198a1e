"""Where the time of dynamic selection goes: pooling + block scores, then thresholding and list
building (the fused Triton kernel the backend runs, and the torch definition it replaces), for one
prompt over a shuffled paged cache (bf16).

    python3 benchmarks/selection.py --seq-len 131072 --heads 32,8,128 --page-size 64 [--sweep]
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton

from vllm_flashprefill.config import FlashPrefillConfig
from vllm_flashprefill.kernels.scoring import block_scores, blocks_per_group
from vllm_flashprefill.patterns import mask_to_lists, select_dynamic, select_dynamic_lists
from vllm_flashprefill.plan import build_query_blocks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=131072)
    ap.add_argument("--heads", default="32,8,128")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--sweep", action="store_true", help="also sweep the scoring kernel's tiles")
    args = ap.parse_args()
    hq, hkv, d = map(int, args.heads.split(","))
    S, B, dev, dtype = args.seq_len, 128, "cuda", torch.bfloat16
    page = args.page_size
    pages = S // page
    kv = torch.randn(pages, page, hkv, 2 * d, dtype=dtype, device=dev)
    k = kv[..., :d]
    table = torch.randperm(pages, device=dev, dtype=torch.int32)[None]
    seq_lens = torch.tensor([S], dtype=torch.int32, device=dev)
    q = torch.randn(S, hq, d, dtype=dtype, device=dev)
    qb = build_query_blocks(torch.tensor([0, S]), seq_lens.cpu(), [0], B, dev, blocks_per_group(hq // hkv))
    scores = torch.empty(qb.num_blocks, hq, qb.num_kv_blocks, device=dev)
    pooled = torch.empty(qb.num_blocks, hq, d, device=dev)
    cfg = FlashPrefillConfig(pattern="dynamic", min_seq_len=0)

    def score(config=None):
        block_scores(q, k, table, seq_lens, qb.table, qb.score_groups, scores, pooled, d**-0.5, B, config)

    def select_torch():
        return mask_to_lists(select_dynamic(scores, qb.block_index, qb.last_block, hkv, cfg))

    def select():
        return select_dynamic_lists(scores, qb.table, seq_lens, hkv, qb.num_kv_blocks, cfg)

    score()
    for name, fn in (("scores", score), ("select (torch)", select_torch), ("select (fused)", select),
                     ("total", lambda: (score(), select()))):
        ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        print(f"{args.heads} S={S} page={page} {name:>14}: {ms:.3f} ms")
    if args.sweep:
        results = []
        for kvp, bn, warps, stages, tma in itertools.product(
            (8, 16, 32), (64, 128), (4, 8), (2, 3), (False, True)
        ):
            if tma and page % bn:
                continue
            config = dict(KV_BLOCKS_PER_PROGRAM=kvp, BLOCK_N=bn, num_warps=warps, num_stages=stages, TMA=tma)
            ms = triton.testing.do_bench(lambda: score(config), warmup=10, rep=50, return_mode="median")
            results.append((ms, config))
        for ms, config in sorted(results, key=lambda r: r[0])[:5]:
            print(f"  scores {ms:.3f} ms {config}")


if __name__ == "__main__":
    main()
