"""Write vllm_flashprefill/demo_model/tokenizer.json and tokenizer_config.json (run from the repo root).

The demo model runs with random (dummy) weights, so its tokenizer only has to turn any text into
token ids and back: a byte-level BPE (every byte is a token, so any prompt encodes) with a few
hundred merges learnt from the repository's LICENSE, small enough to keep in git (~20 KB).
It needs the `tokenizers` library (a vLLM dependency). The output is deterministic; re-run it
only to change the tokenizer.
"""

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "vllm_flashprefill" / "demo_model"
VOCAB_SIZE = 512  # 2 special tokens + 256 bytes + 254 merges
BOS, EOS = "<s>", "</s>"  # ids 0 and 1, as config.json's bos/eos_token_id say


def main() -> None:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(ROOT / "LICENSE")], trainer)
    assert [tokenizer.token_to_id(t) for t in (BOS, EOS)] == [0, 1]
    OUT.mkdir(exist_ok=True)
    tokenizer.save(str(OUT / "tokenizer.json"))
    # PreTrainedTokenizerFast: a class every transformers release that vLLM 0.26-0.33 uses knows.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
              "model_max_length": 131072}
    (OUT / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {OUT}/tokenizer.json ({tokenizer.get_vocab_size()} tokens) and tokenizer_config.json")


if __name__ == "__main__":
    main()
