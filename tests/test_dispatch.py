"""kernels/dispatch.py: which of our kernels computes the sparse rows (the Hopper kernel where it
can run them, else the portable one). The GPU suite runs both kernels; here the rules alone."""

import pytest
import torch

from vllm_flashprefill.kernels.attention import sparse_prefill_attention
from vllm_flashprefill.kernels.dispatch import choose_sparse_kernel

attention_hopper = pytest.importorskip("vllm_flashprefill.kernels.attention_hopper",
                                       reason="this Triton has no Gluon (or another Gluon API)")

GPU = torch.device("cuda", 0)


@pytest.mark.parametrize("sparse_kernel", ["auto", "hopper", "flash_attn"])
def test_hopper_kernel_is_chosen_where_it_runs(capability, sparse_kernel):
    capability(9)
    args = (GPU, torch.bfloat16, torch.bfloat16, 128, 64, 128, 4)
    assert choose_sparse_kernel(sparse_kernel, *args) == (attention_hopper.sparse_prefill_attention, None)


def test_portable_kernel_otherwise(capability):
    capability(9)
    kernel, reason = choose_sparse_kernel("triton", GPU, torch.bfloat16, torch.bfloat16, 128, 64, 128, 4)
    assert kernel is sparse_prefill_attention and "'triton'" in reason
    kernel, reason = choose_sparse_kernel("auto", GPU, torch.bfloat16, torch.float16, 128, 64, 128, 4)
    assert kernel is sparse_prefill_attention and "KV cache dtype" in reason
    kernel, reason = choose_sparse_kernel("hopper", GPU, torch.bfloat16, torch.bfloat16, 256, 64, 128, 4)
    assert kernel is sparse_prefill_attention and "head size 256" in reason
    capability(8)
    kernel, reason = choose_sparse_kernel("auto", GPU, torch.bfloat16, torch.bfloat16, 128, 64, 128, 4)
    assert kernel is sparse_prefill_attention and "sm_90" in reason


def test_a_failed_hopper_kernel_leaves_the_portable_one(capability):
    capability(9)
    args = (GPU, torch.bfloat16, torch.bfloat16, 128, 64, 128, 4)
    assert choose_sparse_kernel("auto", *args)[1] is None
    failure = "it failed its start-up run (CompilationError: ...)"
    assert choose_sparse_kernel("auto", *args, hopper_failure=failure) == (sparse_prefill_attention, failure)
