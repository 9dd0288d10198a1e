"""What a benchmark prints: medians, markdown tables and progress. Standard library only (tqdm is
used when installed and writing to a terminal)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any


def median(values: Sequence[float | None]) -> float | None:
    """Median of the values that are not None (None when there are none)."""
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else 0.5 * (vals[mid - 1] + vals[mid])


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def fmt(row: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    lines = [fmt(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [fmt(r) for r in cells[1:]]
    return "\n".join(lines)


class Progress:
    """A tqdm bar on a terminal; plain ``[n/total  t s] message`` lines otherwise (a log or a remote
    command's output then stays readable)."""

    def __init__(self, total: int, desc: str):
        self.total, self.n, self.t0, self.bar = total, 0, time.time(), None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="row", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, k: int = 1) -> None:
        self.n += k
        if self.bar is not None:
            self.bar.update(k)

    def set_postfix_str(self, text: str) -> None:
        """What runs now: beside the bar, or as a line of its own."""
        if self.bar is not None:
            self.bar.set_postfix_str(text)
        else:
            self.write(text)

    def write(self, msg: str) -> None:
        line = f"[{self.n}/{self.total} {time.time() - self.t0:6.1f}s] {msg}"
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
