"""Version-specific steps that vLLM offers no API for (see vllm_flashprefill/compat.py)."""
