"""The ``vllm.general_plugins`` entry point: make ``FLASHPREFILL`` a valid attention backend name.

vLLM calls :func:`register` in every process it starts (API server, engine core, workers, Ray
actors). It imports nothing that touches CUDA and may run any number of times.
"""

from __future__ import annotations

BACKEND_NAME = "FLASHPREFILL"
BACKEND_PATH = "vllm_flashprefill.backend.FlashPrefillBackend"


def register() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from .compat import add_backend_member

    member = AttentionBackendEnum.__members__.get(BACKEND_NAME)
    if member is None:
        member = add_backend_member(AttentionBackendEnum, BACKEND_NAME, BACKEND_PATH)
    register_backend(member, BACKEND_PATH)
    # Enum members pickle by value, and a spawned process unpickles the engine config before its
    # plugins load: without this hook it fails with "... is not a valid AttentionBackendEnum".
    member.__reduce_ex__ = _reduce_member


def _reduce_member(protocol: int):
    return (_restore_member, ())


def _restore_member():
    """Unpickle the FLASHPREFILL member in a fresh process, registering it there first."""
    register()
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return AttentionBackendEnum[BACKEND_NAME]
