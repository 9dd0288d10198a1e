"""Accuracy / sparsity trade-off from accuracy results: score change against dense vs block density.

    python -m benchmarks.accuracy.tradeoff bench-out/accuracy-*.json --out bench-out/tradeoff.json

Each input file is one run with its own ``dense`` configuration; every other configuration is
compared with the dense of its own file (mean over the tasks, per length), so runs can be put side
by side without comparing numbers across runs. Density is the measured kept / causal block share
of the sparse layer calls (``vllm_flashprefill.stats``); rows that run dense (below ``min_seq_len``)
are not in it, and lengths where nothing ran sparse have no density and are left out of the plot.
With ``--num-layers`` the attention density counts ``dense_layers`` as fully dense too (what the
prefill's attention costs). A configuration's settings come from the file's ``resolved`` entry, or
for older files from the ``package_defaults`` noted in them.
Writes a JSON (one point per file x configuration x length) and a PNG beside it: one panel per
length, score change vs density, one marker per configuration (larger for more samples).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from benchmarks.accuracy import suite
from benchmarks.harness.plots import pyplot
from vllm_flashprefill.config import FlashPrefillConfig


def settings(data: dict, config: str) -> dict:
    """Every setting a configuration ran with: the file's ``resolved`` entry (the runners write it)
    or, for files from before it, the options over the ``package_defaults`` noted in the file."""
    if config in data.get("resolved", {}):
        return data["resolved"][config]
    if "package_defaults" not in data:
        raise SystemExit(f"{config}: the file records neither 'resolved' nor 'package_defaults'")
    entry = data["configs"][config]
    options = entry.get("options", entry) if isinstance(entry, dict) else {}
    return {**data["package_defaults"], **(options or {})}


def attention_density(density: float | None, cfg: dict, num_layers: int | None) -> float | None:
    """Share of the causal attention work done, dense layers included (``num_layers`` given)."""
    if density is None or not num_layers:
        return None
    config = FlashPrefillConfig.from_dict(cfg)
    n_dense = sum(config.layer_is_dense(i) for i in range(num_layers))
    return round((n_dense + (num_layers - n_dense) * density) / num_layers, 4)


def points(path: Path, num_layers: int | None) -> list[dict]:
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
        density = round(sum(dens) / len(dens), 4) if dens else None
        cfg = settings(data, config)
        out.append({
            "file": path.name, "card": data.get("card"), "date": data.get("date"),
            "config": config, "settings": cfg, "length": length,
            "tasks": len(tasks), "samples": sum(r["n"] for r in rows if r["task"] in tasks),
            "score": round(score, 2), "dense_score": round(base, 2), "delta": round(score - base, 2),
            "density": density, "attention_density": attention_density(density, cfg, num_layers),
        })
    return out


def plot(rows: list[dict], png: Path, title: str) -> None:
    plt = pyplot()
    if plt is None:
        return

    def x(r):  # dense layers counted where the model's layer count was given
        return r["attention_density"] if r["attention_density"] is not None else r["density"]

    lengths = sorted({r["length"] for r in rows if r["density"] is not None})
    counted = all(r["attention_density"] is not None for r in rows if r["density"] is not None)
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.5 * len(lengths), 4.8), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        for r in (r for r in rows if r["length"] == length and r["density"] is not None):
            ax.scatter(x(r), r["delta"], s=6 + r["samples"] / 4)  # bigger: more samples
            ax.annotate(r["config"], (x(r), r["delta"]), fontsize=6.5,
                        xytext=(3, 2), textcoords="offset points")
        ax.axhline(0, color="gray", lw=0.8)
        ax.axhspan(-1, 1, color="green", alpha=0.08, label="within 1 point of dense")
        ax.set_xlim(0, 1.02)
        ax.set_xlabel("attention density, dense layers counted (kept / causal blocks)" if counted
                      else "block density of the sparse layers (kept / causal)")
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
    p.add_argument("--num-layers", type=int, help="the model's layers: also report the attention "
                   "density with the dense layers counted")
    args = p.parse_args()
    rows = sorted((r for f in args.results for r in points(f, args.num_layers)),
                  key=lambda r: (r["length"], r["config"]))
    args.out.write_text(json.dumps({"inputs": [str(f) for f in args.results], "points": rows}, indent=1))
    plot(rows, args.out.with_suffix(".png"), args.title)
    for r in rows:
        d = "-" if r["density"] is None else f"{r['density']:.2f}"
        a = "-" if r["attention_density"] is None else f"{r['attention_density']:.2f}"
        print(f"{r['length']:>6} {r['config']:<16} {r['file']:<44} score {r['score']:5.1f} "
              f"delta {r['delta']:+5.1f} density {d} with dense layers {a} (n={r['samples']})")


if __name__ == "__main__":
    main()
