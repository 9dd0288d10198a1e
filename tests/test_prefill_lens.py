"""How the builder learns which chunk ends a prompt: the model runners publish their prefill
lengths while preparing a step (patches/prefill_lens.py), and ``compat.prefill_lens`` hands them to
the builder of that same batch only. Against vLLM 0.32's classes (CI: also 0.33's on CPU); 0.26's
runners have the same fields (checked by reading its source, not here)."""

import dataclasses
import inspect
import threading
import types

import numpy as np
import pytest
import torch
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.worker import gpu_model_runner as v1_runner
from vllm.v1.worker.gpu import model_runner as v2_runner
from vllm.v1.worker.gpu.input_batch import InputBatch, InputBuffers
from vllm.v1.worker.gpu_input_batch import InputBatch as V1InputBatch

from vllm_flashprefill import compat
from vllm_flashprefill.patches import prefill_lens as patch

# Decode-first order: a decode, the middle chunk of a long prompt, the last chunk of another,
# and a prompt scheduled whole.
QUERY_LENS = [1, 2048, 700, 300]
CONTEXT_LENS = [900, 4096, 8192, 0]
PROMPT_LENS = [800, 20000, 8892, 300]  # the decode's prompt lies behind it


@pytest.fixture(autouse=True)
def nothing_published():
    compat.publish_prefill_lens(None)
    yield
    compat.publish_prefill_lens(None)


def v2_batch(query_lens=QUERY_LENS, context_lens=CONTEXT_LENS, prompt_lens=PROMPT_LENS) -> InputBatch:
    """A real V2 ``InputBatch`` with these rows (its dummy, refilled as ``prepare_inputs`` fills it)."""
    n = len(query_lens)
    dummy = InputBatch.make_dummy(n, sum(query_lens), InputBuffers(8, 16384, torch.device("cpu")))
    seq_lens = np.add(context_lens, query_lens).astype(np.int32)
    return dataclasses.replace(
        dummy,
        num_scheduled_tokens=np.asarray(query_lens, dtype=np.int32),
        query_start_loc_np=np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int32),
        seq_lens_cpu_upper_bound=torch.from_numpy(seq_lens),
        num_computed_tokens_np=np.asarray(context_lens, dtype=np.int32),
        prefill_len_np=np.asarray(prompt_lens, dtype=np.int32),
    )


def v2_metadata(batch: InputBatch, padded_reqs: int = 0) -> CommonAttentionMetadata:
    """The step's metadata as the V2 runner makes it from ``batch`` (model_states/default.py),
    with ``padded_reqs`` empty rows as in full CUDA-graph mode."""
    n = batch.num_reqs + padded_reqs
    qsl = np.concatenate([batch.query_start_loc_np, np.full(padded_reqs, batch.query_start_loc_np[-1])])
    seq_lens = torch.cat([batch.seq_lens_cpu_upper_bound, torch.zeros(padded_reqs, dtype=torch.int32)])
    return CommonAttentionMetadata(
        query_start_loc=torch.from_numpy(qsl), query_start_loc_cpu=torch.from_numpy(qsl),
        seq_lens=seq_lens, seq_lens_cpu_upper_bound=seq_lens, num_reqs=n,
        num_actual_tokens=int(qsl[-1]), max_query_len=max(QUERY_LENS), max_seq_len=int(seq_lens.max()),
        block_table_tensor=torch.zeros(n, 1, dtype=torch.int32), slot_mapping=torch.zeros(int(qsl[-1])),
    )


def test_v2_runner_publishes_where_each_prefill_ends():
    batch = v2_batch()
    compat.publish_prefill_lens(patch.v2_prefill_lens(types.SimpleNamespace(pcp_manager=None), batch))
    # Only the middle chunk stops short of its prompt; the runner samples from the other rows.
    assert compat.prefill_lens(v2_metadata(batch)).tolist() == [0, 20000, 0, 0]
    # Padding rows (full CUDA graphs) are empty and hold 0 as well.
    assert compat.prefill_lens(v2_metadata(batch, padded_reqs=2)).tolist() == [0, 20000, 0, 0, 0, 0]


def test_v2_runner_with_prefill_context_parallelism_publishes_nothing():
    assert patch.v2_prefill_lens(types.SimpleNamespace(pcp_manager=object()), v2_batch()) is None


def test_v1_runner_publishes_the_prefills_it_samples_no_token_from():
    """V1: rows in the runner's ``discard_request_mask`` stop short of ``num_tokens_no_spec``."""
    n = len(QUERY_LENS)
    seq_lens = np.add(CONTEXT_LENS, QUERY_LENS)
    runner = types.SimpleNamespace(
        input_batch=types.SimpleNamespace(num_reqs=n, num_tokens_no_spec=np.array(PROMPT_LENS + [0, 0])),
        query_start_loc=types.SimpleNamespace(np=np.concatenate([[0], np.cumsum(QUERY_LENS), [3049, 3049]])),
        optimistic_seq_lens_cpu=torch.tensor(list(seq_lens) + [0, 0]),
        discard_request_mask=types.SimpleNamespace(np=np.array([False, True, False, False, True, True])),
    )
    lens = patch.v1_prefill_lens(runner)
    assert lens.prefill_lens.tolist() == [0, 20000, 0, 0]
    assert lens.seq_lens.tolist() == seq_lens.tolist()
    # The runner reuses its buffers (a dummy run rewrites them): the published arrays are copies.
    runner.query_start_loc.np[1] = 7
    assert lens.query_start_loc.tolist() == [0, 1, 2049, 2749, 3049]


def test_v1_runner_fields_the_patch_reads():
    prepare = inspect.getsource(v1_runner.GPUModelRunner._prepare_inputs)
    for field in ("self.discard_request_mask.np[:num_reqs]", "self.optimistic_seq_lens_cpu[:num_reqs]",
                  "self.query_start_loc.np[1 : num_reqs + 1]"):
        assert field in prepare
    assert "self.num_tokens_no_spec =" in inspect.getsource(V1InputBatch.__init__)


def test_another_batch_gets_nothing():
    """A dummy or capture run after a real step, or a batch split since, is not the batch the
    runner published: every chunk then keeps its dense tail."""
    batch = v2_batch()
    compat.publish_prefill_lens(patch.v2_prefill_lens(types.SimpleNamespace(), batch))
    assert compat.prefill_lens(v2_metadata(v2_batch(context_lens=[900, 4096, 8192, 64]))) is None
    assert compat.prefill_lens(v2_metadata(v2_batch(query_lens=[1, 2000, 748, 300]))) is None
    first_rows = v2_batch(QUERY_LENS[:2], CONTEXT_LENS[:2], PROMPT_LENS[:2])
    assert compat.prefill_lens(v2_metadata(first_rows)) is None
    compat.publish_prefill_lens(None)
    assert compat.prefill_lens(v2_metadata(batch)) is None


def test_published_lengths_stay_with_the_thread_that_prepared_the_step():
    batch = v2_batch()
    other = threading.Thread(
        target=compat.publish_prefill_lens, args=(patch.v2_prefill_lens(types.SimpleNamespace(), batch),))
    other.start()
    other.join()
    assert compat.prefill_lens(v2_metadata(batch)) is None


def test_wrapped_preparation_publishes_after_the_runner_prepared():
    class Runner:
        pcp_manager = None

        def prepare_inputs(self, batch):
            assert compat.prefill_lens(v2_metadata(batch)) is None, "the previous step's lengths are gone"
            return batch

    patch._wrap(Runner, "prepare_inputs", patch.v2_prefill_lens)
    patch._wrap(Runner, "prepare_inputs", patch.v2_prefill_lens)  # once only
    batch = v2_batch()
    compat.publish_prefill_lens(patch.v2_prefill_lens(Runner(), batch))
    assert Runner().prepare_inputs(batch) is batch
    assert compat.prefill_lens(v2_metadata(batch)).tolist() == [0, 20000, 0, 0]
    assert not hasattr(Runner.prepare_inputs.__wrapped__, "__wrapped__")


def test_a_runner_whose_fields_differ_publishes_nothing():
    class Runner:
        def prepare_inputs(self, batch):
            return batch

    patch._wrap(Runner, "prepare_inputs", patch.v2_prefill_lens)
    assert Runner().prepare_inputs(types.SimpleNamespace(num_reqs=1)) is not None
    assert compat.prefill_lens(v2_metadata(v2_batch())) is None


def test_install_wraps_both_runners_of_this_vllm(monkeypatch):
    for cls, name in ((v1_runner.GPUModelRunner, "_prepare_inputs"), (v2_runner.GPUModelRunner, "prepare_inputs")):
        monkeypatch.setattr(cls, name, getattr(cls, name))  # restored after the test
    compat.watch_prefill_lens()
    compat.watch_prefill_lens()
    for prepare in (v1_runner.GPUModelRunner._prepare_inputs, v2_runner.GPUModelRunner.prepare_inputs):
        assert getattr(prepare, patch._MARK)
        assert not hasattr(prepare.__wrapped__, patch._MARK), "wrapped twice"
