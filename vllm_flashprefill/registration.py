"""The ``vllm.general_plugins`` entry point: make ``FLASHPREFILL`` a valid attention backend name,
and check the ``flashprefill`` options where vLLM builds the engine config.

vLLM calls :func:`register` in every process it starts (API server, engine core, workers, Ray
actors). It imports nothing that touches CUDA and may run any number of times.
"""

from __future__ import annotations

import functools

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
    check_options_at_engine_config()


def check_options_at_engine_config() -> None:
    """Wrap ``EngineArgs.create_engine_config`` (0.26-0.33: ``LLM()``, ``vllm serve`` and
    ``vllm bench`` all build their ``VllmConfig`` there, in the process that parsed the arguments,
    after ``EngineArgs.__post_init__`` loaded this plugin) so that bad options stop the engine
    there, before a model loads, on every platform. Without it the first check is in the worker,
    after the weights load (GPU), or never (CPU platform: no FLASHPREFILL layer is built)."""
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "_flashprefill_checked", False):
        return

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        from vllm_flashprefill.config import check_engine_config

        vllm_config = original(self, *args, **kwargs)
        check_engine_config(vllm_config)
        return vllm_config

    create_engine_config._flashprefill_checked = True
    EngineArgs.create_engine_config = create_engine_config


def _reduce_member(protocol: int):
    return (_restore_member, ())


def _restore_member():
    """Unpickle the FLASHPREFILL member in a fresh process, registering it there first."""
    register()
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return AttentionBackendEnum[BACKEND_NAME]
