"""Fixtures for the GPU kernel tests (tests/gpu/test_kernels_gpu.py).

The tests run on CUDA and skip when ``torch.cuda.is_available()`` is False. For working on the
tests themselves without a GPU, ``FP_TEST_DEVICE=cpu`` runs the same tests on the Triton
interpreter with tiny shapes and fp32 (slow, minutes).

Batches come from ``benchmarks/ops/common.py:make_batch``, which builds tests/paged.py's layout
(shuffled NHD pages viewed as vLLM's logical [pages, Hkv, page, 2D] cache, NaN in every slot no
request owns) directly on the device, plus ``plant_structure`` so that attention is peaked and
dynamic selection has hot blocks to find.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

DEVICE = os.environ.get("FP_TEST_DEVICE", "cuda").strip().lower() or "cuda"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
ENABLED = DEVICE == "cpu" or torch.cuda.is_available()
ON_GPU = DEVICE != "cpu"  # test_kernels_gpu.py derives the same from the same variable

_NOTES: list[str] = []


def load_common():
    """benchmarks/ops/common.py, imported only once TRITON_INTERPRET is settled (it imports the
    kernels; other suites of a CPU run may still have to set it before they are first imported)."""
    from benchmarks.ops import common

    return common


@dataclasses.dataclass
class Env:
    common: object
    device: torch.device
    dtype: torch.dtype
    block: int
    # Tolerances against an fp32 reference: elementwise |out-ref| <= atol + rtol*|ref|, and
    # ||out-ref|| / ||ref|| <= rel_l2.
    atol: float
    rtol: float
    rel_l2: float

    def batch(self, query_lens, context_lens, heads, page_size, hot_frac=0.1, seed=0):
        """A paged batch on the device; ``hot_frac`` > 0 plants hot KV blocks (and peaks q)."""
        hq, hkv, d = heads
        b = self.common.make_batch(
            query_lens, context_lens, hq, hkv, d, page_size, self.dtype, self.device, seed=seed
        )
        if hot_frac is not None:
            self.common.plant_structure(b, self.block, hot_frac, seed=seed)
        return b

    def check_close(self, out, ref, what, note=None, atol=None, rtol=None, rel_l2=None):
        return check_close(out, ref, self, what, note, atol, rtol, rel_l2)


@pytest.fixture(scope="session")
def env() -> Env:
    common = load_common()
    if ON_GPU:
        return Env(common, torch.device("cuda"), torch.bfloat16, 128, 2e-2, 2e-2, 1e-2)
    # The interpreter: fp32 everywhere, prompts of a few hundred tokens, so 64-token blocks.
    return Env(common, torch.device("cpu"), torch.float32, 64, 1e-4, 1e-4, 1e-5)


@pytest.fixture
def note():
    """Append a line to the summary printed at the end of the run."""

    def add(line: str) -> None:
        _NOTES.append(line)

    return add


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _NOTES:
        terminalreporter.section("flashprefill kernel numbers")
        for line in _NOTES:
            terminalreporter.write_line(line)


def check_close(out, ref, env: Env, what: str, note=None, atol=None, rtol=None, rel_l2=None):
    """Assert kernel output ``out`` matches the fp32 ``ref`` within tolerance; note the numbers."""
    atol = env.atol if atol is None else atol
    rtol = env.rtol if rtol is None else rtol
    rel_l2 = env.rel_l2 if rel_l2 is None else rel_l2
    out, ref = out.float(), ref.float()
    d = env.common.diff(out, ref)
    bad = ~((out - ref).abs() <= atol + rtol * ref.abs())  # NaN counts as bad
    num_bad = int(bad.sum())
    if note is not None:
        note(f"{what}: {d} bad={num_bad}/{out.numel()}")
    if num_bad or d.rel_l2 > rel_l2 or d.nonfinite:
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(
            f"{what}: {d}; {num_bad} elements outside atol={atol} rtol={rtol} "
            f"(first at {idx}); rel_l2 limit {rel_l2}"
        )
    return d
