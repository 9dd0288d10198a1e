"""One layer call of each of our attention kernels on the same inputs: the portable Triton kernel
(kernels/attention.py, ``sparse_kernel: triton``) and the Hopper one (kernels/attention_hopper.py,
what ``auto`` runs on sm_90), and the portable kernel with the launch configs it would pick on other
cards (``--card-configs``: sm_89 by default, an RTX 4090's tiles with TMA off; an H100 or H200 still
multiplies them on wgmma, so this bounds the algorithm there, not that card's speed). Records their
largest output difference from the Hopper kernel's (the GPU test suite checks both against the fp32
reference), then times them interleaved (``--rounds``), the card held at its power
limit first as inside a long prefill. No vLLM needed.

    python -m benchmarks.ops.attention_kernels [--out DIR_OR_JSON]
"""

from __future__ import annotations

import argparse
import functools
import statistics

import torch
import triton
from tqdm import tqdm

from benchmarks.harness import files, provenance
from benchmarks.ops.common import causal_flops, static_pattern_prompt
from vllm_flashprefill.kernels import attention, attention_hopper
from vllm_flashprefill.kernels.limits import limits_for

KERNELS = {"triton": attention.sparse_prefill_attention, "hopper": attention_hopper.sparse_prefill_attention}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="32800:hybrid,131072:hybrid,16384:dense",
                    help="tokens:pattern,... (32800: a last tile with one page past the end)")
    ap.add_argument("--heads", default="32,8,128", help="query heads, KV heads, head size")
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup-ms", type=int, default=1500)
    ap.add_argument("--rep-ms", type=int, default=600)
    ap.add_argument("--card-configs", default="89",
                    help="capabilities whose launch configs the portable kernel also runs with (comma list, '' none)")
    ap.add_argument("--out", default=None, help="results .json, or a folder for "
                    f"attention-kernels-<card>-<date>.json (default ./{files.DEFAULT_OUT_DIR}/)")
    args = ap.parse_args()
    kernels = dict(KERNELS)
    for capability in filter(None, args.card_configs.split(",")):
        kernels[f"triton-sm{capability}"] = functools.partial(attention.sparse_prefill_attention,
                                                              limits=limits_for(int(capability)))
    hq, hkv, d = map(int, args.heads.split(","))
    rows = []
    for case in tqdm(args.cases.split(","), desc="cases"):
        seq_len, pattern = int(case.split(":")[0]), case.split(":")[1]
        p = static_pattern_prompt(seq_len, hq, hkv, d, args.page_size, pattern, 128, torch.bfloat16, "cuda")
        call = (p.block_table, p.seq_lens, p.qblocks.table, p.kv_indices, p.kv_counts, d**-0.5, 128)
        outputs = {}
        for name, kernel in kernels.items():
            outputs[name] = torch.full_like(p.q, float("nan"))
            kernel(p.q, p.k_cache, p.v_cache, outputs[name], *call)
        diffs = {name: float((outputs["hopper"].float() - o.float()).abs().nan_to_num(float("inf")).max())
                 for name, o in outputs.items()}
        out = outputs["triton"]
        times = {name: [] for name in kernels}
        for _ in range(args.rounds):
            for name, kernel in kernels.items():
                times[name].append(triton.testing.do_bench(
                    lambda kernel=kernel: kernel(p.q, p.k_cache, p.v_cache, out, *call),
                    warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median"))
        flops = p.density * causal_flops(hq, d, seq_len)
        for name in kernels:
            ms = statistics.median(times[name])
            rows.append(dict(impl=name, seq_len=seq_len, pattern=pattern, density=p.density, ms=ms,
                             rounds_ms=times[name], tflops=flops / ms / 1e9,
                             max_abs_diff_hopper_vs_triton=diffs["triton"], max_abs_diff_vs_hopper=diffs[name]))
            tqdm.write(f"{case} {name}: {ms:.3f} ms, {rows[-1]['tflops']:.0f} TF/s, "
                       f"max |hopper - {name}| {diffs[name]:.2e}")
    result = dict(provenance.record(torch.cuda.get_device_name()), settings=vars(args), rows=rows)
    files.write_result(args.out, "attention-kernels", result)


if __name__ == "__main__":
    main()
