#!/usr/bin/env python
"""Time one FlashPrefill layer call against vLLM's FA3 and Triton unified attention.

Each configuration is one prompt of ``seq_len`` tokens (no context) in a paged KV cache with
shuffled pages (``--page-order ascending``: in order), shared by every kernel of that
configuration. Rows:

* ``flashprefill`` / dense, hybrid, local, ...: static patterns, attention only (their block
  lists depend on block indices alone, so the backend builds them once per batch, not per layer);
* ``flashprefill`` / dynamic: ``ms`` is attention alone, ``selection_ms`` block scoring +
  the fused selection kernel (``kernels/selection.py``), ``total_ms`` the two together timed as
  one call;
* ``fa3``: ``vllm.vllm_flash_attn.flash_attn_varlen_func(..., fa_version=3)`` as vLLM's
  FLASH_ATTN backend calls it; ``triton_unified``: ``unified_attention`` as TRITON_ATTN calls it.

``density`` is kept (query block, KV block) pairs, averaged over heads, over causal block pairs;
``tflops_effective`` = density * 4 * Hq * D * S(S+1)/2 / time (density 1 for the baselines).

Writes ``kernels-<card>-<date>.json`` under ``--out`` (default ``./bench-out/``) after every row,
a PNG next to it (``python -m benchmarks.harness.plots FILE`` redraws it), and prints a table last.
``--check`` first compares every kernel's output with ``kernels/reference.py`` (on a sample of
query blocks) at the smallest length, and the dense pattern with FA3 on the whole output.

CPU smoke run from the repository root (Triton interpreter; baselines are skipped):
    python -m benchmarks.ops.kernels --device cpu --seq-lens 256 --block-size 64 \
        --heads 4:2:64 --dtype fp32 --check
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

from benchmarks.harness import files, plots, provenance
from benchmarks.harness.report import Progress

DEFAULT_PATTERNS = "dense,hybrid,local,dynamic"
DEFAULT_KERNELS = "flashprefill,fa3,triton_unified,sdpa_cudnn,sdpa_flash"
KERNELS = ("flashprefill", "fa3", "triton_unified", "sdpa_cudnn", "sdpa_flash")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--seq-lens", default="8192,32768,131072",
                   help="comma-separated prompt lengths (tokens)")
    p.add_argument("--heads", default="32:8:128,14:2:64",
                   help="comma-separated head configs Hq:Hkv:D")
    p.add_argument("--patterns", default=DEFAULT_PATTERNS,
                   help="flashprefill patterns (dense, local, strided, hybrid, dynamic)")
    p.add_argument("--kernels", default=DEFAULT_KERNELS,
                   help="subset of " + ",".join(KERNELS) + " (sdpa_*: PyTorch SDPA pinned to "
                        "one backend over contiguous K/V, a dense baseline without vLLM)")
    p.add_argument("--page-size", type=int, default=16, help="KV cache page size (tokens)")
    p.add_argument("--block-size", type=int, default=128, help="FlashPrefill's sparse tile (option block_size)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (Triton interpreter)")
    p.add_argument("--threshold", type=float, default=0.1, help="dynamic: score threshold")
    p.add_argument("--sink-blocks", type=int, default=1)
    p.add_argument("--local-blocks", type=int, default=16)
    p.add_argument("--stride", type=int, default=16)
    p.add_argument("--page-order", default="shuffled", choices=["shuffled", "ascending"],
                   help="KV pages of the prompt: shuffled, or in order as a fresh engine allocates them")
    p.add_argument("--min-seq-len", type=int, default=0,
                   help="query blocks starting below this position run dense (the engine's default "
                        "is 8192; 0 times the pattern alone)")
    p.add_argument("--data", default="structured", choices=["structured", "random"],
                   help="structured plants hot KV blocks so dynamic selection is selective; "
                        "on random data every block scores alike and dynamic keeps them all")
    p.add_argument("--hot-frac", type=float, default=0.05,
                   help="structured data: fraction of (KV head, KV block) pairs made hot")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument("--min-reps", type=int, default=3, help="timed calls at least (median)")
    p.add_argument("--skip-unified-above", type=int, default=32768,
                   help="skip triton_unified for seq_len above this (0: never skip)")
    p.add_argument("--check", action="store_true",
                   help="validate every kernel at the smallest length before timing")
    p.add_argument("--check-blocks", type=int, default=8,
                   help="--check: query blocks compared with the torch reference")
    p.add_argument("--out", default=None, help="results .json, or a folder for "
                   f"kernels-<card>-<date>.json (default ./{files.DEFAULT_OUT_DIR}/)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    return p.parse_args(argv)


def parse_heads(text: str) -> list[tuple[int, int, int]]:
    heads = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 3:
            raise SystemExit(f"--heads: expected Hq:Hkv:D, got {item!r}")
        hq, hkv, d = map(int, parts)
        if hq % hkv:
            raise SystemExit(f"--heads: Hq {hq} is not a multiple of Hkv {hkv}")
        heads.append((hq, hkv, d))
    return heads


# The dense baseline that the speedup column divides by: the first one present.
SPEEDUP_BASES = ("fa3", "sdpa_cudnn", "sdpa_flash", "triton_unified")


def table(result: dict) -> str:
    rows = result["rows"]
    present = {r["kernel"] for r in rows}
    base_name = next((k for k in SPEEDUP_BASES if k in present), None)
    base = {(r["num_q_heads"], r["num_kv_heads"], r["head_dim"], r["seq_len"]): r["ms"]
            for r in rows if r["kernel"] == base_name}

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    head = f"{'heads':>9} {'S':>7} {'kernel/pattern':<22} {'dens':>6} {'ms':>9} {'TF/s':>6} " \
           f"{'sel_ms':>7} {'tot_ms':>9} {'speedup':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        key = (r["num_q_heads"], r["num_kv_heads"], r["head_dim"], r["seq_len"])
        t = r.get("total_ms", r["ms"])
        speedup = base[key] / t if key in base and t else None
        lines.append(
            f"{r['num_q_heads']:>3}/{r['num_kv_heads']}/{r['head_dim']:<3} {r['seq_len']:>7} "
            f"{plots.kernel_series(r):<22} {r['density']:>6.3f} {r['ms']:>9.3f} "
            f"{f(r.get('tflops_effective'), '6.1f'):>6} {f(r.get('selection_ms'), '7.3f'):>7} "
            f"{f(r.get('total_ms'), '9.3f'):>9} {f(speedup, '7.2f'):>7}"
        )
    lines.append(f"speedup = {base_name or 'no dense baseline'} ms / row ms (tot_ms for dynamic); "
                 "dens = kept/causal block pairs; TF/s = dens * causal FLOPs / ms")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cpu"):
        # Must be set before the kernels are imported (triton.jit reads it at decoration).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from benchmarks.ops import common
    from vllm_flashprefill.kernels import reference

    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but torch.cuda.is_available() is False (use --device cpu)")
        if device.index is not None:
            torch.cuda.set_device(device)
        else:
            device = torch.device("cuda", torch.cuda.current_device())
    dtype = common.DTYPES[args.dtype]
    seq_lens = sorted(int(s) for s in args.seq_lens.split(",") if s.strip())
    heads = parse_heads(args.heads)
    patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    for k in kernels:
        if k not in KERNELS:
            raise SystemExit(f"--kernels: unknown kernel {k!r}")
    cfgs = {
        p: common.make_config(
            p, args.block_size, sink_blocks=args.sink_blocks, local_blocks=args.local_blocks,
            stride=args.stride, threshold=args.threshold, min_seq_len=args.min_seq_len,
        )
        for p in (patterns if "flashprefill" in kernels else [])
    }

    baselines = {}
    for k in kernels:
        if k == "fa3":
            baselines[k] = common.fa3_status(device)
        elif k == "triton_unified":
            baselines[k] = common.unified_status(device)
        elif k.startswith("sdpa"):
            baselines[k] = common.sdpa_status(device, k)

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {
        **provenance.record(card),
        "page_size": args.page_size,
        "block_size": args.block_size,
        "dtype": args.dtype,
        "data": args.data,
        "hot_frac": args.hot_frac if args.data == "structured" else None,
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "rows": [],
        "skipped": [],
        "errors": [],
        "checks": [],
    }
    for name, (fn, reason) in baselines.items():
        if fn is None:
            result["skipped"].append({"kernel": name, "reason": reason})
    failures: list[str] = []

    per_config = len(cfgs) + sum(fn is not None for fn, _ in baselines.values())
    out_path = files.output_path(args.out, "kernels", card, result["date"])
    bar = Progress(per_config * len(seq_lens) * len(heads) + (len(heads) if args.check else 0), "kernels")
    t_start = time.time()

    def log(text: str) -> None:
        bar.write(text)

    def record_error(what: dict, e: BaseException) -> None:
        msg = f"{type(e).__name__}: {e}"
        result["errors"].append({**what, "error": msg[:2000], "traceback": traceback.format_exc()[-4000:]})
        failures.append(f"ERROR {what}: {msg[:300]}")
        log(f"ERROR {what}: {msg[:300]}")

    for hq, hkv, d in heads:
        for si, seq_len in enumerate(seq_lens):
            cfg_desc = dict(seq_len=seq_len, num_q_heads=hq, num_kv_heads=hkv, head_dim=d)
            bar.set_postfix_str(f"{hq}/{hkv}/{d} S={seq_len} data")
            b = common.make_batch([seq_len], [0], hq, hkv, d, args.page_size, dtype, device,
                                  seed=args.seed, shuffle_pages=args.page_order == "shuffled")
            if args.data == "structured":
                common.plant_structure(b, args.block_size, args.hot_frac, seed=args.seed)
            scale = d ** -0.5
            out = torch.empty_like(b.q)
            flops = common.causal_flops(hq, d, seq_len)

            def row(kernel, pattern, density, ms, **extra):
                r = dict(kernel=kernel, pattern=pattern, **cfg_desc, density=round(density, 6),
                         ms=ms, tflops_effective=density * flops / (ms * 1e-3) / 1e12)
                r.update(extra)
                result["rows"].append(r)
                files.write_json(out_path, result)

            calls = {}
            for pattern, cfg in cfgs.items():
                try:
                    calls[pattern] = common.LayerCall(b, cfg, scale)
                except Exception as e:  # noqa: BLE001
                    record_error(dict(kernel="flashprefill", pattern=pattern, **cfg_desc), e)

            if args.check and si == 0:
                bar.set_postfix_str(f"{hq}/{hkv}/{d} S={seq_len} check")
                try:
                    run_checks(args, b, calls, baselines, scale, result,
                               failures, cfg_desc, reference, log)
                except Exception as e:  # noqa: BLE001
                    record_error(dict(kernel="check", **cfg_desc), e)
                files.write_json(out_path, result)
                bar.update(1)

            timing = dict(device=device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
                          min_reps=args.min_reps)
            order = ([("fa3", None)] + [(k, None) for k in kernels if k.startswith("sdpa")]
                     + [("flashprefill", p) for p in cfgs] + [("triton_unified", None)])
            for kernel, pattern in order:
                if kernel == "flashprefill" and pattern not in calls:
                    continue
                if kernel != "flashprefill" and (kernel not in baselines or baselines[kernel][0] is None):
                    continue
                bar.set_postfix_str(f"{hq}/{hkv}/{d} S={seq_len} {kernel}{'/' + pattern if pattern else ''}")
                what = dict(kernel=kernel, pattern=pattern or "dense", **cfg_desc)
                if (kernel == "triton_unified" and args.skip_unified_above
                        and seq_len > args.skip_unified_above):
                    reason = f"seq_len > --skip-unified-above {args.skip_unified_above}"
                    result["skipped"].append({**what, "reason": reason})
                    bar.update(1)
                    continue
                try:
                    if kernel == "flashprefill":
                        call = calls[pattern]
                        lists = call.lists()
                        density = lists.density()
                        ms = common.bench(lambda: call.attend(lists, out), **timing)
                        if call.cfg.block_pattern.scores_content:  # selection runs in every layer
                            sel_ms = common.bench(call.lists, **timing)
                            total = common.bench(lambda: call.run(out), **timing)
                            # Where selection time goes: the scoring kernels alone, and the
                            # selection kernel on ready scores.
                            scores_ms = common.bench(call.scores, **timing)
                            lists_ms = common.bench(call.select, **timing)
                            row(kernel, pattern, density, ms, selection_ms=sel_ms, total_ms=total,
                                scores_ms=scores_ms, select_lists_ms=lists_ms)
                        else:
                            row(kernel, pattern, density, ms)
                    else:
                        call, _ = make_baseline(kernel, baselines[kernel][0], b, out, scale)
                        ms = common.bench(call, **timing)
                        row(kernel, "dense", 1.0, ms)
                except Exception as e:  # noqa: BLE001
                    if kernel.startswith("sdpa") and "no available kernel" in str(e).lower():
                        result["skipped"].append({**what, "reason": f"{type(e).__name__}: {e}"[:300]})
                        bar.update(1)
                        continue
                    record_error(what, e)
                    if device.type == "cuda":
                        try:
                            torch.cuda.synchronize()
                        except Exception:  # noqa: BLE001 - a sticky CUDA error: stop here
                            bar.close()
                            return finish(args, result, out_path, failures, t_start, fatal=True)
                bar.update(1)
            b = out = calls = None  # free this configuration's tensors
            if device.type == "cuda":
                torch.cuda.empty_cache()
    bar.close()
    return finish(args, result, out_path, failures, t_start)


def make_baseline(kernel, fn, b, out, scale):
    """(zero-argument timed call, getter of its output as [tokens, Hq, D]) for a baseline."""
    from benchmarks.ops import common

    if kernel == "fa3":
        return (lambda: common.fa3_attention(fn, b, out, scale)), (lambda: out)
    if kernel == "triton_unified":
        return (lambda: common.unified_attention(fn, b, out, scale)), (lambda: out)
    q4, k4, v4 = common.sdpa_inputs(b)
    held = {}

    def call():
        held["out"] = fn(q4, k4, v4, scale)

    return call, (lambda: held["out"][0].transpose(0, 1))


def run_checks(args, b, calls, baselines, scale, result, failures, cfg_desc,
               reference, log) -> None:
    """Every kernel vs the torch reference on a sample of query blocks; dense vs FA3 in full."""
    import torch

    from benchmarks.ops import common

    tight = b.q.dtype == torch.float32
    rel_tol, abs_tol = (1e-3, 1e-3) if tight else (1e-2, 3e-2)

    def report(name, against, d: common.Diff, rows):
        ok = d.ok(rel_tol, abs_tol * max(1.0, d.ref_max))
        result["checks"].append(dict(kernel=name, against=against, rows=rows, ok=ok,
                                     max_abs_err=d.max_abs, rel_l2_err=d.rel_l2,
                                     ref_max=d.ref_max, nonfinite=d.nonfinite, **cfg_desc))
        line = f"check {name:<24} vs {against:<9} rows={rows:<7} {d}  {'ok' if ok else 'FAIL'}"
        log(line)
        if not ok:
            failures.append(f"CHECK FAILED {cfg_desc}: {line}")

    dense_out = None
    for pattern, call in calls.items():
        out = torch.full_like(b.q, float("nan"))
        call.run(out)  # as the layer runs it; then the lists it attended, as a mask
        qb = call.query_blocks
        mask = call.lists().to_mask(qb.num_kv_blocks)
        blocks = common.pick_blocks(qb.num_blocks, args.check_blocks, seed=args.seed)
        rows = common.query_block_rows(qb.table_cpu, blocks).to(b.q.device)
        ref = reference.sparse_attention_reference(
            b.q, b.k_cache, b.v_cache, b.block_table, b.seq_lens,
            torch.from_numpy(qb.table_cpu[blocks]).to(b.q.device), mask[blocks], scale, qb.sparse_block,
        )
        report(f"flashprefill/{pattern}", "reference", common.diff(out[rows], ref[rows]), len(rows))
        unwritten = int(torch.isnan(out).any(-1).any(-1).sum())
        if unwritten:
            failures.append(f"CHECK FAILED {cfg_desc}: flashprefill/{pattern} left {unwritten} rows unwritten")
            log(f"check flashprefill/{pattern}: {unwritten} rows unwritten FAIL")
        if pattern == "dense":
            dense_out = out
    if not calls:
        return
    qb = next(iter(calls.values())).query_blocks
    dense_mask = torch.ones(qb.num_blocks, 1, qb.num_kv_blocks, dtype=torch.bool, device=b.q.device)
    blocks = common.pick_blocks(qb.num_blocks, args.check_blocks, seed=args.seed)
    rows = common.query_block_rows(qb.table_cpu, blocks).to(b.q.device)
    ref = None
    for name, (fn, _) in baselines.items():
        if fn is None:
            continue
        out = torch.full_like(b.q, float("nan"))
        try:
            call, get = make_baseline(name, fn, b, out, scale)
            call()
        except Exception as e:  # noqa: BLE001
            log(f"check {name}: could not run ({type(e).__name__}: {str(e)[:200]})")
            continue
        out = get()
        if ref is None:
            ref = reference.sparse_attention_reference(
                b.q, b.k_cache, b.v_cache, b.block_table, b.seq_lens,
                torch.from_numpy(qb.table_cpu[blocks]).to(b.q.device), dense_mask[blocks], scale, qb.sparse_block,
            )
        report(name, "reference", common.diff(out[rows], ref[rows]), len(rows))
        if dense_out is not None:  # the whole output, not a sample
            report("flashprefill/dense", name, common.diff(dense_out, out), out.shape[0])


def finish(args, result, out_path: Path, failures: list[str], t_start: float, fatal=False) -> int:
    result["wall_s"] = round(time.time() - t_start, 1)
    files.write_json(out_path, result)
    png = None if args.no_plot else plots.plot_kernels(result, str(out_path.with_suffix(".png")))
    print(table(result))
    for s in result["skipped"]:
        print(f"skipped: {s.get('kernel')} {s.get('seq_len', '')} {s.get('num_q_heads', '')}"
              f"{'/' if 'num_q_heads' in s else ''}{s.get('num_kv_heads', '')} - {s['reason']}"[:240])
    checks = result["checks"]
    if checks:
        bad = [c for c in checks if not c["ok"]]
        worst = max(checks, key=lambda c: c["rel_l2_err"])
        print(f"checks: {len(checks) - len(bad)}/{len(checks)} ok; worst rel_l2 "
              f"{worst['rel_l2_err']:.2e} ({worst['kernel']} vs {worst['against']}, "
              f"{worst['num_q_heads']}/{worst['num_kv_heads']}/{worst['head_dim']})")
    for f in failures:
        print(f[:400])
    print(f"JSON: {out_path}" + (f", PNG: {png}" if png else ""))
    print(f"wall {result['wall_s']} s; {len(result['rows'])} rows, {len(result['errors'])} errors"
          + ("; stopped early after a CUDA error" if fatal else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
