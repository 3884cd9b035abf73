"""Make a random-weight Qwen2 model directory, to exercise the Qwen2.5 code path without its weights.

    python scripts/make_test_model.py --out .models/tiny-qwen2                      # a few MB, for tests
    python scripts/make_test_model.py --shape qwen2.5-3b --dtype bfloat16 --out .models/qwen2.5-3b-random

The tiny shape uses the bundled model's ChatML tokenizer and its vocabulary size. The full shape has
Qwen2.5-3B-Instruct's exact architecture (3.1B parameters), so memory and speed measured on it are
what the real weights cost; its vocabulary is larger than the tokenizer's, which only matters for
the text of its (meaningless) output. Import the result with scripts/import_model.py --from DIR.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHAPES = {
    "tiny": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128
    ),
    "qwen2.5-3b": dict(
        hidden_size=2048,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        intermediate_size=11008,
        vocab_size=151936,
    ),
}
TOKENIZER_MODEL_ID = "smollm2-135m-instruct"


def tokenizer_source() -> str:
    import bentoml

    try:
        return bentoml.models.get(TOKENIZER_MODEL_ID).path
    except bentoml.exceptions.NotFound:
        sys.exit(f"the tokenizer comes from {TOKENIZER_MODEL_ID}; import it first: python scripts/import_model.py")


def make_model(shape: str, out: Path, dtype: str, seed: int) -> None:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source())
    dims = {"vocab_size": len(tokenizer), **SHAPES[shape]}
    config = Qwen2Config(
        **dims,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # made in its dtype: the 3B shape in float32 first would take 12 GB
    try:
        model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    config.dtype = dtype
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"wrote a random {shape} Qwen2 model ({parameters / 1e6:.1f}M parameters, {dtype}) to {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_model(args.shape, args.out, args.dtype, args.seed)


if __name__ == "__main__":
    main()
