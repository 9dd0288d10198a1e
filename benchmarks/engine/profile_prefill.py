"""Where the time of one long prefill goes: kernel totals from torch.profiler, engine in-process.

    python -m benchmarks.engine.profile_prefill --model-dir .models/llama8b --prompt-len 131072 \
        --backend FLASHPREFILL --options '{"pattern": "hybrid", "dense_layers": 0}' --out prof.json

Runs the engine in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, eager) so that the profiler
sees the model's kernels; one warm-up prompt, then one profiled prompt (``max_tokens=1``). Writes the
top kernels by total device time, their sum per group (attention / KV-cache write / GEMM / other),
the time of every attention kernel call (one per layer), the wall time of the step, the SM clock
and power draw that ``nvidia-smi`` reports every 100 ms during the profiled prompt (a long prefill
runs at the card's power limit, and its clocks explain the per-call times), and the card,
versions and commit. Without a GPU (smoke runs) CPU times stand in for device times. The weights
are dummy ones (on them ``dynamic`` keeps the same blocks as ``hybrid``; the JSON says so).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import time

from benchmarks.harness import files, provenance

# Every kernel the package launches (tests/test_benchmark_harness.py checks the list against kernels/).
OUR_KERNELS = ("_sparse_prefill_kernel", "_hopper_sparse_prefill_kernel", "_block_scores_kernel",
               "_pool_queries_kernel", "_select_blocks_kernel", "_block_tables_kernel")


def kernel_group(name: str) -> str:
    low = name.lower()
    if "reshape_and_cache" in low:  # vLLM's KV-cache write, the same for every backend
        return "kv_cache_write"
    if name.startswith(OUR_KERNELS) or any(w in low for w in ("flash", "attn", "attention")):
        return "attention"
    if "gemm" in low or "sm90" in low or "cutlass" in low or "nvjet" in low or "matmul" in low:
        return "gemm"
    return "other"


def start_clock_log():
    """``nvidia-smi`` printing "SM MHz, W" every 100 ms for the first visible GPU, or None."""
    if not shutil.which("nvidia-smi"):
        return None
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
    return subprocess.Popen(
        ["nvidia-smi", "-i", gpu, "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
         "-lms", "100"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def stop_clock_log(proc) -> dict | None:
    if proc is None:
        return None
    proc.terminate()
    samples = []
    for line in proc.communicate()[0].splitlines():
        try:
            mhz, watts = (float(x) for x in line.split(","))
        except ValueError:
            continue
        samples.append((mhz, watts))
    if not samples:
        return None
    return {"interval_ms": 100, "sm_mhz": [m for m, _ in samples], "power_w": [w for _, w in samples],
            "sm_mhz_median": statistics.median(m for m, _ in samples),
            "power_w_median": statistics.median(w for _, w in samples)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--prompt-len", type=int, default=131072)
    ap.add_argument("--backend", default="FLASHPREFILL")
    ap.add_argument("--options", type=json.loads, default={}, help="FlashPrefill options (JSON)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default=None, help="results .json, or a folder for profile-<card>-<date>.json "
                    f"(default ./{files.DEFAULT_OUT_DIR}/); the .png goes beside it")
    args = ap.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"  # prompt + room for the output token
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    flashprefill = args.backend == "FLASHPREFILL"
    extra = {"additional_config": {"flashprefill": args.options}} if flashprefill else {}
    llm = LLM(model=args.model_dir, load_format="dummy", attention_backend=args.backend,
              max_model_len=args.prompt_len + 128, max_num_batched_tokens=args.prompt_len + 128,
              enforce_eager=True, enable_prefix_caching=False, gpu_memory_utilization=0.85, **extra)
    params = SamplingParams(max_tokens=1, temperature=0.0)
    with open(os.path.join(args.model_dir, "config.json")) as f:
        vocab_size = json.load(f)["vocab_size"]

    def prompt(seed):
        ids = torch.randint(0, vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(seed))
        return TokensPrompt(prompt_token_ids=ids.tolist())

    llm.generate([prompt(0)], params, use_tqdm=False)
    on_gpu = torch.cuda.is_available()
    activity = torch.profiler.ProfilerActivity.CUDA if on_gpu else torch.profiler.ProfilerActivity.CPU
    clock_log = start_clock_log()
    with torch.profiler.profile(activities=[activity]) as prof:
        t0 = time.perf_counter()
        llm.generate([prompt(1)], params, use_tqdm=False)
        wall = time.perf_counter() - t0
    clocks = stop_clock_log(clock_log)

    def busy_us(e):
        return e.device_time_total if on_gpu else e.self_cpu_time_total

    events = sorted((e for e in prof.key_averages() if busy_us(e) > 0), key=lambda e: -busy_us(e))
    groups: dict[str, float] = {}
    for e in events:
        g = kernel_group(e.key)
        groups[g] = groups.get(g, 0.0) + busy_us(e) / 1e6
    # Per-call times of the attention kernels: a trend or spread across layers points at clocks,
    # a uniform excess at the kernel itself.
    per_call: dict[str, list[float]] = {}
    for e in prof.events():
        on_device = e.device_type == torch.autograd.DeviceType.CUDA or not on_gpu
        if on_device and kernel_group(e.name) == "attention":
            per_call.setdefault(e.name[:160], []).append(round(e.time_range.elapsed_us() / 1e3, 3))
    result = {
        **provenance.record(torch.cuda.get_device_name() if on_gpu else "cpu"),
        "vllm": vllm.__version__, "torch": torch.__version__,
        "model_dir": args.model_dir, **provenance.weights_record("dummy"), "enforce_eager": True,
        "backend": args.backend, "options": args.options if flashprefill else None,
        "prompt_len": args.prompt_len, "kv_page_size": llm.llm_engine.vllm_config.cache_config.block_size,
        "wall_s": wall, "busy_s_by_group": groups,
        "kernels": [{"name": e.key[:160], "calls": e.count, "busy_s": busy_us(e) / 1e6}
                    for e in events[: args.top]],
        "attention_call_ms": per_call,
        "clocks": clocks,
    }
    files.write_result(args.out, "profile", result)
    print(f"NOTE: {provenance.DUMMY_WEIGHTS_NOTE}")
    summary = ("card", "backend", "kv_page_size", "wall_s", "busy_s_by_group")
    print(json.dumps({k: result[k] for k in summary}, indent=1))
    if clocks:
        print(f"SM clock median {clocks['sm_mhz_median']:.0f} MHz, power median {clocks['power_w_median']:.0f} W "
              f"over {len(clocks['sm_mhz'])} samples")
    for name, ms in per_call.items():
        print(f"{name[:60]}: {len(ms)} calls, median {statistics.median(ms):.2f} ms, "
              f"min {min(ms):.2f}, max {max(ms):.2f}")
    for k in result["kernels"]:
        print(f"{k['busy_s']:8.3f} s {k['calls']:6d}  {k['name'][:110]}")


if __name__ == "__main__":
    main()
