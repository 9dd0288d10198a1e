"""vllm-flashprefill: block-sparse prefill attention as a vLLM V1 attention backend."""

from vllm_flashprefill.config import FlashPrefillConfig
from vllm_flashprefill.registration import BACKEND_NAME, register

__all__ = ["BACKEND_NAME", "FlashPrefillConfig", "register"]
