"""Child processes of the engine benchmarks: each engine or server runs in its own process group
(so a crash or a timeout loses one configuration and GPU memory is freed between them), started as
a module of this repository, stopped with everything it spawned; and what its log says about the
attention backend vLLM picked. Standard library only.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

from benchmarks.harness.provenance import REPO


class Stop(Exception):
    """SIGTERM arrived (e.g. a remote command's time limit): write what was measured and stop."""


@contextlib.contextmanager
def sigterm_raises_stop() -> Iterator[None]:
    def raise_stop(signum, frame):  # noqa: ARG001
        raise Stop(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, raise_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def module_command(module: str, *args: str) -> list[str]:
    """``python -m module args...`` with this interpreter (run with :func:`child_env`)."""
    return [sys.executable, "-m", module, *args]


def child_env(**extra: str) -> dict[str, str]:
    """This environment with the repository first on ``PYTHONPATH`` (the child imports
    ``benchmarks.*`` and this checkout's package from any working directory), unbuffered output and
    quiet tokenizers, plus ``extra``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(extra)
    return env


def kill_process_group(proc: subprocess.Popen, first_signal: int = signal.SIGINT,
                       grace_s: float = 30.0) -> int | None:
    """Stop a child started with ``start_new_session=True`` and everything it spawned:
    ``first_signal`` to its group, SIGTERM after ``grace_s``, SIGKILL 10 s later. Only the group of
    ``proc`` (its own session) is signalled."""
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
