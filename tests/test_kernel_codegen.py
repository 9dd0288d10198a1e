"""The attention kernels compiled for Hopper (sm_90) without a GPU, through
benchmarks/experiments/kernel_sass.py: the loop over KV tiles must run on wgmma with TMA tile loads
(and, in kernels/attention_hopper.py, with a producer warp and register reallocation), the paths the
GPU timings rely on, so that a change which loses them fails here before a GPU run.
The code comes from the local Triton (CI's, not the GPU machine's), so only what any Hopper build of
this kernel must have is checked, not instruction counts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

REPO = Path(__file__).resolve().parents[1]
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


needs_tools = pytest.mark.skipif(not all((TOOLS / tool).exists() for tool in ("nvdisasm", "cuobjdump")),
                                 reason="Triton ships no nvdisasm/cuobjdump here")


def sm90_build(tmp_path, kernel: str) -> dict:
    out = tmp_path / "sass.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.experiments.kernel_sass", "--kernel", kernel,
         "--offline-sm", "90", "--dump-cubin", str(tmp_path / "attention.cubin"), "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=env, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["origin"] == "offline, sm_90" and 0 < result["resources"]["reg"] <= 255
    return result


def count(loop, prefix):
    return sum(n for op, n in loop["opcodes"].items() if op.startswith(prefix))


@needs_tools
def test_hopper_build_runs_the_tile_loop_on_wgmma_and_tma(tmp_path):
    result = sm90_build(tmp_path, "triton")
    tile_loops = [loop for loop in result["loops"] if count(loop, "HGMMA") and count(loop, "UTMALDG")]
    context = f"Triton {triton.__version__}: {[loop['opcodes'] for loop in result['loops']]}"
    assert tile_loops, context
    innermost = min(tile_loops, key=lambda loop: loop["instructions"])
    # QK^T is m64n64k16 (64-key tiles), PV m64n128k16 (head size 128).
    assert count(innermost, "HGMMA.64x64x16") and count(innermost, "HGMMA.64x128x16"), context
    assert not any(count(loop, "HMMA") for loop in result["loops"]), context  # no pre-Hopper MMA


@needs_tools
def test_hopper_kernel_is_warp_specialized(tmp_path):
    """kernels/attention_hopper.py: the consumers' tile loops multiply on wgmma (m64n128k16: 128-key
    tiles, head size 128) and copy no tiles themselves; a producer loop copies them by TMA; the
    partitions trade registers (setmaxnreg)."""
    result = sm90_build(tmp_path, "hopper")
    loops = result["loops"]
    context = f"Triton {triton.__version__}: {[loop['opcodes'] for loop in loops]}"
    consumers = [loop for loop in loops if count(loop, "HGMMA")]
    producers = [loop for loop in loops if count(loop, "UTMALDG")]
    # Off-diagonal and diagonal loop, in each of the two consumer partitions.
    assert len(consumers) == 4 and all(count(loop, "HGMMA.64x128x16") for loop in consumers), context
    assert not any(count(loop, "UTMALDG") for loop in consumers), context
    assert len(producers) == 1 and not count(producers[0], "HGMMA"), context
    assert any(count(loop, "USETMAXREG") for loop in loops), context
    assert not any(count(loop, "HMMA") for loop in loops), context
