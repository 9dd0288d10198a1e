"""RULER accuracy of FLASHPREFILL patterns against dense FLASH_ATTN, through vLLM ``LLM()`` (GPU).

    python -m benchmarks.accuracy.run_vllm --model .models/smollm2-135m --data .ruler/smollm2-135m \\
        --base '{"min_seq_len": 0}'

Every configuration runs in its own child process (one ``LLM()`` each, so GPU memory is freed and a
crash loses one configuration): ``dense`` is ``attention_backend="FLASH_ATTN"``, every other one
``attention_backend="FLASHPREFILL"`` with ``additional_config={"flashprefill": options}``. Greedy
decoding, RULER's generation lengths, chunked prefill and prefix caching at vLLM's defaults.
``--parallel N`` runs N engines at a time on the same GPU (each gets 1/N of
``--gpu-memory-utilization``) — for small models, whose engine start-up costs more than their
generation. Each (task, length) group is one ``generate()`` call, after which the workers' block
density (``vllm_flashprefill.stats``) is read and reset, so every record carries the density of its
group's sparse prefills. Engines start one after another: the next starts only when the previous one's ``LLM()``
returned, because vLLM's start-up memory profile counts memory that another process allocates
meanwhile as its own (with starts 8 s apart, one of six engines on an H200 failed with "No available
memory for the cache blocks"). An engine given ``kv_cache_memory_bytes`` in ``--engine-args`` sizes its
cache from that instead, so then they all start at once.
Writes ``accuracy-<card>-<date>.json`` under ``--out`` (default ``./bench-out/``; rewritten after every
configuration) and a ``.png`` beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from benchmarks.accuracy import suite
from benchmarks.harness import children, files, provenance

# FLASHPREFILL settings compared by default (--base options go under each).
DEFAULT_CONFIGS = [
    'fp-dense={"pattern": "dense"}',  # the backend's dense path: must match FLASH_ATTN
    "dynamic",
    'dynamic-t0.05={"pattern": "dynamic", "threshold": 0.05}',
    'dynamic-t0.2={"pattern": "dynamic", "threshold": 0.2}',
    "hybrid",
    'hybrid-s8={"pattern": "hybrid", "stride": 8}',
    "local",
    "strided",
]
LOG_RE = re.compile(r"Using \S+ backend|[Cc]annot use \S+ backend|FlashPrefill:|non-default args|Error")


def child(args) -> None:
    """One engine: generate every sample, one JSON line per output."""
    import torch
    import vllm
    from vllm import LLM, SamplingParams

    from vllm_flashprefill.stats import read_selection_stats

    spec = json.loads(args.child)
    samples = [json.loads(line) for line in Path(spec["samples"]).read_text().splitlines()]
    kwargs = {"model": args.model, "max_model_len": spec["max_model_len"], "seed": 0,
              "gpu_memory_utilization": args.gpu_memory_utilization}
    if spec["label"] == suite.DENSE:
        kwargs["attention_backend"] = "FLASH_ATTN"
    else:
        kwargs.update(attention_backend="FLASHPREFILL",
                      additional_config={"flashprefill": spec["options"]})
    kwargs.update(json.loads(args.engine_args))
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    Path(spec["out"] + ".ready").touch()  # the parent may start the next engine
    start_s = time.perf_counter() - t0
    groups: dict[tuple, list[dict]] = {}
    for s in samples:
        groups.setdefault((s["task"], s["length"]), []).append(s)
    outs, densities = [], []
    t0 = time.perf_counter()
    for group in groups.values():
        params = [SamplingParams(temperature=0.0, max_tokens=s["max_new_tokens"]) for s in group]
        outs += llm.generate([s["input"] for s in group], params, use_tqdm=False)
        density = None
        if spec["label"] != suite.DENSE:
            density = llm.collective_rpc(read_selection_stats, kwargs={"reset": True})[0]["density"]
        densities += [density] * len(group)
    samples = [s for group in groups.values() for s in group]
    gen_s = time.perf_counter() - t0
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu-vllm"
    meta = {"card": card, "vllm": vllm.__version__, "torch": torch.__version__, "engine_kwargs": kwargs,
            "engine_start_s": round(start_s, 1), "generate_s": round(gen_s, 1)}
    rows = [{"key": s["key"], "output": o.outputs[0].text, "prompt_tokens": len(o.prompt_token_ids or []),
             "new_tokens": len(o.outputs[0].token_ids), "density": d}
            for s, o, d in zip(samples, outs, densities)]
    Path(spec["out"]).write_text("".join(json.dumps(r) + "\n" for r in [{"meta": meta}, *rows]))


_START_LOCK = threading.Lock()


def run_config(args, label: str, options: dict, samples: list[dict], workdir: Path) -> tuple[dict, list]:
    """Start one child; returns (status, [(sample, output row)])."""
    sample_file, out_file, log_file = (workdir / f"{label}.{x}" for x in ("in.jsonl", "out.jsonl", "log"))
    sample_file.write_text("".join(
        json.dumps({"key": i, "task": s["task"], "length": s["length"], "input": s["input"],
                    "max_new_tokens": s["max_new_tokens"]}) + "\n"
        for i, s in enumerate(samples)))
    spec = {"label": label, "options": options, "samples": str(sample_file), "out": str(out_file),
            "max_model_len": args.max_model_len or max(s["length"] for s in samples)}
    cmd = children.module_command(__spec__.name, "--child", json.dumps(spec), "--model", args.model,
                                  "--engine-args", args.engine_args,
                                  "--gpu-memory-utilization", str(args.gpu_memory_utilization / args.parallel))
    status: dict = {"label": label, "options": options}
    t0 = time.time()
    with open(log_file, "w") as log:
        with _START_LOCK:
            # collective_rpc sends read_selection_stats to the engine process pickled.
            env = children.child_env(VLLM_ALLOW_INSECURE_SERIALIZATION="1")
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=env)
            ready = Path(str(out_file) + ".ready")
            sized = "kv_cache_memory_bytes" in json.loads(args.engine_args)
            while args.parallel > 1 and not sized and not ready.exists() and proc.poll() is None:
                time.sleep(1)
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the child's own session: its engine core goes too
            proc.wait()
            rc = "timeout"
    status.update(rc=rc, wall_s=round(time.time() - t0, 1))
    lines = log_file.read_text(errors="replace").splitlines()
    status["log"] = [ln[-300:] for ln in lines if LOG_RE.search(ln)][:20]
    if rc != 0 or not out_file.exists():
        status["log_tail"] = lines[-40:]
        return status, []
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    status.update(rows[0]["meta"])
    return status, [(samples[r["key"]], r) for r in rows[1:]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF model folder (or hub name, if online)")
    p.add_argument("--data", help="task-set folder from prepare.py (<data>/<length>/<task>/)")
    p.add_argument("--configs", nargs="*", default=DEFAULT_CONFIGS,
                   help="presets (dynamic hybrid local strided) or LABEL=JSON; dense (FLASH_ATTN) always runs")
    p.add_argument("--base", default="{}", help="options (JSON) for every FLASHPREFILL config, "
                   'e.g. \'{"min_seq_len": 0}\' for prompts shorter than the default 8192')
    p.add_argument("--tasks")
    p.add_argument("--lengths")
    p.add_argument("--num-samples", type=int)
    p.add_argument("--max-model-len", type=int, help="default: the longest task length")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--engine-args", default="{}", help="extra LLM() keywords (JSON)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    p.add_argument("--parallel", type=int, default=1, help="engines at a time on the GPU")
    p.add_argument("--out", help=f"results JSON or folder (default ./{files.DEFAULT_OUT_DIR}/)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if not args.data:
        p.error("--data is required")

    configs = suite.parse_configs(args.configs, json.loads(args.base))
    samples = suite.load_tasks(
        args.data, args.tasks.split(",") if args.tasks else None,
        [int(x) for x in args.lengths.split(",")] if args.lengths else None, args.num_samples,
    )
    print(f"{len(configs)} configs x {len(samples)} samples", flush=True)
    records, statuses, path = [], [], None
    workdir = Path(tempfile.mkdtemp(prefix="accuracy-vllm-"))
    meta = {"model": os.path.abspath(args.model) if os.path.exists(args.model) else args.model,
            "data": os.path.abspath(args.data),
            "settings": {"greedy": True, "chunked_prefill": "vLLM default", "prefix_caching": "vLLM default",
                         "base": json.loads(args.base), "engine_args": json.loads(args.engine_args),
                         "num_samples": args.num_samples},
            "commit": provenance.git_commit(),
            "source_digest": provenance.source_digest(),
            "configs": {label: {"backend": "FLASH_ATTN" if label == suite.DENSE else "FLASHPREFILL",
                                "options": None if label == suite.DENSE else opts}
                        for label, opts in configs.items()},
            "resolved": {label: provenance.resolved_settings(opts)  # the engines read FLASHPREFILL_*
                         for label, opts in configs.items() if label != suite.DENSE}}
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        futures = [pool.submit(run_config, args, label, options, samples, workdir)
                   for label, options in configs.items()]
        for future in as_completed(futures):  # results rewritten as each configuration ends
            status, rows = future.result()
            label = status["label"]
            statuses.append(status)
            print(f"{label}: rc={status['rc']} {status['wall_s']}s, {len(rows)} outputs", flush=True)
            for s, r in rows:
                records.append({"config": label, "task": s["task"], "length": s["length"],
                                "index": s["index"], "prompt_tokens": r["prompt_tokens"],
                                "new_tokens": r["new_tokens"], "output": r["output"], "refs": s["refs"],
                                "score": suite.score(r["output"], s["refs"], s["metric"]),
                                "density": r["density"]})
            card = next((st["card"] for st in statuses if st.get("card")), "unknown-gpu")
            path = files.output_path(args.out, "accuracy", card, provenance.utc_date())
            summary = suite.summarize(records)
            files.write_json(path, {"card": card, "date": provenance.utc_date(), **meta,
                                       "runs": statuses, "summary": summary, "records": records})
    statuses.sort(key=lambda st: list(configs).index(st["label"]))
    labels = [s["label"] for s in statuses if s["rc"] == 0]
    print(suite.markdown(summary, labels))
    png = suite.plot(summary, labels, path, f"{Path(args.model).name} on {card}: FLASHPREFILL vs FLASH_ATTN (vLLM)")
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    failed = [s["label"] for s in statuses if s["rc"] != 0]
    if failed:
        print(f"failed: {failed}; logs in {workdir}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
