"""Compile one of our Triton kernels for a GPU architecture without a GPU (tests/test_kernel_codegen.py,
benchmarks/experiments/kernel_sass.py). Needs a process without ``TRITON_INTERPRET=1``: the
interpreter replaces ``@triton.jit`` functions with ones that cannot be compiled."""

from __future__ import annotations

from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def compile_offline(capability: int, fn: Any, constexprs: dict[str, Any], types: dict[str, str],
                    **options: Any) -> Any:
    """``fn`` (a ``@triton.jit`` or Gluon kernel) compiled for sm_<capability> with these constexpr
    arguments and ``options`` (num_warps, num_stages). The other arguments' Triton types come
    from ``types`` ("*bf16", "fp32", "tensordesc<bf16[1, 64, 1, 128]>"), else "*i32" for names
    ending in ``_ptr`` and "i32" for the rest. Pointers and the integer arguments Triton
    specializes are taken as multiples of 16, as a launch on aligned tensors with strides of whole
    16-element rows sees them (the build that vectorizes and pipelines the most loads).
    Returns Triton's compiled kernel: ``asm["cubin"]``, ``metadata.shared`` (bytes of shared
    memory per program at launch)."""
    if not hasattr(fn, "arg_names"):
        raise RuntimeError(f"{fn} is not a compilable kernel (TRITON_INTERPRET=1 in this process?)")
    signature = {
        name: "constexpr" if name in constexprs else types.get(name, "*i32" if name.endswith("_ptr") else "i32")
        for name in fn.arg_names
    }
    attrs = {
        (i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
        if signature[name].startswith("*") or (signature[name] == "i32" and name not in fn.do_not_specialize)
    }
    if fn.is_gluon():
        from triton.experimental.gluon._runtime import GluonASTSource

        source = GluonASTSource(fn, signature, constexprs, attrs)
    else:
        source = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
