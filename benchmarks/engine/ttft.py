#!/usr/bin/env python3
"""TTFT (and decode ITL) of FLASHPREFILL vs FLASH_ATTN: one prompt at a time, same run, same card.

Each backend configuration gets its own ``LLM()`` in its own child process (this script re-invoked
with ``--worker``), so GPU memory is freed between engines and a crash or a timeout in one
configuration loses only that configuration. The parent collects the children's JSON-lines events,
rewrites the results JSON after every row, and at the end writes a PNG and prints markdown tables.

Per configuration (child process):
  * ``LLM(model_dir, load_format="dummy", max_model_len = max prompt + 128,
    max_num_batched_tokens = max_model_len`` (a prompt is one chunk), ``enable_prefix_caching=False,
    attention_backend=..., additional_config={"flashprefill": {...}})``;
  * one global warmup, then per length: ``--warmup`` untimed runs and ``--runs`` timed runs, more
    (up to ``--max-runs``) until the timed runs add up to ``--min-timed-s`` (a 4K prompt takes
    0.1 s on an H200 and its median of 3 moved by ~4% between runs, more than the 0.98x target
    allows; 131K prompts stay at ``--runs``); each run is a fresh random token-id prompt (the same
    sequence of prompts for every configuration), and TTFT = wall time of ``llm.generate([prompt], max_tokens=1)``;
    FLASHPREFILL rows also carry the density of their timed runs' sparse layer calls;
  * decode ITL: ``--itl-runs`` prompts of ``--itl-prompt-len`` tokens with ``--itl-tokens`` + 1 new
    tokens; ITL = (last_token_ts - first_token_ts) / itl_tokens from the engine-core timestamps in
    ``RequestOutput.metrics`` (vLLM's own ITL clock), with a wall-clock estimate
    ((generate wall time - TTFT median at that length) / itl_tokens) kept beside it.

Examples, from the repository root (``python -m benchmarks.harness.tiny_model`` writes model folders):
    python -m benchmarks.engine.ttft --model-dir .models/llama8b --out "$OUT"
    python -m benchmarks.engine.ttft --model-dir .models/llama8b --lengths 8192,32768 --runs 2 \\
        --configs FLASH_ATTN FLASHPREFILL:hybrid
The weights are dummy ones unless ``--load-format`` says otherwise; on them ``dynamic`` keeps the
same blocks as ``hybrid`` (the output JSON says so in ``dummy_weights_note``).
Configurations (``--configs``): a vLLM backend name (``FLASH_ATTN``, ``TRITON_ATTN``, ...),
``FLASHPREFILL`` (package defaults), ``FLASHPREFILL:<pattern>`` or ``FLASHPREFILL:<json options>``
such as ``'FLASHPREFILL:{"pattern":"hybrid","stride":8}'``; a bare pattern name (``hybrid``) means
``FLASHPREFILL:hybrid``. ``LABEL=SPEC`` names a configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from typing import Any

from benchmarks.harness import children, files, plots, provenance
from benchmarks.harness.report import Progress, markdown_table, median

PATTERNS = ("dense", "local", "strided", "hybrid", "dynamic")
DEFAULT_CONFIGS = ["FLASH_ATTN", "FLASHPREFILL:hybrid", "FLASHPREFILL:dynamic"]
DEFAULT_LENGTHS = "4096,8192,32768,65536,131072"
BASELINE = "FLASH_ATTN"
HEADROOM = 128  # max_model_len = max prompt + HEADROOM

# (config pattern, prompt_len or "itl", minimum speedup over the baseline) — the targets.
TARGETS = [
    ("hybrid", 131072, 2.7), ("dynamic", 131072, 2.5),
    ("hybrid", 32768, 1.4), ("dynamic", 32768, 1.4),
    ("hybrid", 8192, 0.98), ("dynamic", 8192, 0.98),
    ("hybrid", 4096, 0.98), ("dynamic", 4096, 0.98),
    ("hybrid", "itl", 0.98), ("dynamic", "itl", 0.98),
]


# ----------------------------------------------------------------------------------------------
# configurations
# ----------------------------------------------------------------------------------------------

def parse_config(spec: str) -> dict[str, Any]:
    """``[LABEL=]BACKEND[:pattern|:{json}]`` -> {label, backend, pattern, options}."""
    label = None
    if "=" in spec.split(":", 1)[0].split("{", 1)[0]:
        label, spec = spec.split("=", 1)
    if spec.lower() in PATTERNS:
        spec = f"FLASHPREFILL:{spec.lower()}"
    backend, _, rest = spec.partition(":")
    backend = backend.strip().upper()
    if not backend:
        raise argparse.ArgumentTypeError(f"bad config {spec!r}")
    options: dict[str, Any] | None = None
    if backend == "FLASHPREFILL":
        rest = rest.strip()
        if not rest:
            options = {}
        elif rest.startswith("{"):
            try:
                options = json.loads(rest)
            except json.JSONDecodeError as e:
                raise argparse.ArgumentTypeError(f"bad JSON in config {spec!r}: {e}") from None
            if not isinstance(options, dict):
                raise argparse.ArgumentTypeError(f"config {spec!r}: options must be an object")
        else:
            options = {"pattern": rest.lower()}
    elif rest:
        raise argparse.ArgumentTypeError(
            f"config {spec!r}: only FLASHPREFILL takes options (got {rest!r})")
    pattern = None
    if options is not None:
        try:  # a typo must stop the run here, not after the baseline's engines have run
            pattern = provenance.resolved_settings(options)["pattern"]
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"config {spec!r}: {e}") from None
    if label is None:
        label = backend if options is None else (
            f"FLASHPREFILL:{pattern}" if set(options) <= {"pattern"} else
            f"FLASHPREFILL:{json.dumps(options, sort_keys=True, separators=(',', ':'))}")
    return {"label": label, "backend": backend, "pattern": pattern, "options": options}


def parse_lengths(text: str) -> list[int]:
    out = []
    for tok in text.replace(" ", "").split(","):
        if not tok:
            continue
        mult = 1
        if tok[-1] in "kK":
            mult, tok = 1024, tok[:-1]
        out.append(int(tok) * mult)
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"bad --lengths {text!r}")
    return sorted(set(out))


def parse_engine_args(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; VALUE is JSON if it parses (``true``, ``8``, ``{...}``), else a string."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--engine-arg {item!r}: expected KEY=VALUE")
        try:
            out[key.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip().replace("-", "_")] = value
    return out


def model_max_positions(model_dir: str) -> tuple[int | None, int | None]:
    """(max_position_embeddings, vocab_size) from the model dir's config.json, if readable."""
    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
        cfg = cfg.get("text_config", cfg)
        return cfg.get("max_position_embeddings"), cfg.get("vocab_size")
    except (OSError, ValueError):
        return None, None


def engine_limits(args) -> tuple[int, bool]:
    """max_model_len for every engine, and whether VLLM_ALLOW_LONG_MAX_MODEL_LEN is needed."""
    need = max(args.lengths) + 1
    if args.itl_prompt_len:
        need = max(need, args.itl_prompt_len + args.itl_tokens + 1)
    max_model_len = max(need, max(args.lengths)) + HEADROOM
    max_pos, _ = model_max_positions(args.model_dir)
    if args.itl_prompt_len and max_pos and args.itl_prompt_len + args.itl_tokens + 1 > max_pos:
        raise SystemExit(
            f"--itl-prompt-len {args.itl_prompt_len} + {args.itl_tokens + 1} new tokens runs past "
            f"the model's {max_pos} positions")
    # A prompt of exactly max_position_embeddings tokens with max_tokens=1 uses positions
    # 0..max_pos-1 only, but vLLM wants max_model_len > prompt: allow the longer setting then.
    return max_model_len, bool(max_pos and max_model_len > max_pos)


# ----------------------------------------------------------------------------------------------
# worker (one engine, one configuration)
# ----------------------------------------------------------------------------------------------

class Events:
    def __init__(self, path: str):
        self.f = open(path, "a", encoding="utf-8")

    def emit(self, kind: str, **data: Any) -> None:
        self.f.write(json.dumps({"event": kind, "t": time.time(), **data}, default=str) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())


def random_prompt(length: int, vocab: int, seed: int) -> dict[str, list[int]]:
    import numpy as np

    ids = np.random.default_rng(seed).integers(3, vocab, size=length, dtype=np.int64)
    return {"prompt_token_ids": ids.tolist()}


def prompt_seed(base: int, length: int, index: int) -> int:
    return (base * 1_000_003 + length * 1009 + index) % (2**63)


def worker_main(args) -> int:
    ev = Events(args.events)
    cfg = json.loads(args.worker_config)
    try:
        return _worker(args, cfg, ev)
    except BaseException as e:  # noqa: BLE001
        ev.emit("error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-6000:])
        raise


def _worker(args, cfg: dict[str, Any], ev: Events) -> int:
    # No CUDA call here before LLM(): the card name comes from the parent's probe, and vLLM keeps
    # its default (fork) start method for the engine core.
    import torch
    import vllm
    from vllm import LLM, SamplingParams

    ev.emit("meta", vllm_version=getattr(vllm, "__version__", None),
            torch_version=torch.__version__, pid=os.getpid())

    max_model_len, _ = engine_limits(args)
    _, vocab = model_max_positions(args.model_dir)
    vocab = int(vocab or 32000)
    kwargs: dict[str, Any] = dict(
        model=args.model_dir,
        load_format=args.load_format,
        max_model_len=max_model_len,
        max_num_batched_tokens=max_model_len,
        enable_prefix_caching=False,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_seqs=args.max_num_seqs,
        seed=0,
        disable_log_stats=False,  # RequestOutput.metrics (engine timestamps) needs stats on
    )
    if cfg["backend"] != "AUTO":
        kwargs["attention_backend"] = cfg["backend"]
    if cfg["options"] is not None:
        kwargs["additional_config"] = {"flashprefill": cfg["options"]}
    kwargs.update(parse_engine_args(args.engine_arg))
    ev.emit("engine_start", engine_kwargs=kwargs)
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    ev.emit("engine_ready", engine_start_s=time.perf_counter() - t0)

    def sparse_density() -> dict[str, Any]:
        """Kept / causal blocks of the sparse layer calls since the last read (FLASHPREFILL only;
        reading waits for the GPU, so it runs between timed runs, never inside one)."""
        if cfg["backend"] != "FLASHPREFILL":
            return {}
        from vllm_flashprefill.stats import read_selection_stats

        try:
            stats = llm.collective_rpc(read_selection_stats, kwargs={"reset": True})[0]
        except Exception as e:  # noqa: BLE001  (a failed read must not cost the timings)
            return {"density_error": f"{type(e).__name__}: {e}"}
        return {"density": stats["density"], "sparse_layer_calls": stats["layer_calls"]}

    def run_once(length: int, seed: int, max_tokens: int):
        sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                            detokenize=False)
        prompt = random_prompt(length, vocab, seed)
        t = time.perf_counter()
        outs = llm.generate([prompt], sp, use_tqdm=False)
        wall = time.perf_counter() - t
        out = outs[0]
        n_new = len(out.outputs[0].token_ids)
        if n_new != max_tokens:
            raise RuntimeError(f"prompt {length}: got {n_new} new tokens, wanted {max_tokens}")
        if len(out.prompt_token_ids or []) != length:
            raise RuntimeError(f"prompt {length}: engine saw {len(out.prompt_token_ids or [])}")
        return wall, getattr(out, "metrics", None)

    # global warmup: a short prompt with a few decode steps
    run_once(min(128, min(args.lengths)), prompt_seed(args.seed, 0, 999), 4)
    ev.emit("warmup_done")

    ttft_median: dict[int, float] = {}
    lengths = list(args.lengths)
    if args.itl_prompt_len and args.itl_prompt_len not in lengths and args.itl_wall_estimate:
        lengths.append(args.itl_prompt_len)  # the wall-clock ITL estimate needs its TTFT
    for length in lengths:
        for w in range(args.warmup):
            run_once(length, prompt_seed(args.seed, length, 500 + w), 1)
        sparse_density()  # the timed runs' counts start here
        walls, engine = [], []
        i = 0
        while i < args.runs or (sum(walls) < args.min_timed_s and i < args.max_runs):
            wall, m = run_once(length, prompt_seed(args.seed, length, i), 1)
            i += 1
            walls.append(wall)
            lat = getattr(m, "first_token_latency", None) if m is not None else None
            engine.append(lat if lat else None)
        ttft_median[length] = median(walls)
        ev.emit("row", row={
            "config": cfg["label"], "backend": cfg["backend"], "pattern": cfg["pattern"],
            "options": cfg["options"], "metric": "ttft", "prompt_len": length,
            "ttft_s": ttft_median[length], "runs": walls,
            "ttft_engine_s": median([e for e in engine if e is not None]),
            "engine_runs": engine, "extra_length": length not in args.lengths, **sparse_density(),
        })

    if args.itl_prompt_len:
        L, n = args.itl_prompt_len, args.itl_tokens
        itl_engine, itl_wall, walls = [], [], []
        for i in range(args.itl_runs):
            wall, m = run_once(L, prompt_seed(args.seed, L, 100 + i), n + 1)
            walls.append(wall)
            first = getattr(m, "first_token_ts", 0.0) if m is not None else 0.0
            last = getattr(m, "last_token_ts", 0.0) if m is not None else 0.0
            ngen = getattr(m, "num_generation_tokens", 0) if m is not None else 0
            itl_engine.append((last - first) / (ngen - 1) * 1e3
                              if first and last > first and ngen > 1 else None)
            if L in ttft_median:
                itl_wall.append((wall - ttft_median[L]) / n * 1e3)
        engine_ok = [v for v in itl_engine if v is not None]
        use_engine = len(engine_ok) == len(itl_engine) and engine_ok
        ev.emit("row", row={
            "config": cfg["label"], "backend": cfg["backend"], "pattern": cfg["pattern"],
            "options": cfg["options"], "metric": "itl", "prompt_len": L, "new_tokens": n + 1,
            "itl_ms": median(engine_ok if use_engine else itl_wall),
            "itl_source": "engine_timestamps" if use_engine else "wall",
            "runs": itl_engine if use_engine else itl_wall,
            "itl_ms_wall": median(itl_wall), "runs_wall": itl_wall,
            "generate_wall_s": walls,
        })
    ev.emit("done")
    return 0


# ----------------------------------------------------------------------------------------------
# parent
# ----------------------------------------------------------------------------------------------

def run_config(args, cfg, log_path, events_path, state, pbar) -> dict[str, Any]:
    """Run one configuration in a child; feed rows into ``state`` as they arrive."""
    max_model_len, allow_long = engine_limits(args)
    env = children.child_env()
    if allow_long:
        env["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
    if cfg["backend"] == "FLASHPREFILL":
        env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc sends read_selection_stats pickled
    cmd = children.module_command(__spec__.name, "--worker",
           "--worker-config", json.dumps(cfg), "--events", events_path,
           "--model-dir", args.model_dir, "--lengths", ",".join(map(str, args.lengths)),
           "--runs", str(args.runs), "--min-timed-s", str(args.min_timed_s), "--max-runs", str(args.max_runs),
           "--warmup", str(args.warmup),
           "--itl-prompt-len", str(args.itl_prompt_len), "--itl-tokens", str(args.itl_tokens),
           "--itl-runs", str(args.itl_runs), "--seed", str(args.seed),
           "--gpu-memory-utilization", str(args.gpu_memory_utilization),
           "--max-num-seqs", str(args.max_num_seqs), "--load-format", args.load_format)
    if not args.itl_wall_estimate:
        cmd.append("--no-itl-wall-estimate")
    for item in args.engine_arg or []:
        cmd += ["--engine-arg", item]

    with open(log_path, "ab") as logf:
        header = (f"\n===== {provenance.utc_timestamp()} config {cfg['label']} "
                  f"(max_model_len {max_model_len}) =====\n$ {' '.join(cmd)}\n")
        logf.write(header.encode())
        logf.flush()
        log_start = logf.tell()
        open(events_path, "w").close()
        status: dict[str, Any] = {"config": cfg["label"], "backend": cfg["backend"],
                                  "pattern": cfg["pattern"], "options": cfg["options"],
                                  "resolved": provenance.resolved_settings(cfg["options"]),
                                  "status": "running", "max_model_len": max_model_len,
                                  "lengths": args.lengths, "runs": args.runs,
                                  "warmup": args.warmup, "engine_args": parse_engine_args(
                                      args.engine_arg),
                                  "allow_long_max_model_len": allow_long}
        state["configs"].append(status)
        t0 = time.time()
        limit = args.timeout
        if args.budget:
            # keep ~25 s for stopping the engine, the PNG and the tables
            limit = max(1.0, min(limit, args.budget - (t0 - args.t_start) - 25.0))
        status["timeout_s"] = round(limit, 1)
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        status["pid"] = proc.pid
        pos = 0
        expected = len(args.lengths) + (1 if args.itl_prompt_len else 0)
        seen = 0

        def drain() -> None:
            nonlocal pos, seen
            with open(events_path, encoding="utf-8") as f:
                f.seek(pos)
                while True:
                    line = f.readline()
                    if not line or not line.endswith("\n"):
                        break
                    pos = f.tell()
                    ev = json.loads(line)
                    kind = ev["event"]
                    if kind == "meta":
                        for k in ("vllm_version", "torch_version"):
                            if ev.get(k):
                                state[k] = ev[k]
                    elif kind == "engine_start":
                        status["engine_kwargs"] = ev.get("engine_kwargs")
                    elif kind == "engine_ready":
                        status["engine_start_s"] = round(ev["engine_start_s"], 2)
                        pbar.write(f"[{cfg['label']}] engine up in {ev['engine_start_s']:.1f} s")
                    elif kind == "row":
                        row = ev["row"]
                        state["rows"].append(row)
                        if not row.get("extra_length"):
                            seen += 1
                            pbar.update(1)
                        if row["metric"] == "ttft":
                            pbar.write(f"[{cfg['label']}] {row['prompt_len']:>7} tokens: TTFT "
                                       f"{row['ttft_s']:.4f} s  runs "
                                       f"{', '.join(f'{v:.4f}' for v in row['runs'])}")
                        else:
                            pbar.write(f"[{cfg['label']}] ITL at {row['prompt_len']} tokens: "
                                       f"{row['itl_ms']:.3f} ms ({row['itl_source']}; wall est. "
                                       f"{_fmt(row.get('itl_ms_wall'), '.3f')} ms)")
                        save(args, state)
                    elif kind == "error":
                        status["error"] = ev.get("error")
                        status["traceback"] = ev.get("traceback")
                    elif kind == "done":
                        status["status"] = "ok"

        try:
            while True:
                drain()
                if proc.poll() is not None:
                    break
                if time.time() - t0 > limit:
                    status["status"] = "timeout"
                    pbar.write(f"[{cfg['label']}] timed out after {limit:.0f} s; stopping it")
                    break
                time.sleep(0.5)
        finally:
            # the child may still be tearing down its engine after "done": give it a moment
            if proc.poll() is None and status["status"] == "ok":
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    pass
            rc = children.kill_process_group(
                proc, signal.SIGINT, grace_s=15 if status["status"] == "ok" else 5)
            drain()
        status["returncode"] = rc
        status["wall_s"] = round(time.time() - t0, 1)
        if status["status"] == "running":
            status["status"] = "failed"
        pbar.update(max(0, expected - seen))
    status["backend_log"] = files.grep_file(log_path, children.BACKEND_LOG_RE, start=log_start)
    status["attention_backend_used"] = children.backend_from_log(status["backend_log"])
    if status["attention_backend_used"] != cfg["backend"]:
        pbar.write(f"[{cfg['label']}] WARNING: engine log shows attention backend "
                   f"{status['attention_backend_used']!r}, not {cfg['backend']!r}")
    if status["status"] != "ok":
        tail = files.tail_text(log_path, 3000, start=log_start)
        status["log_tail"] = tail
        pbar.write(f"[{cfg['label']}] {status['status'].upper()} (rc {rc}); log tail:\n{tail}")
    save(args, state)
    return status


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def save(args, state: dict[str, Any]) -> None:
    state["updated"] = provenance.utc_timestamp()
    files.write_json(args.out_json, state)


def ttft_table(state: dict[str, Any], labels: list[str], baseline: str) -> str:
    ttft_rows = [r for r in state["rows"] if r["metric"] == "ttft" and not r.get("extra_length")]
    by = {(r["config"], r["prompt_len"]): r for r in ttft_rows}
    lengths = sorted({r["prompt_len"] for r in ttft_rows})
    headers = ["prompt_len"] + [f"{lab} s" + ("" if lab == baseline else " (x)") for lab in labels]
    rows = []
    for L in lengths:
        base = by.get((baseline, L))
        line: list[Any] = [L]
        for lab in labels:
            r = by.get((lab, L))
            if r is None or r["ttft_s"] is None:
                line.append("-")
            elif lab == baseline or base is None:
                line.append(f"{r['ttft_s']:.4f}")
            else:
                density = f", density {r['density']:.3f}" if r.get("density") is not None else ""
                line.append(f"{r['ttft_s']:.4f} ({base['ttft_s'] / r['ttft_s']:.2f}x{density})")
        rows.append(line)
    return markdown_table(headers, rows)


def itl_table(state: dict[str, Any], labels: list[str], baseline: str) -> str:
    by = {r["config"]: r for r in state["rows"] if r["metric"] == "itl"}
    if not by:
        return ""
    base = by.get(baseline)
    rows = []
    for lab in labels:
        r = by.get(lab)
        if r is None:
            continue
        ratio = (f"{base['itl_ms'] / r['itl_ms']:.3f}x"
                 if base and r["itl_ms"] and base["itl_ms"] and lab != baseline else "")
        rows.append([lab, r["prompt_len"], _fmt(r["itl_ms"], ".3f"), r["itl_source"],
                     _fmt(r.get("itl_ms_wall"), ".3f"), ratio])
    return markdown_table(
        ["config", "prompt_len", "ITL ms (median)", "source", "wall est. ms",
         f"speed vs {baseline} ({baseline} ITL / ITL)"], rows)


def check_targets(state: dict[str, Any], cfgs: list[dict[str, Any]], baseline: str):
    ttft = {(r["config"], r["prompt_len"]): r["ttft_s"] for r in state["rows"]
            if r["metric"] == "ttft" and r["ttft_s"]}
    itl = {r["config"]: r["itl_ms"] for r in state["rows"] if r["metric"] == "itl" and r["itl_ms"]}
    results = []
    for cfg in cfgs:
        if cfg["backend"] != "FLASHPREFILL" or cfg["label"] == baseline:
            continue
        for pattern, where, need in TARGETS:
            if cfg["pattern"] != pattern:
                continue
            if where == "itl":
                b, v = itl.get(baseline), itl.get(cfg["label"])
            else:
                b, v = ttft.get((baseline, where)), ttft.get((cfg["label"], where))
            if not b or not v:
                continue
            got = b / v
            results.append({"config": cfg["label"], "at": where, "need_x": need,
                            "got_x": round(got, 3), "pass": got >= need})
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True, help="model folder (e.g. from mkmodel.py llama8b)")
    p.add_argument("--lengths", type=parse_lengths, default=parse_lengths(DEFAULT_LENGTHS),
                   help=f"prompt lengths, comma-separated, 'k' = 1024 (default {DEFAULT_LENGTHS})")
    p.add_argument("--runs", type=int, default=3, help="timed runs per length at least (median reported)")
    p.add_argument("--min-timed-s", type=float, default=2.0,
                   help="keep timing a length past --runs until its timed runs add up to this (0: off)")
    p.add_argument("--max-runs", type=int, default=25, help="timed runs per length at most")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per length")
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                   help=f"configurations, see above (default: {' '.join(DEFAULT_CONFIGS)})")
    p.add_argument("--baseline", default=BASELINE, help="config label speedups are relative to")
    p.add_argument("--itl-prompt-len", type=int, default=8192, help="ITL prompt length (0: no ITL)")
    p.add_argument("--itl-tokens", type=int, default=128, help="decode steps timed for ITL")
    p.add_argument("--itl-runs", type=int, default=3)
    p.add_argument("--no-itl-wall-estimate", dest="itl_wall_estimate", action="store_false",
                   help="don't add a TTFT row at --itl-prompt-len when it is not in --lengths")
    p.add_argument("--out", default=None,
                   help="results .json path, or a folder for ttft-<card>-<date>.json "
                        f"(default ./{files.DEFAULT_OUT_DIR}/); the .png and .log go beside it")
    p.add_argument("--timeout", type=float, default=420.0,
                   help="seconds per configuration, engine start included (default 420)")
    p.add_argument("--budget", type=float, default=0.0,
                   help="seconds for the whole script (0: none); later configurations get what "
                        "is left, so the tables and PNG are still written (e.g. 570 under a "
                        "600 s limit)")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of other configurations already in the --out JSON (same "
                        "card and model), so one table can be built over several invocations")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--seed", type=int, default=1234, help="seed of the random prompts")
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra LLM() keyword (VALUE parsed as JSON if possible), repeatable, "
                        "e.g. enforce_eager=true")
    # worker-only
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-config", help=argparse.SUPPRESS)
    p.add_argument("--events", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.max_runs < args.runs:
        p.error(f"--max-runs {args.max_runs} is below --runs {args.runs}")

    if args.worker:
        return worker_main(args)

    try:
        cfgs = [parse_config(s) for s in args.configs]
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    labels = [c["label"] for c in cfgs]
    if len(set(labels)) != len(labels):
        p.error(f"duplicate configuration labels: {labels}")
    args.model_dir = os.path.abspath(args.model_dir)
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        p.error(f"--model-dir {args.model_dir}: no config.json")
    engine_limits(args)  # fail early on impossible lengths

    args.t_start = time.time()
    env = provenance.probe_environment()
    card = env["card"] if env["card"] != "unknown" else None
    date = provenance.utc_date()
    args.out_json = str(files.output_path(args.out, "ttft", card, date))
    base_path = args.out_json[: -len(".json")]
    out_png, log_path = base_path + ".png", base_path + ".log"
    events_path = base_path + ".events.jsonl"
    max_model_len, allow_long = engine_limits(args)
    state: dict[str, Any] = {
        **provenance.engine_record(env, args.model_dir, args.load_format),
        "settings": {
            "lengths": args.lengths, "runs": args.runs, "min_timed_s": args.min_timed_s,
            "max_runs": args.max_runs, "warmup": args.warmup,
            "itl_prompt_len": args.itl_prompt_len, "itl_tokens": args.itl_tokens,
            "itl_runs": args.itl_runs, "max_model_len": max_model_len,
            "max_num_batched_tokens": max_model_len, "enable_prefix_caching": False,
            "gpu_memory_utilization": args.gpu_memory_utilization,
            "max_num_seqs": args.max_num_seqs, "seed": args.seed,
            "engine_args": parse_engine_args(args.engine_arg),
            "allow_long_max_model_len": allow_long,
            "ttft": "wall time of LLM.generate([one prompt], max_tokens=1), median of runs",
            "itl": "(last_token_ts - first_token_ts)/(n-1) from RequestOutput.metrics",
            "flashprefill_env": {k: v for k, v in os.environ.items()
                                 if k.startswith("FLASHPREFILL_")},
        },
        "baseline": args.baseline,
        "configs": [],
        "rows": [],
    }
    prev_cfgs: list[dict[str, Any]] = []
    if args.merge and os.path.isfile(args.out_json):
        with open(args.out_json, encoding="utf-8") as f:
            prev = json.load(f)
        if prev.get("card") != state["card"] or prev.get("model") != state["model"]:
            raise SystemExit(f"--merge: {args.out_json} is for card {prev.get('card')!r}, model "
                             f"{prev.get('model')!r}; this run is {state['card']!r}, "
                             f"{state['model']!r}. Use another --out.")
        keep = [c for c in prev.get("configs", []) if c.get("config") not in labels]
        kept = {c["config"] for c in keep}
        state["configs"] = keep
        state["rows"] = [r for r in prev.get("rows", []) if r.get("config") in kept]
        state["merged_from_earlier_runs"] = sorted(kept)
        prev_cfgs = [{"label": c["config"], "backend": c["backend"], "pattern": c.get("pattern"),
                      "options": c.get("options")} for c in keep]
        print(f"--merge: keeping {sorted(kept)} from {args.out_json}", flush=True)
    save(args, state)
    if not args.merge:
        open(log_path, "w").close()  # one log per invocation
    if state["dummy_weights"]:
        print(f"NOTE: {provenance.DUMMY_WEIGHTS_NOTE}", flush=True)
    print(f"results -> {args.out_json}\nengine logs -> {log_path}\ncard {state['card']}, "
          f"vLLM {state['vllm_version']}, configs {labels}, lengths {args.lengths}, "
          f"runs {args.runs}", flush=True)

    total = len(cfgs) * (len(args.lengths) + (1 if args.itl_prompt_len else 0))
    t_start = args.t_start
    interrupted = False
    with Progress(total, "ttft") as pbar, children.sigterm_raises_stop():
        try:
            for cfg in cfgs:
                if args.budget and time.time() - t_start > args.budget - 60:
                    pbar.write(f"[{cfg['label']}] skipped: under 60 s of --budget left")
                    state["configs"].append({"config": cfg["label"], "backend": cfg["backend"],
                                             "pattern": cfg["pattern"], "status": "skipped"})
                    continue
                pbar.set_postfix_str(cfg["label"])
                run_config(args, cfg, log_path, events_path, state, pbar)
        except (KeyboardInterrupt, children.Stop) as e:
            interrupted = True
            pbar.write(f"interrupted ({e!r}); writing partial results")
            for c in state["configs"]:
                if c["status"] == "running":
                    c["status"] = "interrupted"
    state["total_wall_s"] = round(time.time() - t_start, 1)
    # tables and targets cover the merged configurations too (earlier ones first)
    cfgs = prev_cfgs + cfgs
    labels = [c["label"] for c in cfgs]
    state["targets"] = check_targets(state, cfgs, args.baseline)
    save(args, state)
    try:
        os.remove(events_path)
    except OSError:
        pass
    png = None
    try:
        png = plots.plot_ttft(
            [r for r in state["rows"] if r["metric"] == "ttft" and not r.get("extra_length")],
            args.baseline, out_png,
            title=f"{state['model']} ({args.load_format}) on {state['card']}, "
                  f"vLLM {state['vllm_version']}, {date}")
    except Exception as e:  # noqa: BLE001
        print(f"[plot] failed: {e!r}", file=sys.stderr)

    print()
    print(f"## TTFT, {state['model']} ({args.load_format}), {state['card']}, vLLM "
          f"{state['vllm_version']}, median of >= {args.runs} runs (>= {args.min_timed_s:g} s per length)")
    print(ttft_table(state, labels, args.baseline))
    if state["dummy_weights"]:
        print(f"NOTE: {provenance.DUMMY_WEIGHTS_NOTE}")
    t = itl_table(state, labels, args.baseline)
    if t:
        print(f"\n## Decode ITL ({args.itl_tokens} steps after a {args.itl_prompt_len}-token "
              f"prompt, median of {args.itl_runs})")
        print(t)
    if state["targets"]:
        print("\n## Targets (speedup vs " + args.baseline + ")")
        print(markdown_table(
            ["config", "at", "need", "got", ""],
            [[r["config"], r["at"], f">= {r['need_x']}x", f"{r['got_x']:.2f}x",
              "PASS" if r["pass"] else "FAIL"] for r in state["targets"]]))
    print("\n## Engines")
    print(markdown_table(
        ["config", "status", "engine start s", "wall s", "attention backend (engine log)"],
        [[c["config"], c["status"], c.get("engine_start_s", "-"), c.get("wall_s", "-"),
          c.get("attention_backend_used") or "?"] for c in state["configs"]]))
    print(f"\nwrote {args.out_json}" + (f" and {png}" if png else "") + f"; logs {log_path}; "
          f"total {state['total_wall_s']} s")
    this_run = set(labels[len(prev_cfgs):])
    mine = [c for c in state["configs"] if c["config"] in this_run]
    bad = interrupted or any(c["status"] != "ok" for c in mine) or len(mine) != len(this_run)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
