"""How fast would FA3 run our static sparse patterns? An upper bound for the Triton kernel.

    python3 benchmarks/experiments/fa3_virtual_table.py --seq-lens 32768,131072 --out fa3-vt.json

A static pattern (``local``/``strided``/``hybrid``) selects the same KV blocks for every head, so
each query block can be handed to vLLM's FA3 as its own sequence whose block table lists only the
pages of its selected KV blocks, the diagonal block last: FA3's causal mask (aligned at the end of
each sequence) then masks exactly the diagonal block. Times, on one shuffled paged cache (bf16,
pages of 64, one prompt): our kernel, FA3 over those virtual block tables, and FA3 dense;
interleaved rounds, the card held at its power limit first (``--warmup-ms``). Checks that both
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
from common import causal_flops, mask_density  # noqa: E402  (benchmarks/common.py)

from vllm_flashprefill.config import FlashPrefillConfig  # noqa: E402
from vllm_flashprefill.kernels.attention import sparse_prefill_attention  # noqa: E402
from vllm_flashprefill.patterns import forced_block_mask, mask_to_lists  # noqa: E402
from vllm_flashprefill.plan import build_query_blocks  # noqa: E402


def virtual_block_tables(table, idx, cnt, qb_table, block, page):
    """Per query block: the pages of its selected KV blocks (diagonal last) and their key count."""
    pages_per_block = block // page
    blocks = idx[:, 0, :].long().clamp(min=0)
    pages = (blocks[:, :, None] * pages_per_block + torch.arange(pages_per_block, device=idx.device))
    vt = table[0].long()[pages.reshape(blocks.shape[0], -1)].to(torch.int32)
    count = cnt[:, 0].long()
    last_pos = (qb_table[:, 2] + qb_table[:, 3] - 1).long()
    diag_start = (last_pos // block) * block
    seqused = ((count - 1) * block + last_pos - diag_start + 1).to(torch.int32)
    rows = qb_table[:, 1].long()
    cu_q = torch.cat([rows, (rows[-1:] + qb_table[-1:, 3].long())]).to(torch.int32)
    return vt.contiguous(), seqused, cu_q


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
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    dev, dtype, B, page = "cuda", torch.bfloat16, 128, args.page_size
    hq, hkv, d = map(int, args.heads.split(","))
    rows = []
    for S in map(int, args.seq_lens.split(",")):
        pages = -(-S // page)
        kv = torch.randn(pages, page, hkv, 2 * d, dtype=dtype, device=dev)
        k, v = kv.split(d, dim=-1)
        table = torch.randperm(pages, device=dev, dtype=torch.int32)[None, :]
        q = torch.randn(S, hq, d, dtype=dtype, device=dev)
        seq_lens = torch.tensor([S], dtype=torch.int32, device=dev)
        qb = build_query_blocks(torch.tensor([0, S]), seq_lens.cpu(), [0], B, dev)
        cfg = FlashPrefillConfig(pattern=args.pattern, block_size=B, min_seq_len=0)
        mask = forced_block_mask(qb.block_index, qb.last_block, qb.num_kv_blocks, cfg)
        idx, cnt = mask_to_lists(mask)
        density = mask_density(mask, qb)
        vt, seqused, cu_q = virtual_block_tables(table, idx, cnt, qb.table, B, page)
        outs = {name: torch.empty_like(q) for name in ("triton", "fa3_virtual", "fa3_dense")}
        cu_dense = torch.tensor([0, S], dtype=torch.int32, device=dev)
        calls = {
            "triton": lambda: sparse_prefill_attention(
                q, k, v, outs["triton"], table, seq_lens, qb.table, idx, cnt, d**-0.5, B),
            "fa3_virtual": lambda: flash_attn_varlen_func(
                q, k, v, max_seqlen_q=B, cu_seqlens_q=cu_q, max_seqlen_k=int(seqused.max()),
                seqused_k=seqused, softmax_scale=d**-0.5, causal=True, block_table=vt,
                out=outs["fa3_virtual"], fa_version=3),
            "fa3_dense": lambda: flash_attn_varlen_func(
                q, k, v, max_seqlen_q=S, cu_seqlens_q=cu_dense, max_seqlen_k=S,
                seqused_k=seq_lens, softmax_scale=d**-0.5, causal=True, block_table=table,
                out=outs["fa3_dense"], fa_version=3),
        }
        for fn in calls.values():
            fn()
        torch.cuda.synchronize()
        diff = (outs["triton"].float() - outs["fa3_virtual"].float()).abs().max().item()
        times = {name: [] for name in calls}
        for _ in range(args.rounds):
            for name, fn in calls.items():
                times[name].append(triton.testing.do_bench(
                    fn, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median"))
        full = causal_flops(hq, d, S)
        for name, samples in times.items():
            ms = statistics.median(samples)
            flops = full if name == "fa3_dense" else density * full
            rows.append(dict(impl=name, seq_len=S, pattern=args.pattern, density=density, ms=ms,
                             rounds_ms=samples, tflops=flops / ms / 1e9))
            print(f"S={S:>6} {name:<12} {ms:8.3f} ms {flops / ms / 1e9:6.1f} TF/s"
                  f" (density {density:.3f})", flush=True)
        print(f"S={S:>6} max |triton - fa3_virtual| = {diff:.3e}", flush=True)
        rows.append(dict(check="max_abs_diff_triton_vs_fa3_virtual", seq_len=S, value=diff))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(card=torch.cuda.get_device_name(), triton=triton.__version__,
                           torch=torch.__version__, settings=vars(args), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
