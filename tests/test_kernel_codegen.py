"""Our kernels compiled without a GPU.

Hopper (sm_90), through benchmarks/experiments/kernel_sass.py: the attention loop over KV tiles must
run on wgmma with TMA tile loads (and, in kernels/attention_hopper.py, with a producer warp and
register reallocation), the paths the GPU timings rely on, so that a change which loses them fails
here before a GPU run.
A100, RTX 30xx, RTX 40xx and RTX 50xx (sm_80, 86, 89, 120), through tests/_offline_builds.py: every
portable kernel with the launch config its launcher picks there fits the card's shared memory per
block, multiplies on mma.sync (HMMA), never on wgmma, and copies tiles by TMA only from sm_90 on
(sm_120 has TMA).
The code comes from the local Triton (CI's, not the GPU machine's), so only what any build of these
kernels must have is checked, not instruction counts."""

import collections
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import triton

from vllm_flashprefill.kernels.limits import limits_for

REPO = Path(__file__).resolve().parents[1]
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
CONSUMER_TARGETS = (80, 86, 89, 120)
# Launch shapes per kernel and target in tests/_offline_builds.py: head sizes x dtypes x GQA x pages.
LAUNCHES = 3 * 2 * 3 * 2


needs_tools = pytest.mark.skipif(not all((TOOLS / tool).exists() for tool in ("nvdisasm", "cuobjdump")),
                                 reason="Triton ships no nvdisasm/cuobjdump here")


def compile_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret


def sm90_build(tmp_path, kernel: str, *options: str) -> dict:
    out = tmp_path / "sass.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.experiments.kernel_sass", "--kernel", kernel,
         "--offline-sm", "90", "--dump-cubin", str(tmp_path / "attention.cubin"), "--out", str(out), *options],
        capture_output=True, text=True, timeout=600, env=compile_env(), cwd=REPO,
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
def test_fp8_build_keeps_the_tile_loop_on_wgmma_and_tma(tmp_path):
    """An fp8 (e4m3) KV cache: TMA copies fp8 tiles, converted in registers for the same bf16 wgmma."""
    result = sm90_build(tmp_path, "triton", "--kv-dtype", "fp8")
    tile_loops = [loop for loop in result["loops"] if count(loop, "HGMMA") and count(loop, "UTMALDG")]
    context = f"Triton {triton.__version__}: {[loop['opcodes'] for loop in result['loops']]}"
    assert tile_loops, context
    innermost = min(tile_loops, key=lambda loop: loop["instructions"])
    assert count(innermost, "HGMMA.64x64x16.F32.BF16") and count(innermost, "HGMMA.64x128x16.F32.BF16"), context
    assert any("E4M3" in op for op in innermost["opcodes"]), context


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


@pytest.fixture(scope="module")
def consumer_builds(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("consumer-builds")
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "_offline_builds.py"), "--targets", ",".join(map(str, CONSUMER_TARGETS)),
         "--out", str(folder / "builds.json"), "--cubins", str(folder)],
        capture_output=True, text=True, timeout=1200, env=compile_env(),
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads((folder / "builds.json").read_text())


def builds_for(consumer_builds: dict, target: int) -> list[dict]:
    return [build for build in consumer_builds["builds"] if build["target"] == target]


@pytest.mark.parametrize("target", CONSUMER_TARGETS)
def test_consumer_builds_fit_the_cards_shared_memory(consumer_builds, target):
    """Each build's shared memory at launch (Triton's metadata) fits the target's per-block limit and
    the launcher's own estimate, which is what keeps the shapes not compiled here within the limit."""
    builds = builds_for(consumer_builds, target)
    launches = collections.Counter()
    for build in builds:
        launches[build["kernel"]] += len(build["launches"])
        assert 0 <= build["shared"] <= limits_for(target).shared_memory, build
        if build["estimate"] is not None:
            assert build["shared"] <= build["estimate"], build
        assert not build["constexprs"].get("TMA") or target >= 90, build
    assert launches == dict.fromkeys(("attention", "block_scores", "pool_queries", "select_blocks", "block_tables"),
                                     LAUNCHES)


def sass_of(cubin: str) -> tuple[str, int]:
    """(the SASS text, static shared memory bytes) of a binary."""
    dump = subprocess.run([str(TOOLS / "cuobjdump"), "-sass", "-res-usage", cubin], capture_output=True, text=True,
                          check=True).stdout
    return dump, int(re.search(r"\bSHARED:(\d+)", dump).group(1))


@needs_tools
@pytest.mark.parametrize("target", CONSUMER_TARGETS)
def test_consumer_builds_multiply_on_hmma_and_copy_by_tma_only_from_sm90(consumer_builds, target):
    for build in builds_for(consumer_builds, target):
        sass, static_shared = sass_of(build["cubin"])
        opcodes = set(re.findall(r"\b(HGMMA|UTMALDG|HMMA)\b", sass))
        context = f"Triton {triton.__version__}: {build}: {sorted(opcodes)}"
        assert "HGMMA" not in opcodes, context  # wgmma is sm_90/sm_100 only
        assert ("UTMALDG" in opcodes) == bool(build["constexprs"].get("TMA")), context
        assert ("HMMA" in opcodes) == (build["kernel"] in ("attention", "block_scores")), context
        assert build["shared"] + static_shared <= limits_for(target).shared_memory, context
