"""What every benchmark shares: provenance (code, versions, card, date, weights), result files,
tables and progress, PNG plots, child processes, and the model folders the engine benchmarks run.
Standard library only at import time: the engine benchmarks' parent process stays free of torch."""
