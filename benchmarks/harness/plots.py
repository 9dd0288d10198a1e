"""PNG plots of result files. Every benchmark draws its own PNG beside its JSON;

    python -m benchmarks.harness.plots RESULT.json...

redraws them (ttft, kernels, serve_bench, profile_prefill, tune_attention, attention_kernels,
selection and experiments/fa3_virtual_table results, recognised by their keys).
matplotlib is imported when drawing, and is optional: without it no PNG is written, with a note.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from benchmarks.harness.report import median


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
    plt = pyplot()
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


def pyplot():
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
    plt = pyplot() if panels else None
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


BASELINE_STYLE = {"fa3": dict(color="black", linewidth=2.2),
                  "triton_unified": dict(color="gray", linewidth=2.2),
                  "sdpa_cudnn": dict(color="black", linewidth=1.2, linestyle=":"),
                  "sdpa_flash": dict(color="gray", linewidth=1.2, linestyle=":")}


def kernel_series(row: dict[str, Any]) -> str:
    """A row of ops/kernels.py: the baseline's name, or ``flashprefill/<pattern>``."""
    return row["kernel"] if row["kernel"] != "flashprefill" else f"flashprefill/{row['pattern']}"


def plot_kernels(result: dict[str, Any], path: str) -> str | None:
    """ops/kernels.py: time vs prompt length per (kernel, pattern), one log-log panel per head
    configuration (dynamic also with selection included)."""
    rows = result["rows"]
    heads = sorted({(r["num_q_heads"], r["num_kv_heads"], r["head_dim"]) for r in rows}, reverse=True)
    plt = pyplot() if heads else None
    if plt is None:
        return None
    import matplotlib.ticker

    fig, axes = plt.subplots(1, len(heads), figsize=(6.5 * len(heads), 5), squeeze=False)
    for ax, (hq, hkv, d) in zip(axes[0], heads):
        mine = [r for r in rows if (r["num_q_heads"], r["num_kv_heads"], r["head_dim"]) == (hq, hkv, d)]
        for label in sorted({kernel_series(r) for r in mine}):
            pts = sorted(((r["seq_len"], r) for r in mine if kernel_series(r) == label), key=lambda p: p[0])
            xs = [x for x, _ in pts]
            line, = ax.plot(xs, [r["ms"] for _, r in pts], marker="o", label=label,
                            **BASELINE_STYLE.get(label, {}))
            if any("total_ms" in r for _, r in pts):
                ax.plot(xs, [r.get("total_ms", float("nan")) for _, r in pts], marker="x",
                        linestyle="--", color=line.get_color(), label=f"{label} (+selection)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ticks = sorted({r["seq_len"] for r in mine})
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t // 1024}K" if t % 1024 == 0 else str(t) for t in ticks])
        ax.minorticks_off()
        ax.yaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs="all"))
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("ms per layer call")
        ax.set_title(f"Hq={hq} Hkv={hkv} D={d}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    versions = result.get("versions") or result  # files from before the harness kept them at the top
    fig.suptitle(f"{result.get('card')}  page={result.get('page_size')}  block={result.get('block_size')}"
                 f"  {result.get('dtype')}  torch {versions.get('torch')}  triton {versions.get('triton')}"
                 f"  vllm {versions.get('vllm')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_result_file(json_path: str) -> str | None:
    """Draw the PNG beside a benchmark's result JSON (its kind recognised by its keys); returns
    its path, or None when there is nothing to draw. ValueError for a file of another kind."""
    with open(json_path) as f:
        result = json.load(f)
    png = os.path.splitext(json_path)[0] + ".png"
    title = " ".join(str(result[k]) for k in ("card", "date") if isinstance(result, dict) and result.get(k))
    rows = result.get("rows") if isinstance(result, dict) else None
    if rows and "metric" in rows[0]:
        return plot_ttft([r for r in rows if r["metric"] == "ttft" and not r.get("extra_length")],
                         result.get("baseline", "FLASH_ATTN"), png, f"{result.get('model')} {title}")
    if rows and "tflops_effective" in rows[0]:
        return plot_kernels(result, png)
    if "servers" in result:
        panels = _serve_panels(result)
    elif "busy_s_by_group" in result:
        panels = _profile_panels(result)
    elif "scoring_tflop" in result:
        panels = _selection_panels(result)
    elif rows and "BLOCK_M" in rows[0]:
        panels = _tune_panels(result)
    elif rows and any("impl" in r for r in rows):
        panels = _fa3_table_panels(result)
    else:
        raise ValueError("not a result file this module plots")
    return plot_bars(panels, png, f"{os.path.basename(json_path)}: {title}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="(Re)draw the PNG beside each benchmark result JSON.")
    ap.add_argument("results", nargs="+", metavar="RESULT.json")
    args = ap.parse_args(argv)
    failed = 0
    for path in args.results:
        try:
            png = plot_result_file(path)
        except (OSError, ValueError) as e:  # unreadable, not JSON, or not a result file
            print(f"{path}: {e}", file=sys.stderr)
            failed += 1
            continue
        print(png or f"{path}: nothing to draw")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
