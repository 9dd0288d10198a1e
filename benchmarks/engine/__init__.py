"""Engine-level benchmarks: vLLM with FLASHPREFILL against FLASH_ATTN (TTFT, serving, a profiled
prefill), each engine in a child process."""
