"""The attention kernel compiled for Hopper (sm_90) without a GPU, through
benchmarks/experiments/kernel_sass.py: the loop over KV tiles must run on wgmma with TMA tile loads,
the paths the GPU timings rely on, so that a change which loses them fails here before a GPU run.
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


@pytest.mark.skipif(not all((TOOLS / tool).exists() for tool in ("nvdisasm", "cuobjdump")),
                    reason="Triton ships no nvdisasm/cuobjdump here")
def test_hopper_build_runs_the_tile_loop_on_wgmma_and_tma(tmp_path):
    out = tmp_path / "sass.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "experiments" / "kernel_sass.py"), "--offline-sm", "90",
         "--dump-cubin", str(tmp_path / "attention.cubin"), "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["origin"] == "offline, sm_90" and 0 < result["resources"]["reg"] <= 255

    def count(loop, prefix):
        return sum(n for op, n in loop["opcodes"].items() if op.startswith(prefix))

    tile_loops = [loop for loop in result["loops"] if count(loop, "HGMMA") and count(loop, "UTMALDG")]
    context = f"Triton {triton.__version__}: {[loop['opcodes'] for loop in result['loops']]}"
    assert tile_loops, context
    innermost = min(tile_loops, key=lambda loop: loop["instructions"])
    # QK^T is m64n64k16 (64-key tiles), PV m64n128k16 (head size 128).
    assert count(innermost, "HGMMA.64x64x16") and count(innermost, "HGMMA.64x128x16"), context
    assert not any(count(loop, "HMMA") for loop in result["loops"]), context  # no pre-Hopper MMA
