"""End-to-end checks of the FLASHPREFILL backend inside vLLM (GPU; vLLM 0.26 from the devkit).

Each engine runs in its own subprocess (so GPU memory is freed between them); the parent compares
greedy tokens and log-probs and writes ``benchmarks/results/e2e-<card>-<date>.json``.

    python3 tests/gpu/e2e_checks.py --model-dir /tmp/llama8b [--checks dense,all_blocks,chunking,prefix]

Checks:
  dense       pattern=dense (pure FlashAttention delegation) == FLASH_ATTN, prompts 1K-16K.
  all_blocks  every block selected, through the sparse kernel (min_seq_len 0), on a mixed batch
              (long prompts chunked over several steps while short ones already decode) == FLASH_ATTN.
  chunking    dynamic pattern, one 32K prompt, max_num_batched_tokens 2048 / 8192 / 32768: same output.
  prefix      dynamic pattern: a 32K prompt served cold == the same prompt after a 20480-token prefix
              of it was cached by another request.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

VOCAB = (100, 4000)


def prompt_tokens(length: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(*VOCAB) for _ in range(length)]


def run_engine(engine_kwargs: dict, prompts: list[list[int]], max_tokens: int, warm: list[list[int]] = ()):
    """In a subprocess: LLM(**engine_kwargs); optionally generate ``warm`` first; then ``prompts``."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(dict(engine=engine_kwargs, prompts=prompts, warm=list(warm), max_tokens=max_tokens), f)
        job = f.name
    subprocess.run([sys.executable, __file__, "--worker", job], check=True)
    with open(job + ".out") as f:
        return json.load(f)


def worker(job_path: str) -> None:
    from vllm import LLM, SamplingParams

    job = json.load(open(job_path))
    llm = LLM(**job["engine"])
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], logprobs=0, ignore_eos=True)
    if job["warm"]:
        llm.generate([{"prompt_token_ids": p} for p in job["warm"]], params, use_tqdm=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]], params, use_tqdm=False)
    result = [
        dict(
            tokens=list(o.outputs[0].token_ids),
            logprobs=[lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)],
        )
        for o in outs
    ]
    json.dump(result, open(job_path + ".out", "w"))


def compare(a: list[dict], b: list[dict]) -> dict:
    same = [x["tokens"] == y["tokens"] for x, y in zip(a, b)]
    first_lp = [abs(x["logprobs"][0] - y["logprobs"][0]) for x, y in zip(a, b)]
    agreeing = [
        abs(lx - ly)
        for x, y in zip(a, b)
        for tx, ty, lx, ly in zip(x["tokens"], y["tokens"], x["logprobs"], y["logprobs"])
        if tx == ty
    ]
    prefix = [
        next((i for i, (tx, ty) in enumerate(zip(x["tokens"], y["tokens"])) if tx != ty), len(x["tokens"]))
        for x, y in zip(a, b)
    ]
    return dict(
        identical_outputs=sum(same),
        prompts=len(same),
        first_token_logprob_max_abs_diff=max(first_lp),
        agreeing_tokens_logprob_max_abs_diff=max(agreeing) if agreeing else None,
        common_prefix_tokens=prefix,
    )


def base_engine(args, **kw) -> dict:
    engine = dict(
        model=args.model_dir, load_format="dummy", dtype="bfloat16", seed=0,
        gpu_memory_utilization=0.85, max_num_seqs=16, enforce_eager=args.eager,
    )
    engine.update(kw)
    return engine


def fp(**options) -> dict:
    return dict(attention_backend="FLASHPREFILL", additional_config={"flashprefill": options})


def check_dense(args) -> dict:
    lengths = [1024, 2048, 4096, 8192, 16384]
    prompts = [prompt_tokens(n, i) for i, n in enumerate(lengths)]
    kw = dict(max_model_len=16384 + 64, max_num_batched_tokens=16384 + 64)
    ref = run_engine(base_engine(args, attention_backend="FLASH_ATTN", **kw), prompts, args.max_tokens)
    got = run_engine(base_engine(args, **fp(pattern="dense"), **kw), prompts, args.max_tokens)
    return dict(lengths=lengths, **compare(ref, got))


def check_all_blocks(args) -> dict:
    lengths = [20000, 12000, 300, 900, 50, 4000]
    prompts = [prompt_tokens(n, 100 + i) for i, n in enumerate(lengths)]
    kw = dict(max_model_len=20480 + 64, max_num_batched_tokens=4096)
    ref = run_engine(base_engine(args, attention_backend="FLASH_ATTN", **kw), prompts, args.max_tokens)
    every_block = fp(pattern="local", local_blocks=1 << 20, min_seq_len=0)
    got = run_engine(base_engine(args, **every_block, **kw), prompts, args.max_tokens)
    return dict(lengths=lengths, max_num_batched_tokens=4096, **compare(ref, got))


def check_chunking(args) -> dict:
    prompts = [prompt_tokens(32768, 7)]
    outs = {}
    for mnbt in (2048, 8192, 32768):
        kw = dict(max_model_len=32768 + 64, max_num_batched_tokens=mnbt if mnbt < 32768 else 32768 + 64)
        outs[mnbt] = run_engine(base_engine(args, **fp(pattern="dynamic"), **kw), prompts, args.max_tokens)
    return {
        f"{a}_vs_32768": compare(outs[32768], outs[a]) for a in (2048, 8192)
    }


def check_prefix(args) -> dict:
    prompt = prompt_tokens(32768, 11)
    other = prompt[:20480] + prompt_tokens(4096, 12)
    kw = dict(max_model_len=32768 + 64, max_num_batched_tokens=8192, enable_prefix_caching=True)
    cold = run_engine(base_engine(args, **fp(pattern="dynamic"), **kw), [prompt], args.max_tokens)
    warm = run_engine(base_engine(args, **fp(pattern="dynamic"), **kw), [prompt], args.max_tokens, warm=[other])
    return compare(cold, warm)


CHECKS = dict(dense=check_dense, all_blocks=check_all_blocks, chunking=check_chunking, prefix=check_prefix)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        return worker(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--checks", default=",".join(CHECKS))
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--eager", action="store_true", help="enforce_eager (faster engine start)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch
    import vllm

    card = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    report = dict(card=card, date=date, vllm=vllm.__version__, model=os.path.basename(args.model_dir.rstrip("/")),
                  load_format="dummy", eager=args.eager, checks={})
    for name in args.checks.split(","):
        print(f"=== {name}", flush=True)
        try:
            report["checks"][name] = CHECKS[name](args)
        except Exception as exc:  # keep the other checks' results
            report["checks"][name] = dict(error=repr(exc))
        print(json.dumps(report["checks"][name]), flush=True)
    out = args.out or f"benchmarks/results/e2e-{card.split()[-1].lower()}-{date}.json"
    os.makedirs(os.path.dirname(out), exist_ok=True)
    json.dump(report, open(out, "w"), indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main()
