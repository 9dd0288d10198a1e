"""Compile every portable kernel offline for the given architectures with the launch configs its launcher
picks there (kernels/limits.py ``limits_for``), and write what each build needs to a JSON file; run
by tests/test_kernel_codegen.py in a process without ``TRITON_INTERPRET``:

    python tests/_offline_builds.py --targets 80,86,89,120 --out builds.json --cubins DIR

The launches are head sizes 64/128/256 x bf16/fp16 x GQA 1/4/8 x pages of 16 and 64 (Hkv 8, sparse
blocks of 128). Each distinct build is compiled once: launches differing only in what does not
change a kernel's tiles (fp16 vs bf16, the same tile bytes; GQA and page size where the config's
tiles stay the same; for selection, GQA, which only unrolls its loop over a group's heads) share
the build of the first of them, and the JSON lists them under it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project from this checkout
from vllm_flashprefill.kernels import attention, block_tables, scoring, selection  # noqa: E402
from vllm_flashprefill.kernels.limits import limits_for  # noqa: E402
from vllm_flashprefill.kernels.offline_build import compile_offline  # noqa: E402

HEAD_SIZES, DTYPES, GQAS, PAGE_SIZES = (64, 128, 256), ("bf16", "fp16"), (4, 1, 8), (16, 64)
ELEMENT_SIZE = dict(bf16=2, fp16=2)
DOT_DTYPES = dict(bf16=tl.bfloat16, fp16=tl.float16)
SPARSE_BLOCK, KV_HEADS = 128, 8
# Score workspace width: 131K tokens of sparse blocks (selection compiles for the padded width; its
# shared memory and its compile time grow with it).
SELECTION_WIDTH = 1024
# The rest of what selection is compiled with: the package defaults.
SELECTION_RULE = dict(SINK_BLOCKS=1, LOCAL_BLOCKS=16, STRIDE=16, MIN_SEQ_LEN=8192, DENSE_TAIL_BLOCKS=2,
                      MIN_BUDGET=0, MAX_BUDGET=0, ABOVE_MEAN=True)


def descriptor(dtype: str, block_n: int, head_size: int) -> str:
    return f"tensordesc<{dtype}[1, {block_n}, 1, {head_size}]>"


def launches(capability: int):
    """(kernel, shape, constexprs, options, types, shared memory estimate or None, distinct key) of
    each kernel for each launch shape on this target, as its launcher would pass them."""
    limits = limits_for(capability)
    for d, dtype, gqa, page in itertools.product(HEAD_SIZES, DTYPES, GQAS, PAGE_SIZES):
        shape = dict(head_size=d, dtype=dtype, gqa=gqa, page_size=page)
        size = ELEMENT_SIZE[dtype]
        # 16-bit data: the dots run in its own dtype, with no fp8 scales.
        common = dict(GQA=gqa, HEAD_SIZE=d, SPARSE_BLOCK=SPARSE_BLOCK, PAGE_SIZE=page, DOT_DTYPE=DOT_DTYPES[dtype],
                      q_scale_ptr=None, k_scale_ptr=None)

        cfg = attention.launch_config(d, gqa, SPARSE_BLOCK, page, limits, size)
        options = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
        tile = descriptor(dtype, cfg["BLOCK_N"], d) if cfg["TMA"] else None
        constexprs = {**common, **cfg, "v_scale_ptr": None}
        if not tile:
            constexprs.update(k_desc=None, v_desc=None)
        types = dict(q_ptr=f"*{dtype}", k_ptr=f"*{dtype}", v_ptr=f"*{dtype}", out_ptr=f"*{dtype}",
                     k_desc=tile, v_desc=tile, sm_scale_log2="fp32")
        estimate = attention.shared_memory_estimate({**cfg, **options}, d, size)
        tiles = (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["TMA"], options["num_warps"], options["num_stages"])
        yield "attention", shape, constexprs, options, types, estimate, (d, size, tiles, page if tile else 0)

        cfg = scoring.scores_config(d, gqa, SPARSE_BLOCK, page, limits, size)
        options = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
        tile = descriptor(dtype, cfg["BLOCK_N"], d) if cfg["TMA"] else None
        constexprs = {**common, **cfg, "BLOCKS_PER_GROUP": scoring.blocks_per_group(gqa)}
        if not tile:
            constexprs["k_desc"] = None
        types = dict(pooled_ptr="*fp32", k_ptr=f"*{dtype}", k_desc=tile, scores_ptr="*fp32", scale="fp32")
        estimate = scoring.shared_memory_estimate({**cfg, **options}, d, size)
        tiles = (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["TMA"], options["num_warps"], options["num_stages"])
        yield "block_scores", shape, constexprs, options, types, estimate, (d, size, tiles, page if tile else 0)

        cfg = scoring.pool_config(gqa * KV_HEADS, d, size, SPARSE_BLOCK)
        options = dict(num_warps=cfg.pop("num_warps"))
        types = dict(q_ptr=f"*{dtype}", pooled_ptr="*fp32")
        yield "pool_queries", shape, dict(HEAD_SIZE=d, **cfg), options, types, None, (d, size, tuple(cfg.items()))

        constexprs = dict(GQA=gqa, WIDTH=SELECTION_WIDTH, SPARSE_BLOCK=SPARSE_BLOCK, **SELECTION_RULE)
        types = dict(scores_ptr="*fp32", log_threshold="fp32", log_above_mean="fp32")
        yield "select_blocks", shape, constexprs, dict(num_warps=4), types, None, ()

        constexprs = dict(SPARSE_BLOCK=SPARSE_BLOCK, PAGES_PER_BLOCK=SPARSE_BLOCK // page, SLOTS=block_tables._SLOTS)
        yield "block_tables", shape, constexprs, dict(num_warps=1), {}, None, (page,)


KERNELS = dict(attention=attention._sparse_prefill_kernel, block_scores=scoring._block_scores_kernel,
               pool_queries=scoring._pool_queries_kernel, select_blocks=selection._select_blocks_kernel,
               block_tables=block_tables._block_tables_kernel)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default="80,86,89,120")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cubins", type=Path, required=True, help="folder for the binaries")
    args = ap.parse_args()
    args.cubins.mkdir(parents=True, exist_ok=True)
    builds: dict[tuple, dict] = {}
    wall, cpu = time.perf_counter(), time.process_time()
    for capability in map(int, args.targets.split(",")):
        for kernel, shape, constexprs, options, types, estimate, key in launches(capability):
            key = (capability, kernel, *key)
            if key in builds:
                builds[key]["launches"].append(shape)
                continue
            started = time.perf_counter()
            compiled = compile_offline(capability, KERNELS[kernel], constexprs, types, **options)
            cubin = args.cubins / f"sm{capability}-{len(builds)}-{kernel}.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            builds[key] = dict(
                target=capability, kernel=kernel, shared=compiled.metadata.shared, estimate=estimate,
                limit=limits_for(capability).shared_memory, cubin=str(cubin), compile_s=time.perf_counter() - started,
                constexprs={k: v if isinstance(v, (int, bool)) else str(v)
                            for k, v in constexprs.items() if v is not None}, options=options, launches=[shape],
            )
    result = dict(builds=list(builds.values()), wall_s=time.perf_counter() - wall, cpu_s=time.process_time() - cpu,
                  launches=sum(len(b["launches"]) for b in builds.values()))
    args.out.write_text(json.dumps(result, indent=1))
    print(f"{len(builds)} builds for {result['launches']} launches in {result['wall_s']:.0f} s "
          f"({result['cpu_s']:.0f} s CPU)")


if __name__ == "__main__":
    main()
