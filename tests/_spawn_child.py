"""Code that runs in a ``spawn``ed child process for tests/test_registration.py.

This module must not import ``vllm_flashprefill`` (nor vLLM): the child has to meet the
FLASHPREFILL member for the first time while unpickling what the parent sent, exactly like a
spawned vLLM engine-core or worker process that unpickles its ``VllmConfig`` before it loads the
general plugins.
"""

from __future__ import annotations

import dataclasses
import sys
import traceback
from typing import Any


@dataclasses.dataclass
class Holder:
    """A user-defined object that carries the member (stands in for vLLM's config objects)."""

    backend: Any
    label: str = "holder"


def _state() -> dict[str, Any]:
    plugins = sys.modules.get("vllm.plugins")
    return {
        "flashprefill_imported": any(
            m == "vllm_flashprefill" or m.startswith("vllm_flashprefill.") for m in sys.modules
        ),
        "general_plugins_loaded": bool(getattr(plugins, "plugins_loaded", False)),
    }


def _describe(member: Any) -> dict[str, Any]:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return {
        "type": f"{type(member).__module__}.{type(member).__qualname__}",
        "name": member.name,
        "path": member.get_path(),
        "is_registered_member": member is AttentionBackendEnum[member.name],
    }


def receive_and_report(conn) -> None:
    """Receive pickled payloads one by one; send back what each unpickled into."""
    report: dict[str, Any] = {"before": _state(), "received": []}
    try:
        while True:
            kind = conn.recv()  # a plain string naming what the next message holds
            if kind == "done":
                break
            obj = conn.recv()  # unpickling happens here
            if kind == "member":
                entry = _describe(obj)
            elif kind == "holder":
                entry = {**_describe(obj.backend), "label": obj.label}
            elif kind == "dict":
                first, second = obj["backends"]
                entry = {**_describe(first), "same_object_twice": first is second}
            elif kind == "attention_config":
                entry = _describe(obj.backend)
            elif kind == "vllm_config":
                attn = obj.attention_config
                chosen = attn.backend or attn.backend_per_kind.get("full_attention")
                entry = {**_describe(chosen), "additional_config": obj.additional_config}
            else:
                raise AssertionError(f"unknown payload kind {kind!r}")
            report["received"].append({"kind": kind, **entry})
        report["after"] = _state()
        report["ok"] = True
    except BaseException:  # report everything, the parent asserts
        report["ok"] = False
        report["error"] = traceback.format_exc()
    conn.send(report)
    conn.close()
