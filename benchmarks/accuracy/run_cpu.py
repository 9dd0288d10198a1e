"""RULER accuracy of FLASHPREFILL patterns without a GPU: HF transformers + the torch reference.

    python -m benchmarks.accuracy.run_cpu --model .models/smollm2-135m --data .ruler/smollm2-135m \\
        --base '{"min_seq_len": 0}' --configs dynamic hybrid local

Every prompt is prefilled in one pass through ``hf_reference`` (the package's own block selection,
fp32 masked attention), then decoded greedily (dense). Weights run in ``--dtype`` (bf16 by default,
as vLLM would). Records one row per (config, sample); the JSON is rewritten after every sample,
and ``--resume`` skips the samples a previous run of the same file already holds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

from benchmarks.accuracy import suite
from benchmarks.harness import files, provenance


def generate(model, ids, max_new_tokens: int, eos: set[int], chunk: int = 0):
    """Greedy decoding; returns (new token ids, prefill seconds, decode seconds). ``chunk`` > 0
    prefills in pieces of that many tokens through the KV cache, as chunked prefill does."""
    import torch

    with torch.inference_mode():
        t0 = time.perf_counter()
        past, step = None, chunk or ids.shape[1]
        for start in range(0, ids.shape[1], step):
            out = model(input_ids=ids[:, start:start + step], past_key_values=past, use_cache=True,
                        logits_to_keep=1)
            past = out.past_key_values
        t1 = time.perf_counter()
        new = []
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        while True:
            new.append(int(token))
            if new[-1] in eos or len(new) >= max_new_tokens:
                break
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    return new, t1 - t0, time.perf_counter() - t1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF model folder")
    p.add_argument("--data", required=True, help="task-set folder from prepare.py (<data>/<length>/<task>/)")
    p.add_argument("--configs", nargs="*", default=["dynamic", "hybrid", "local"],
                   help="presets (dense dynamic hybrid local strided) or LABEL=JSON; dense always runs")
    p.add_argument("--base", default='{"min_seq_len": 0}', help="options (JSON) for every sparse config")
    p.add_argument("--tasks", help="comma-separated (default: all found)")
    p.add_argument("--lengths", help="comma-separated (default: all found)")
    p.add_argument("--num-samples", type=int, help="per task and length (default: all)")
    p.add_argument("--max-new-tokens", type=int, help="cap RULER's per-task generation length")
    p.add_argument("--prefill-chunk", type=int, default=0,
                   help="prefill in chunks of N tokens (vLLM's chunked prefill; 0: one pass)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", help="results JSON or folder for accuracy-cpu-<date>.json "
                   f"(default ./{files.DEFAULT_OUT_DIR}/)")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.accuracy import hf_reference

    if args.threads:
        torch.set_num_threads(args.threads)
    configs = suite.parse_configs(args.configs, json.loads(args.base))
    samples = suite.load_tasks(
        args.data, args.tasks.split(",") if args.tasks else None,
        [int(x) for x in args.lengths.split(",")] if args.lengths else None, args.num_samples,
    )
    path = files.output_path(args.out, "accuracy", "cpu", provenance.utc_date())
    records, invocations = [], []
    if args.resume and path.exists():
        previous = json.loads(path.read_text())
        records, invocations = previous["records"], previous.get("invocations", [])
    done = {(r["config"], r["task"], r["length"], r["index"]) for r in records}

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    gen_eos = model.generation_config.eos_token_id
    eos = {tok.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])} - {None}
    meta = {
        "card": "cpu", "device": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "date": datetime.date.today().isoformat(),
        "model": os.path.abspath(args.model), "data": os.path.abspath(args.data),
        "runner": "hf_reference (transformers + torch block selection from vllm_flashprefill.patterns)",
        "settings": {"dtype": args.dtype, "attention": "fp32 prefill attention, dense decode (SDPA)",
                     "greedy": True},
        # One entry per invocation that added records (--resume appends).
        "invocations": [*invocations, {
            "started": datetime.datetime.now().isoformat(timespec="seconds"), "argv": sys.argv[1:],
            "prefill_chunk": args.prefill_chunk, "max_new_tokens_cap": args.max_new_tokens,
            "num_samples": args.num_samples, "tasks": args.tasks, "lengths": args.lengths}],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "configs": configs,
        # hf_reference builds its config from the options alone: no FLASHPREFILL_* variables.
        "resolved": {label: provenance.resolved_settings(opts, {})
                     for label, opts in configs.items() if label != suite.DENSE},
        "commit": provenance.git_commit(),
        "source_digest": provenance.source_digest(),
    }
    t_start = time.time()

    def save() -> None:
        meta["invocations"][-1]["wall_s"] = round(time.time() - t_start, 1)
        wall = sum(i.get("wall_s", 0) for i in meta["invocations"])
        files.write_json(path, {**meta, "wall_s": round(wall, 1),
                                   "summary": suite.summarize(records), "records": records})

    # Sample-major, configurations inner: a run cut short still compares every config on the same
    # samples, and covers every task.
    samples.sort(key=lambda s: (s["length"], s["index"], s["task"]))
    todo = [(c, s) for s in samples for c in configs if (c, s["task"], s["length"], s["index"]) not in done]
    print(f"{len(todo)} runs ({len(configs)} configs x {len(samples)} samples, {len(done)} done) -> {path}",
          flush=True)
    for n, (label, s) in enumerate(todo, 1):
        hf_reference.use_flashprefill(model, configs[label])
        hf_reference.STATS.reset()
        ids = tok(s["input"], return_tensors="pt").input_ids
        limit = min(s["max_new_tokens"], args.max_new_tokens or s["max_new_tokens"])
        new, prefill_s, decode_s = generate(model, ids, limit, eos, args.prefill_chunk)
        text = tok.decode(new, skip_special_tokens=True)
        records.append({
            "config": label, "task": s["task"], "length": s["length"], "index": s["index"],
            "prompt_tokens": ids.shape[1], "new_tokens": len(new), "output": text, "refs": s["refs"],
            "score": suite.score(text, s["refs"], s["metric"]),
            "density": hf_reference.STATS.density,
            "prefill_s": round(prefill_s, 2), "decode_s": round(decode_s, 2),
        })
        r = records[-1]
        dens = "" if r["density"] is None else f" density {r['density']:.3f}"
        print(f"[{n}/{len(todo)} {time.time() - t_start:.0f}s] {label} {s['task']}@{s['length']}#{s['index']}: "
              f"score {r['score']:.0f}{dens} prefill {prefill_s:.1f}s decode {decode_s:.1f}s "
              f"({len(new)} tok) {text[:60]!r}", flush=True)
        save()
    save()
    summary = suite.summarize(records)
    print(suite.markdown(summary, list(configs)))
    png = suite.plot(summary, list(configs), path, f"{Path(args.model).name}: FLASHPREFILL patterns vs dense "
                     "(CPU reference, transformers)")
    print(f"wrote {path}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()
