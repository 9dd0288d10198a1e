"""Shared by run_cpu.py and run_vllm.py: task sets, configurations, RULER scoring, results, plots.

No torch or vLLM import here, so the GPU runner's parent process stays light.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.harness.plots import pyplot

DENSE = "dense"

# Named FLASHPREFILL settings (``additional_config["flashprefill"]``); ``--base`` options go under
# each. A configuration on the command line is a name from here, a pattern name, or LABEL=JSON.
PRESETS: dict[str, dict[str, Any]] = {
    "dense": {"pattern": "dense"},
    "dynamic": {"pattern": "dynamic"},
    "hybrid": {"pattern": "hybrid"},
    "local": {"pattern": "local"},
    "strided": {"pattern": "strided"},
}


def parse_configs(specs: list[str], base: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``["dense", "hybrid", 'dyn2={"pattern": "dynamic", "local_blocks": 2}']`` -> label: options.

    ``dense`` is always first (agreement is measured against it); ``base`` options apply to every
    sparse configuration unless the configuration sets them itself."""
    configs: dict[str, dict[str, Any]] = {DENSE: {"pattern": "dense"}}
    for spec in specs:
        label, _, body = spec.partition("=")
        if body:
            options = json.loads(body)
        elif label in PRESETS:
            options = dict(PRESETS[label])
        else:
            raise SystemExit(f"unknown configuration {spec!r}: a preset ({', '.join(PRESETS)}) or LABEL=JSON")
        if options.get("pattern", "dynamic") != "dense":
            options = {**base, **options}
        if label != DENSE:
            configs[label] = options
    return configs


def load_tasks(data_dir: str | Path, tasks: list[str] | None, lengths: list[int] | None,
               num_samples: int | None) -> list[dict[str, Any]]:
    """Samples of ``<data_dir>/<length>/<task>/validation.jsonl`` (written by prepare.py)."""
    root = Path(data_dir)
    samples = []
    for length_dir in sorted((p for p in root.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
        length = int(length_dir.name)
        if lengths and length not in lengths:
            continue
        for task_dir in sorted(p for p in length_dir.iterdir() if (p / "validation.jsonl").exists()):
            if tasks and task_dir.name not in tasks:
                continue
            meta = json.loads((task_dir / "meta.json").read_text())
            with open(task_dir / "validation.jsonl") as f:
                rows = [json.loads(line) for line in f if line.strip()]
            for row in rows[:num_samples]:
                samples.append({
                    "task": task_dir.name, "length": length, "index": row["index"],
                    "input": row["input"], "refs": row["outputs"],
                    "max_new_tokens": meta["tokens_to_generate"], "metric": meta["metric"],
                })
    if not samples:
        raise SystemExit(f"no task sets under {root} (run prepare.py first)")
    return samples


def score(pred: str, refs: list[str], metric: str) -> float:
    """RULER metrics: string_match_all = share of references found in the output (case-insensitive),
    string_match_part = 1 if any is found; x100."""
    hits = [r.lower() in pred.lower() for r in refs]
    if metric == "string_match_all":
        return 100.0 * sum(hits) / len(refs)
    if metric == "string_match_part":
        return 100.0 * any(hits)
    raise ValueError(f"unknown metric {metric}")


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (config, task, length): mean score, exact-output agreement with dense, density."""
    dense_out = {(r["task"], r["length"], r["index"]): r["output"] for r in records if r["config"] == DENSE}
    groups: dict[tuple, list] = defaultdict(list)
    for r in records:
        groups[(r["config"], r["task"], r["length"])].append(r)
    rows = []
    for (config, task, length), rs in groups.items():
        same = [r["output"] == dense_out[k] for r in rs
                if (k := (r["task"], r["length"], r["index"])) in dense_out]
        dens = [r["density"] for r in rs if r.get("density") is not None]
        rows.append({
            "config": config, "task": task, "length": length, "n": len(rs),
            "score": round(sum(r["score"] for r in rs) / len(rs), 2),
            "agreement": round(sum(same) / len(same), 3) if same else None,
            "density": round(sum(dens) / len(dens), 4) if dens else None,
        })
    return rows


def markdown(summary: list[dict[str, Any]], configs: list[str]) -> str:
    """task@length x config table of 'score (agreement)', plus mean rows."""
    cell = {(r["config"], r["task"], r["length"]): r for r in summary}
    keys = sorted({(r["task"], r["length"]) for r in summary}, key=lambda k: (k[1], k[0]))
    head = "| task | length | " + " | ".join(configs) + " |\n|---|---|" + "---|" * len(configs) + "\n"
    lines = []
    for task, length in keys:
        cells = []
        for c in configs:
            r = cell.get((c, task, length))
            agree = "" if r is None or r["agreement"] is None or c == DENSE else f" ({r['agreement']:.0%})"
            cells.append("-" if r is None else f"{r['score']:.1f}{agree}")
        lines.append(f"| {task} | {length} | " + " | ".join(cells) + " |")
    for length in sorted({k[1] for k in keys}):
        cells = []
        for c in configs:
            rs = [r for r in summary if r["config"] == c and r["length"] == length]
            mean = sum(r["score"] for r in rs) / len(rs) if rs else float("nan")
            ag = [r["agreement"] * r["n"] for r in rs if r["agreement"] is not None]
            agree = f" ({sum(ag) / sum(r['n'] for r in rs):.0%})" if ag and c != DENSE else ""
            dens = [r["density"] for r in rs if r["density"] is not None]
            d = f" d={sum(dens) / len(dens):.2f}" if dens else ""
            cells.append(f"**{mean:.1f}**{agree}{d}")
        lines.append(f"| **mean** | {length} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def plot(summary: list[dict[str, Any]], configs: list[str], path: Path, title: str) -> Path | None:
    """Left: score vs length per configuration, averaged over the tasks run at every length.
    Right: heat map of the score per task (task@length when there are several lengths) x
    configuration, each cell annotated with the agreement with dense."""
    plt = pyplot()
    if plt is None:
        return None
    import numpy as np

    lengths = sorted({r["length"] for r in summary})
    common = sorted(set.intersection(*({r["task"] for r in summary if r["length"] == n} for n in lengths)))
    rows = sorted({(r["task"], r["length"]) for r in summary})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(6 + 1.1 * len(configs), 0.45 * len(rows) + 3),
                                   gridspec_kw={"width_ratios": [1, 1.2]})
    for c in configs:
        ys = []
        for length in lengths:
            rs = [r["score"] for r in summary if r["config"] == c and r["length"] == length and r["task"] in common]
            ys.append(sum(rs) / len(rs) if rs else np.nan)
        dens = [r["density"] for r in summary if r["config"] == c and r["density"] is not None]
        label = c + (f" (density {sum(dens) / len(dens):.2f})" if dens else "")
        ax1.plot(lengths, ys, marker="o", label=label, linestyle="--" if c == DENSE else "-")
    ax1.set_xscale("log", base=2)
    ax1.set_xticks(lengths, [f"{x // 1024}K" if x % 1024 == 0 else str(x) for x in lengths])
    ax1.minorticks_off()
    ax1.set_xlabel("max sequence length (tokens)")
    names = ", ".join(common) if len(common) <= 3 else f"{len(common)} tasks"
    ax1.set_ylabel(f"RULER score (mean over {names})")
    ax1.set_ylim(-2, 102)
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    grid = np.full((len(rows), len(configs)), np.nan)
    agree = np.full_like(grid, np.nan)
    cell = {(r["config"], r["task"], r["length"]): r for r in summary}
    for i, (t, n) in enumerate(rows):
        for j, c in enumerate(configs):
            if (r := cell.get((c, t, n))) is not None:
                grid[i, j] = r["score"]
                agree[i, j] = np.nan if r["agreement"] is None else r["agreement"]
    im = ax2.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(configs)):
            if not np.isnan(grid[i, j]):
                text = f"{grid[i, j]:.0f}" + ("" if j == 0 or np.isnan(agree[i, j]) else f"\n{agree[i, j]:.0%}")
                ax2.text(j, i, text, ha="center", va="center", fontsize=7,
                         color="white" if grid[i, j] < 60 else "black")
    ax2.set_xticks(range(len(configs)), configs, rotation=30, ha="right")
    ax2.set_yticks(range(len(rows)), [t if len(lengths) == 1 else f"{t} @{n // 1024}K" for t, n in rows])
    ax2.set_title("score / same greedy output as dense", fontsize=9)
    fig.colorbar(im, ax=ax2, fraction=0.04)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    png = path.with_suffix(".png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
