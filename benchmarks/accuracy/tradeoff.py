"""Accuracy / sparsity trade-off from accuracy results: score change against dense vs block density.

    python benchmarks/accuracy/tradeoff.py benchmarks/results/accuracy-*.json --out benchmarks/results/tradeoff.json

Each input file is one run with its own ``dense`` configuration; every other configuration is
compared with the dense of its own file (mean over the tasks, per length), so runs can be put side
by side without comparing numbers across runs. Density is the measured kept / causal block share
of the sparse layer calls (``vllm_flashprefill.stats``); rows that run dense (below ``min_seq_len``)
are not in it, and lengths where nothing ran sparse have no density and are left out of the plot.
Writes a JSON (one point per file x configuration x length) and a PNG beside it: one panel per
length, score change vs density, one marker per configuration.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import suite


def points(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    by_config: dict[tuple, list] = defaultdict(list)
    for r in data["summary"]:
        by_config[(r["config"], r["length"])].append(r)
    out = []
    for (config, length), rows in by_config.items():
        dense = by_config.get((suite.DENSE, length))
        if config == suite.DENSE or not dense:
            continue
        tasks = {r["task"] for r in rows} & {r["task"] for r in dense}
        score = sum(r["score"] for r in rows if r["task"] in tasks) / len(tasks)
        base = sum(r["score"] for r in dense if r["task"] in tasks) / len(tasks)
        dens = [r["density"] for r in rows if r["density"] is not None]
        out.append({
            "file": path.name, "card": data.get("card"), "date": data.get("date"),
            "config": config, "options": data["configs"][config]["options"], "length": length,
            "tasks": len(tasks), "samples": sum(r["n"] for r in rows if r["task"] in tasks),
            "score": round(score, 2), "dense_score": round(base, 2), "delta": round(score - base, 2),
            "density": round(sum(dens) / len(dens), 4) if dens else None,
        })
    return out


def plot(rows: list[dict], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in rows if r["density"] is not None})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.5 * len(lengths), 4.8), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        for r in (r for r in rows if r["length"] == length and r["density"] is not None):
            ax.scatter(r["density"], r["delta"], s=22)
            ax.annotate(r["config"], (r["density"], r["delta"]), fontsize=6.5,
                        xytext=(3, 2), textcoords="offset points")
        ax.axhline(0, color="gray", lw=0.8)
        ax.axhspan(-1, 1, color="green", alpha=0.08, label="within 1 point of dense")
        ax.set_xlim(0, 1.02)
        ax.set_xlabel("block density of the sparse layers (kept / causal)")
        ax.set_ylabel("RULER mean - dense mean (points, same run)")
        ax.set_title(f"{length // 1024}K", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", type=Path, help="accuracy-*.json files (run_vllm.py or run_cpu.py)")
    p.add_argument("--out", type=Path, required=True, help="JSON to write (the PNG goes beside it)")
    p.add_argument("--title", default="FLASHPREFILL: accuracy vs density")
    args = p.parse_args()
    rows = sorted((r for f in args.results for r in points(f)), key=lambda r: (r["length"], r["config"]))
    args.out.write_text(json.dumps({"inputs": [str(f) for f in args.results], "points": rows}, indent=1))
    plot(rows, args.out.with_suffix(".png"), args.title)
    for r in rows:
        d = "-" if r["density"] is None else f"{r['density']:.2f}"
        print(f"{r['length']:>6} {r['config']:<16} {r['file']:<28} score {r['score']:5.1f} "
              f"delta {r['delta']:+5.1f} density {d} (n={r['samples']})")


if __name__ == "__main__":
    main()
