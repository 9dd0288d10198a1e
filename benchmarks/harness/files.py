"""Where results go and how they are written: ``<out>/<kind>-<card>-<date>.json`` (the ``.png`` and
``.log`` beside it), rewritten atomically after every row so that a run cut short keeps what it
measured; and reading back the tail or the matching lines of a log.

Without ``--out`` results go to ``./bench-out/`` (git ignores it); the tracked
``benchmarks/results/`` holds only results a document cites, written there on purpose.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from benchmarks.harness import plots

DEFAULT_OUT_DIR = "bench-out"


def card_slug(card: str | None) -> str:
    """A card's short name for file names: ``"NVIDIA H200"`` -> ``"h200"``, ``"cpu"`` -> ``"cpu"``."""
    name = str(card or "unknown").lower()
    for pattern in (r"\b([abhlt]\d{2,3}[a-z]?)\b", r"\b(gb\d{3}|b\d{3})\b", r"(mi\d{3}[a-z]?)"):
        match = re.search(pattern, name)
        if match:
            return match.group(1)
    return re.sub(r"[^a-z0-9.]+", "-", name).strip("-.") or "unknown"


def output_path(out: str | os.PathLike | None, kind: str, card: str | None, date: str) -> Path:
    """The result's ``.json``: ``out`` itself if it names a ``.json`` file, else
    ``<out or ./bench-out>/<kind>-<card>-<date>.json``. Its folder is created."""
    if out is not None and str(out).endswith(".json"):
        path = Path(out)
    else:
        path = Path(out or DEFAULT_OUT_DIR) / f"{kind}-{card_slug(card)}-{date}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON through a temporary file, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_result(out: str | os.PathLike | None, kind: str, result: dict[str, Any]) -> Path:
    """Write a finished result (with ``card`` and ``date``) as :func:`output_path` names it, draw its
    PNG beside it, and say where both went."""
    path = output_path(out, kind, result["card"], result["date"])
    write_json(path, result)
    png = plots.plot_result_file(str(path))
    print(f"wrote {path}" + (f" and {png}" if png else ""), flush=True)
    return path


def tail_text(path: str | os.PathLike, max_bytes: int = 4000, start: int = 0) -> str:
    """The last ``max_bytes`` of ``path`` after byte offset ``start`` (decoded leniently)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            f.seek(max(start, end - max_bytes))
            return f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"<no log: {e}>"


def grep_file(path: str | os.PathLike, pattern: str, start: int = 0, limit: int = 20) -> list[str]:
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
