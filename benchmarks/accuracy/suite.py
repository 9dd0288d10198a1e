"""Shared by run_cpu.py and run_vllm.py: task sets, configurations, RULER scoring, results, plots.

No torch or vLLM import here, so the GPU runner's parent process stays light.
"""

from __future__ import annotations

import datetime
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO / "benchmarks" / "results"
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


def resolved(options: dict[str, Any], environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Every FLASHPREFILL setting a configuration ran with (its options over the package
    defaults, then ``FLASHPREFILL_*`` from ``environ`` where the engine reads them), so that
    results stay readable after the defaults change."""
    from vllm_flashprefill.config import FlashPrefillConfig

    return FlashPrefillConfig.from_additional_config({"flashprefill": options}, environ or {}).as_dict()


def git_commit() -> str | None:
    """``git describe --always --dirty`` of the checkout. On the GPU machine the copy's git metadata
    can be older than its files (it then reads "-dirty"): ``source_digest`` names the tree."""
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


SOURCE_DIRS = ("vllm_flashprefill", "kernels", "patches")


def source_digest(rev: str | None = None) -> str | None:
    """First 12 hex digits of a sha256 over the package's Python sources (path and content, in path
    order): of the files on disk, or with ``rev`` of that git revision, so that a result can be matched
    to the commit it ran (``python3 benchmarks/accuracy/suite.py --digest REV``)."""
    import hashlib
    import subprocess

    if rev is None:
        files = {p.relative_to(REPO).as_posix(): p.read_bytes()
                 for d in SOURCE_DIRS for p in (REPO / d).rglob("*.py") if "__pycache__" not in p.parts}
    else:
        try:
            names = subprocess.run(["git", "-C", str(REPO), "ls-tree", "-r", "--name-only", rev, "--", *SOURCE_DIRS],
                                   capture_output=True, text=True, timeout=30, check=True).stdout.split()
            files = {n: subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{n}"], capture_output=True,
                                       timeout=30, check=True).stdout for n in names if n.endswith(".py")}
        except (OSError, subprocess.SubprocessError):
            return None
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name] + b"\0")
    return digest.hexdigest()[:12]


def load_tasks(data_dir: str | os.PathLike, tasks: list[str] | None, lengths: list[int] | None,
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


def output_path(out: str | None, card: str, date: str | None = None) -> Path:
    date = date or datetime.date.today().isoformat()
    if out and out.endswith(".json"):
        return Path(out)
    slug = "".join(ch if ch.isalnum() else "-" for ch in card.lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    return Path(out or RESULTS_DIR) / f"accuracy-{slug}-{date}.json"


def write_results(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def plot(summary: list[dict[str, Any]], configs: list[str], path: Path, title: str) -> Path | None:
    """Left: score vs length per configuration, averaged over the tasks run at every length.
    Right: heat map of the score per task (task@length when there are several lengths) x
    configuration, each cell annotated with the agreement with dense."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        return None
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


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="source digest of the tree on disk, or of git revisions")
    ap.add_argument("--digest", nargs="*", metavar="REV", default=[])
    for rev in ap.parse_args().digest or [None]:
        print(rev or "(working tree)", source_digest(rev))
