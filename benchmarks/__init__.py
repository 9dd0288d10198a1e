"""Benchmarks of vllm-flashprefill (see benchmarks/README.md). Every script is a module run from the
repository root, e.g. ``python -m benchmarks.engine.ttft --help``."""
