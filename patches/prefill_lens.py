"""The model runners publish, per request of the step they prepare, how far its prefill reaches.

vLLM (0.26 to 0.33) hands an attention builder no prompt length, so the builder cannot tell a
prompt's last chunk from the others. Both GPU model runners know it, and use it to drop the token
sampled after a chunk that does not end its prompt:
- the V1 runner (``vllm/v1/worker/gpu_model_runner.py``), in ``_prepare_inputs``:
  ``discard_request_mask`` (sequence length < the request's ``num_tokens``), over the rows of
  ``input_batch`` (``num_tokens_no_spec``: prompt plus output tokens), whose order the step's
  ``CommonAttentionMetadata`` keeps;
- the V2 runner (``vllm/v1/worker/gpu/model_runner.py``, the default for most models since 0.26),
  whose ``prepare_inputs`` returns an ``InputBatch`` with ``prefill_len_np`` (prompt, plus the
  output tokens of a request resumed after preemption) in the metadata's row order.
Each input preparation is wrapped here to publish those lengths (``compat.publish_prefill_lens``)
for the builder that runs next in the same step; the builder checks that the batch it gets is the
one published (``compat.prefill_lens``). A runner whose fields differ publishes nothing, and every
chunk then keeps its dense tail, as without this patch.
"""

from __future__ import annotations

import functools
import sys

import numpy as np
from vllm.logger import init_logger

from .. import compat

logger = init_logger("vllm.flashprefill")

_MARK = "_flashprefill_publishes_prefill_lens"


def install() -> None:
    """Wrap the input preparation of the runner classes this process has imported (a builder is
    made by a runner, so its module is loaded by then). Idempotent."""
    v1 = sys.modules.get("vllm.v1.worker.gpu_model_runner")
    if v1 is not None:
        _wrap(v1.GPUModelRunner, "_prepare_inputs", lambda runner, _: v1_prefill_lens(runner))
    v2 = sys.modules.get("vllm.v1.worker.gpu.model_runner")
    if v2 is not None:
        _wrap(v2.GPUModelRunner, "prepare_inputs", v2_prefill_lens)


def _wrap(cls, name: str, read) -> None:
    prepare = getattr(cls, name, None)
    if prepare is None or getattr(prepare, _MARK, False):
        return

    @functools.wraps(prepare)
    def prepare_and_publish(runner, *args, **kwargs):
        compat.publish_prefill_lens(None)
        result = prepare(runner, *args, **kwargs)
        try:
            lens = read(runner, result)
        except (AttributeError, TypeError, IndexError, ValueError) as e:
            lens = None
            logger.warning_once("FlashPrefill: cannot read prompt lengths from %s.%s (%s); every prefill "
                           "chunk keeps a dense tail", cls.__name__, name, e)
        compat.publish_prefill_lens(lens)
        return result

    setattr(prepare_and_publish, _MARK, True)
    setattr(cls, name, prepare_and_publish)


def v1_prefill_lens(runner) -> compat.PublishedPrefillLens:
    n = runner.input_batch.num_reqs
    short = runner.discard_request_mask.np[:n].astype(bool)  # the runner samples no token
    return compat.PublishedPrefillLens(
        query_start_loc=runner.query_start_loc.np[: n + 1].copy(),
        seq_lens=runner.optimistic_seq_lens_cpu[:n].numpy().copy(),
        prefill_lens=np.where(short, runner.input_batch.num_tokens_no_spec[:n], 0),
    )


def v2_prefill_lens(runner, batch) -> compat.PublishedPrefillLens | None:
    if getattr(runner, "pcp_manager", None) is not None:
        return None  # prefill context parallelism splits each request's rows over the ranks
    n = batch.num_reqs
    seq_lens = batch.seq_lens_cpu_upper_bound[:n].numpy().copy()
    prefill = np.asarray(batch.prefill_len_np[:n])
    return compat.PublishedPrefillLens(
        query_start_loc=np.asarray(batch.query_start_loc_np[: n + 1]).copy(),
        seq_lens=seq_lens,
        prefill_lens=np.where(seq_lens < prefill, prefill, 0),
    )
