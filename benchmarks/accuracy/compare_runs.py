"""Two accuracy runs of the same task sets side by side, sample by sample (e.g. the CPU reference
path against vLLM on the GPU).

    python -m benchmarks.accuracy.compare_runs GPU.json CPU.json --pair dyn=dyn --pair dense=dense \\
        --out bench-out/compare.json

For each ``LABEL_A=LABEL_B`` pair: on the samples both runs hold (same task, length and index), the
share of identical greedy outputs, the share with the same score, and the mean scores of each.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def by_sample(path: Path, label: str) -> dict[tuple, dict]:
    records = json.loads(path.read_text())["records"]
    return {(r["task"], r["length"], r["index"]): r for r in records if r["config"] == label}


def compare(a: dict[tuple, dict], b: dict[tuple, dict]) -> dict:
    keys = sorted(set(a) & set(b))
    if not keys:
        return {"samples": 0}
    n = len(keys)
    return {
        "samples": n,
        "identical_outputs": round(sum(a[k]["output"].strip() == b[k]["output"].strip() for k in keys) / n, 3),
        "same_score": round(sum(a[k]["score"] == b[k]["score"] for k in keys) / n, 3),
        "score_a": round(sum(a[k]["score"] for k in keys) / n, 2),
        "score_b": round(sum(b[k]["score"] for k in keys) / n, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--pair", action="append", required=True, help="LABEL_A=LABEL_B (repeatable)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    rows = {}
    for pair in args.pair:
        la, _, lb = pair.partition("=")
        rows[pair] = compare(by_sample(args.a, la), by_sample(args.b, lb or la))
        print(pair, rows[pair])
    if args.out:
        args.out.write_text(json.dumps({"a": str(args.a), "b": str(args.b), "pairs": rows}, indent=1))


if __name__ == "__main__":
    main()
