"""Every benchmark's result file gets its PNG: ``benchmarks/harness/plots.py`` recognises the JSON
of each benchmark and draws it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.harness import plots as plotting
from benchmarks.harness.provenance import REPO

pytest.importorskip("matplotlib")

SERVE = {
    "card": "NVIDIA H200", "date": "2026-11-29",
    "servers": [
        {"backend": "FLASHPREFILL", "pattern": "dynamic", "runs": [
            {"concurrency": 1, "median_ttft_ms": 1341.9, "p99_ttft_ms": 1358.1, "request_throughput": 0.70},
            {"concurrency": 8, "median_ttft_ms": 5831.9, "p99_ttft_ms": 10236.9, "request_throughput": 0.74}]},
        {"backend": "FLASH_ATTN", "pattern": None, "runs": [
            {"concurrency": 1, "median_ttft_ms": 1267.8, "p99_ttft_ms": 1291.4, "request_throughput": 0.73}]},
    ],
}
PROFILE = {
    "card": "NVIDIA H200", "date": "2026-11-29", "backend": "FLASHPREFILL", "options": {"pattern": "hybrid"},
    "busy_s_by_group": {"gemm": 2.41, "attention": 1.15, "other": 0.22},
    "attention_call_ms": {"_sparse_prefill_kernel": [36.0, 35.1, 37.2], "_select_blocks_kernel": [0.27]},
}
TUNE = {
    "card": "NVIDIA H200", "rows": [
        dict(kernel=k, heads="32,8,128", page_size=64, seq_len=131072, pattern="hybrid", tflops=t,
             BLOCK_M=128, BLOCK_N=64, num_warps=w, num_stages=2, TMA=True)
        for k, w, t in (("package", 4, 443.0), ("package", 8, 404.0), ("alt.py", 4, 430.0))
    ],
}
SELECTION = {"card": "NVIDIA H200", "scoring_tflop": 0.5,
             "rows": [{"name": "package", "ms": 1.54}, {"name": "select (fused)", "ms": 0.2}]}
FA3_TABLE = {"card": "NVIDIA H200", "rows": [
    {"impl": "triton", "seq_len": 131072, "pattern": "hybrid", "density": 0.098, "ms": 30.6, "tflops": 450.0},
    {"impl": "fa3_sparse", "seq_len": 131072, "pattern": "hybrid", "density": 0.098, "ms": 25.9, "tflops": 532.0},
    {"check": "max_abs_diff_triton_vs_fa3_sparse", "seq_len": 131072, "value": 0.0039},
]}


@pytest.mark.parametrize("name,result", [("serve", SERVE), ("profile", PROFILE), ("tune", TUNE),
                                         ("selection", SELECTION), ("fa3-virtual-table", FA3_TABLE)])
def test_each_result_file_gets_a_png_beside_it(tmp_path, name, result):
    path = tmp_path / f"{name}-h200-2026-11-29.json"
    path.write_text(json.dumps(result))
    png = plotting.plot_result_file(str(path))
    assert png == str(path.with_suffix(".png"))
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_panels_carry_the_numbers_of_the_file():
    ttft, rate = plotting._serve_panels(SERVE)
    assert ttft[2]["FLASHPREFILL dynamic"]["concurrency 8, p99"] == 10236.9
    assert rate[2]["FLASH_ATTN"] == {"concurrency 1": 0.73}
    groups, per_call = plotting._profile_panels(PROFILE)
    assert list(per_call[2].values())[0] == {"_sparse_prefill_kernel": 36.0, "_select_blocks_kernel": 0.27}
    (tune,) = plotting._tune_panels(TUNE)
    assert set(tune[2]) == {"package", "alt.py"} and len(tune[2]["package"]) == 2


def test_a_file_of_another_kind_is_refused(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"rows": [{"x": 1}]}))
    with pytest.raises(ValueError, match="not a result file"):
        plotting.plot_result_file(str(path))


def test_the_command_line_helps_and_refuses_other_files_without_a_traceback(tmp_path):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"rows": [{"x": 1}]}))

    def run(*args):
        return subprocess.run([sys.executable, "-m", "benchmarks.harness.plots", *args], capture_output=True,
                              text=True, timeout=120, cwd=REPO)

    helped = run("--help")
    assert helped.returncode == 0 and "RESULT.json" in helped.stdout
    refused = run(str(other), str(tmp_path / "missing.json"))
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "not a result file" in refused.stderr and "missing.json" in refused.stderr
