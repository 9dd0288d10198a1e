"""One-off studies kept for their results: FA3 over per-query-block tables, the compiled kernel's SASS."""
