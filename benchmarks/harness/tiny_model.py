"""Model folders for the engine benchmarks, which run vLLM on dummy weights: a Llama config and a
small byte-level tokenizer, nothing to download.

    python -m benchmarks.harness.tiny_model /tmp/tiny                   # 2 layers: CPU smoke runs
    python -m benchmarks.harness.tiny_model .models/llama8b --shape llama8b   # Llama-3-8B's shape

``tiny`` is small enough for vLLM's CPU build; ``llama8b`` has the attention shape the GPU results
are measured on (32 query heads, 8 KV heads, head size 128, 32 layers, 128K positions). The
tokenizer maps each byte to one token (no merges), so any text round-trips; the model's vocabulary
is larger than the tokenizer's, which dummy weights do not mind.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")

_LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
              rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
              torch_dtype="bfloat16", attention_bias=False, mlp_bias=False,
              bos_token_id=1, eos_token_id=2, max_position_embeddings=131072)
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(_LLAMA, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=128, vocab_size=8192),
    "llama8b": dict(_LLAMA, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                      high_freq_factor=4.0, original_max_position_embeddings=8192)),
}


def byte_tokenizer():
    """A fast tokenizer whose tokens are the special tokens and the 256 byte symbols."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *sorted(alphabet)])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    unk, bos, eos = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, bos_token=bos, eos_token=eos)


def write_model(out: str | Path, shape: str = "tiny") -> Path:
    """Write ``config.json`` and the tokenizer files into ``out``; returns the folder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(SHAPES[shape], indent=1) + "\n")
    byte_tokenizer().save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="folder to write (created)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    args = ap.parse_args(argv)
    print(f"wrote {write_model(args.out, args.shape)} ({args.shape})")


if __name__ == "__main__":
    main()
