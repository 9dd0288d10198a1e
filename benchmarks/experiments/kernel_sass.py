"""What the compiled attention kernel looks like: registers, local memory (spills), shared memory and
the instruction mix of each loop, from its SASS (Triton's bundled ``cuobjdump``/``nvdisasm``).

    python -m benchmarks.experiments.kernel_sass --out sass.json              # GPU: JIT-compiled
    python -m benchmarks.experiments.kernel_sass --offline-sm 90 --out x.json  # no GPU needed
    python -m benchmarks.experiments.kernel_sass --cubin kernel.cubin          # a saved binary

``--kernel hopper`` takes kernels/attention_hopper.py instead of kernels/attention.py (its loops:
two consumer tile loops (off-diagonal, diagonal) per warpgroup's code path, and the producer's).
``--kv-dtype fp8`` builds kernels/attention.py for an fp8 (e4m3) KV cache with its scales (bf16 q).

On a GPU the kernel is launched once (hybrid, 16K tokens, pages of 64, the package's launch config
for the given heads) and its binary taken from Triton's cache. ``--offline-sm`` compiles the kernel
with the same constants and the launch config the launcher picks for that architecture
(``limits.limits_for``) without a GPU, but with the local Triton version and with aligned pointers
and strides assumed rather than seen (kernels/offline_build.py), so its register and stack figures
may differ from the GPU build's; the instruction mix of the tile loop is what it checks.
``--dump-cubin`` keeps the binary. A loop is a predicated backward
branch (the unconditional ones jump back from the out-of-line barrier-wait paths); the innermost
loop with wgmma and TMA loads is the off-diagonal loop, one iteration per KV tile of ``BLOCK_N`` keys.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
import triton.language as tl

from benchmarks.harness.provenance import git_commit, source_digest
from benchmarks.ops.common import static_pattern_prompt
from vllm_flashprefill.kernels import attention
from vllm_flashprefill.kernels.common import FP8_DTYPE
from vllm_flashprefill.kernels.limits import limits_for
from vllm_flashprefill.kernels.offline_build import compile_offline

TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
ADDRESS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
LABEL = re.compile(r"^\s*(\.L_x_\d+):")
PREDICATE = r"^@!?U?P\w+\s+"
BRANCH = re.compile(PREDICATE + r"BRA\b.*?(\.L_x_\d+)")  # predicated: a loop's back edge


def kernel_of(name: str):
    """(module, JIT function) of our attention kernel ``name``: "triton" (kernels/attention.py) or
    "hopper" (kernels/attention_hopper.py)."""
    if name == "hopper":
        from vllm_flashprefill.kernels import attention_hopper

        return attention_hopper, attention_hopper._hopper_sparse_prefill_kernel
    return attention, attention._sparse_prefill_kernel


def cubin_from_gpu(kernel: str, num_q_heads: int, num_kv_heads: int, head_size: int, fp8: bool):
    module, fn = kernel_of(kernel)
    p = static_pattern_prompt(16384, num_q_heads, num_kv_heads, head_size, 64, "hybrid", 128, torch.bfloat16, "cuda")
    out = torch.empty_like(p.q)
    k_cache, v_cache, scales = p.k_cache, p.v_cache, {}
    if fp8:
        k_cache, v_cache = k_cache.to(FP8_DTYPE), v_cache.to(FP8_DTYPE)
        scales = dict(k_scale=torch.ones((), device="cuda"), v_scale=torch.ones((), device="cuda"))
    module.sparse_prefill_attention(p.q, k_cache, v_cache, out, p.block_table, p.seq_lens,
                                    p.qblocks.table, p.kv_indices, p.kv_counts, head_size**-0.5, 128, **scales)
    torch.cuda.synchronize()
    (compiled,) = [k for cache in fn.device_caches.values() for k in cache[0].values()]
    return compiled.asm["cubin"], compiled.metadata.shared


def cubin_offline(kernel: str, sm: int, num_q_heads: int, num_kv_heads: int, head_size: int, fp8: bool):
    gqa = num_q_heads // num_kv_heads
    kv_type = "fp8e4nv" if fp8 else "bf16"  # main() takes fp8 for kernels/attention.py only
    module, fn = kernel_of(kernel)
    if kernel == "hopper":
        from triton.runtime.jit import mangle_type

        constexprs = dict(GQA=gqa, BLOCK_Q=module.BLOCK_M // triton.next_power_of_2(gqa), BLOCK_M=module.BLOCK_M,
                          BLOCK_N=module.BLOCK_N, HEAD_SIZE=head_size, SPARSE_BLOCK=128, PAGE_SIZE=64,
                          STAGES=module.STAGES)
        tile = mangle_type(module.cache_descriptor(torch.empty(1, 64, num_kv_heads, head_size, dtype=torch.bfloat16)))
        options = dict(num_warps=4)
    else:
        cfg = attention.launch_config(head_size, gqa, 128, 64, limits_for(sm))
        options = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
        # fp8: an e4m3 cache with its scales (bf16 q); else 16-bit data, no scales.
        no_scales = dict(q_scale_ptr=None) if fp8 else dict(q_scale_ptr=None, k_scale_ptr=None, v_scale_ptr=None)
        constexprs = dict(GQA=gqa, HEAD_SIZE=head_size, SPARSE_BLOCK=128, PAGE_SIZE=64, DOT_DTYPE=tl.bfloat16,
                          **no_scales, **cfg)
        tile = f"tensordesc<{kv_type}[1, {cfg['BLOCK_N']}, 1, {head_size}]>"
        if not cfg["TMA"]:
            constexprs.update(k_desc=None, v_desc=None)
    types = dict(q_ptr="*bf16", k_ptr=f"*{kv_type}", v_ptr=f"*{kv_type}", out_ptr="*bf16", k_desc=tile, v_desc=tile,
                 sm_scale_log2="fp32", k_scale_ptr="*fp32", v_scale_ptr="*fp32")
    compiled = compile_offline(sm, fn, constexprs, types, **options)
    return compiled.asm["cubin"], compiled.metadata.shared


def analyse(cubin: Path) -> dict:
    usage = subprocess.run([str(TOOLS / "cuobjdump"), "-res-usage", str(cubin)], capture_output=True,
                           text=True, check=True).stdout
    resources = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    sass = subprocess.run([str(TOOLS / "nvdisasm"), "-c", "-g", str(cubin)], capture_output=True,
                          text=True, check=True).stdout.splitlines()
    code, labels, pending = [], {}, []
    for line in sass:
        if m := LABEL.match(line):
            pending.append(m.group(1))
        elif m := ADDRESS.search(line):
            address = int(m.group(1), 16)
            labels.update((name, address) for name in pending)
            pending = []
            code.append((address, m.group(2)))
    loops = []
    for address, text in code:
        branch = BRANCH.search(text)
        if branch and labels.get(branch.group(1), address) < address:
            start = labels[branch.group(1)]
            body = [re.sub(PREDICATE, "", op).split()[0] for a, op in code if start <= a <= address]
            loops.append(dict(start=hex(start), end=hex(address), instructions=len(body),
                              opcodes=dict(collections.Counter(body).most_common())))
    return dict(resources=resources, loops=loops)


def main() -> None:
    ap = argparse.ArgumentParser()
    source = ap.add_mutually_exclusive_group()
    source.add_argument("--cubin", type=Path, help="analyse this binary")
    source.add_argument("--offline-sm", type=int, help="compile for this architecture (e.g. 90) without a GPU")
    ap.add_argument("--kernel", choices=("triton", "hopper"), default="triton",
                    help="kernels/attention.py or kernels/attention_hopper.py")
    ap.add_argument("--heads", default="32,8,128", help="query heads, KV heads, head size")
    ap.add_argument("--kv-dtype", choices=("bf16", "fp8"), default="bf16",
                    help="fp8: e4m3 with scales (--kernel triton)")
    ap.add_argument("--dump-cubin", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    fp8 = args.kv_dtype == "fp8"
    if fp8 and args.kernel != "triton":
        ap.error("--kv-dtype fp8: only kernels/attention.py reads an fp8 cache")
    hq, hkv, d = map(int, args.heads.split(","))
    launch_shared = None  # bytes of shared memory per program at launch (Triton's metadata)
    if args.cubin:
        path, origin = args.cubin, f"file {args.cubin}"
    else:
        if args.offline_sm:
            binary, launch_shared = cubin_offline(args.kernel, args.offline_sm, hq, hkv, d, fp8)
            origin = f"offline, sm_{args.offline_sm}"
        else:
            binary, launch_shared = cubin_from_gpu(args.kernel, hq, hkv, d, fp8)
            origin = f"JIT on {torch.cuda.get_device_name()}"
        path = args.dump_cubin or Path(tempfile.mkdtemp()) / "attention.cubin"
        path.write_bytes(binary)
    result = dict(kernel=kernel_of(args.kernel)[1].fn.__name__, heads=args.heads, kv_dtype=args.kv_dtype, origin=origin,
                  triton=triton.__version__, commit=git_commit(), source_digest=source_digest(),
                  launch_shared_bytes=launch_shared,
                  **analyse(path))
    r = result["resources"]
    print(f"{origin}: {r.get('reg')} registers, {r.get('stack')} B stack, {r.get('local')} B local, "
          f"{r.get('shared')} B static shared, {launch_shared} B shared at launch")
    for loop in result["loops"]:
        top = ", ".join(f"{op} {n}" for op, n in list(loop["opcodes"].items())[:8])
        print(f"loop {loop['start']}-{loop['end']}: {loop['instructions']} instructions: {top}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
