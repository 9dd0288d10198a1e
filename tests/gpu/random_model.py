"""Give a model folder seeded random weights, so that engines with different parallel layouts
load the same numbers (``--load-format dummy`` draws each tensor-parallel shard on its own).

    python3 .devkit/tools/mkmodel.py /tmp/rand tiny       # config + tokenizer
    python3 tests/gpu/random_model.py /tmp/rand           # Llama, 16 q / 4 kv heads, d 128, 4 layers

Weights follow transformers' initialisation (normal, std ``--init-std``): attention logits of
order one, so attention, and which blocks it keeps, matters to the output.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--init-std", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    config_path = os.path.join(args.model_dir, "config.json")
    base = json.load(open(config_path))
    config = LlamaConfig(
        hidden_size=2048, intermediate_size=4096, num_hidden_layers=args.layers,
        num_attention_heads=16, num_key_value_heads=4, head_dim=128, vocab_size=base["vocab_size"],
        max_position_embeddings=base["max_position_embeddings"], rope_theta=base["rope_theta"],
        rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=args.init_std,
        bos_token_id=base["bos_token_id"], eos_token_id=base["eos_token_id"], torch_dtype="bfloat16",
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(args.model_dir, safe_serialization=True)
    print("wrote", args.model_dir, sum(p.numel() for p in model.parameters()) / 1e6, "M parameters")


if __name__ == "__main__":
    main()
