"""Op-level benchmarks: one layer call of our kernels (attention, selection) against vLLM's, on
random paged caches, without an engine."""
