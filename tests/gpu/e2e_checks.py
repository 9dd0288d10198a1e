"""End-to-end checks of the FLASHPREFILL backend inside vLLM (GPU; vLLM 0.26 from the devkit).

Each engine runs in its own subprocess (so GPU memory is freed between them); the parent compares
greedy tokens and log-probs and writes ``benchmarks/results/e2e-<card>-<date>.json``.

    python3 tests/gpu/e2e_checks.py --model-dir /tmp/llama8b [--checks dense,all_blocks,chunking,prefix]
    python3 tests/gpu/e2e_checks.py --model-dir /tmp/smollm2 --real --max-len 8192 \
        --sparse '{"min_seq_len": 1024, "local_blocks": 4}'

With --load-format dummy (the default) the weights are uniform in +-1e-3: attention then barely moves
the logits, so identical outputs there only show that nothing breaks. Use --real with real weights
for a comparison that tests the attention itself.

Checks:
  dense       pattern=dense (pure FlashAttention delegation) == FLASH_ATTN, prompts up to L/2.
  all_blocks  every block selected, through the sparse kernel (min_seq_len 0), on a mixed batch
              (long prompts chunked over several steps while short ones already decode) == FLASH_ATTN.
  chunking    dynamic pattern, one prompt of length L, max_num_batched_tokens L/16, L/4, L: same output.
  prefix      dynamic pattern: a prompt of length L served cold == the same prompt after a prefix of
              5/8 L of it was cached by another request (cached_tokens_warm: the hit vLLM reports).
  tp          tensor parallelism (needs 2 GPUs): FLASHPREFILL (--sparse) with tensor_parallel_size 2,
              multiprocessing and Ray executors, == the same at size 1; FLASH_ATTN 1 vs 2 beside it
              (how far sharding alone moves the numbers). Needs real or seeded weights
              (tests/gpu/random_model.py): dummy weights differ per shard layout. --tp-runs picks
              a subset of the five engines.
L is --max-len (default 32768).
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
            cached_tokens=o.num_cached_tokens,
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
        model=args.model_dir, load_format="auto" if args.real else "dummy", dtype="bfloat16", seed=0,
        gpu_memory_utilization=0.85, max_num_seqs=16, enforce_eager=args.eager,
    )
    engine.update(kw)
    return engine


def fp(**options) -> dict:
    return dict(attention_backend="FLASHPREFILL", additional_config={"flashprefill": options})


def check_dense(args) -> dict:
    L = args.max_len
    lengths = [L // 32, L // 16, L // 8, L // 4, L // 2]
    prompts = [prompt_tokens(n, i) for i, n in enumerate(lengths)]
    kw = dict(max_model_len=L, max_num_batched_tokens=L)
    ref = run_engine(base_engine(args, attention_backend="FLASH_ATTN", **kw), prompts, args.max_tokens)
    got = run_engine(base_engine(args, **fp(pattern="dense"), **kw), prompts, args.max_tokens)
    return dict(lengths=lengths, **compare(ref, got))


def check_all_blocks(args) -> dict:
    L = args.max_len - 64
    lengths = [L * 5 // 8, L * 3 // 8, 300, 900, 50, L // 8]
    prompts = [prompt_tokens(n, 100 + i) for i, n in enumerate(lengths)]
    mnbt = max(args.max_len // 8, 512)
    kw = dict(max_model_len=args.max_len, max_num_batched_tokens=mnbt)
    ref = run_engine(base_engine(args, attention_backend="FLASH_ATTN", **kw), prompts, args.max_tokens)
    every_block = fp(pattern="local", local_blocks=1 << 20, min_seq_len=0)
    got = run_engine(base_engine(args, **every_block, **kw), prompts, args.max_tokens)
    return dict(lengths=lengths, max_num_batched_tokens=mnbt, **compare(ref, got))


def check_chunking(args) -> dict:
    L = args.max_len - 64
    prompts = [prompt_tokens(L, 7)]
    outs = {}
    budgets = (args.max_len // 16, args.max_len // 4, args.max_len)
    for mnbt in budgets:
        kw = dict(max_model_len=args.max_len, max_num_batched_tokens=mnbt)
        outs[mnbt] = run_engine(base_engine(args, **fp(**args.sparse), **kw), prompts, args.max_tokens)
    return {f"{a}_vs_{budgets[-1]}": compare(outs[budgets[-1]], outs[a]) for a in budgets[:-1]}


def check_prefix(args) -> dict:
    L = args.max_len - 64
    prompt = prompt_tokens(L, 11)
    shared = (L * 5 // 8) // 128 * 128
    other = prompt[:shared] + prompt_tokens(L // 8, 12)
    kw = dict(max_model_len=args.max_len, max_num_batched_tokens=args.max_len // 4, enable_prefix_caching=True)
    cold = run_engine(base_engine(args, **fp(**args.sparse), **kw), [prompt], args.max_tokens)
    warm = run_engine(base_engine(args, **fp(**args.sparse), **kw), [prompt], args.max_tokens, warm=[other])
    # A hit must have happened, or "identical" would only repeat the cold run.
    return dict(shared_prefix=shared, cached_tokens_cold=cold[0]["cached_tokens"],
                cached_tokens_warm=warm[0]["cached_tokens"], **compare(cold, warm))


def check_tp(args) -> dict:
    L = args.max_len - 64
    lengths = [L, L // 2, L // 4, 700]
    prompts = [prompt_tokens(n, 200 + i) for i, n in enumerate(lengths)]
    kw = dict(max_model_len=args.max_len, max_num_batched_tokens=args.max_len // 4)
    fa = dict(attention_backend="FLASH_ATTN")
    runs = {
        "fa_tp1": base_engine(args, **fa, **kw),
        "fa_tp2": base_engine(args, **fa, tensor_parallel_size=2, **kw),
        "fp_tp1": base_engine(args, **fp(**args.sparse), **kw),
        "fp_tp2_mp": base_engine(args, **fp(**args.sparse), tensor_parallel_size=2,
                                 distributed_executor_backend="mp", **kw),
        "fp_tp2_ray": base_engine(args, **fp(**args.sparse), tensor_parallel_size=2,
                                  distributed_executor_backend="ray", **kw),
    }
    if args.tp_runs:
        runs = {name: runs[name] for name in args.tp_runs.split(",")}
    outs, errors = {}, {}
    for name, engine in runs.items():
        try:
            outs[name] = run_engine(engine, prompts, args.max_tokens)
        except subprocess.CalledProcessError as exc:
            errors[name] = repr(exc)
    pairs = [("fa_tp1", "fa_tp2"), ("fp_tp1", "fp_tp2_mp"), ("fp_tp1", "fp_tp2_ray"), ("fa_tp1", "fp_tp1")]
    result = {f"{a}_vs_{b}": compare(outs[a], outs[b]) for a, b in pairs if a in outs and b in outs}
    if not result:
        errors["compare"] = f"no pair of {pairs} ran: nothing compared"
    return dict(lengths=lengths, engines=list(runs), **result, **({"errors": errors} if errors else {}))


CHECKS = dict(
    dense=check_dense, all_blocks=check_all_blocks, chunking=check_chunking, prefix=check_prefix,
    tp=check_tp,
)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        return worker(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--checks", default="dense,all_blocks,chunking,prefix")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--eager", action="store_true", help="enforce_eager (faster engine start)")
    ap.add_argument("--max-len", type=int, default=32768, help="max_model_len; prompts scale with it")
    ap.add_argument("--real", action="store_true", help="load the model's weights (default: dummy)")
    ap.add_argument("--sparse", type=json.loads, default={},
                    help="extra FlashPrefill options for the chunking/prefix checks (pattern dynamic)")
    ap.add_argument("--tp-runs", default="",
                    help="tp: a comma-separated subset of fa_tp1,fa_tp2,fp_tp1,fp_tp2_mp,fp_tp2_ray (default: all)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.sparse = {"pattern": "dynamic", **args.sparse}
    import torch
    import vllm

    card = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    report = dict(card=card, date=date, vllm=vllm.__version__, model=os.path.basename(args.model_dir.rstrip("/")),
                  load_format="auto" if args.real else "dummy", eager=args.eager,
                  sparse=args.sparse, checks={})
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
