"""Tiny Hugging Face causal LMs built locally (no downloads).

The embedded default cannot fetch weights, so it trains a byte-level BPE tokenizer with
``tokenizers`` on the shipped corpus text and initializes a small Llama (or GPT-2)
model from a config. The result is an ordinary Hugging Face model directory that
``AutoModelForCausalLM`` / ``AutoTokenizer`` load like any hub model, chat template
included.
"""

from __future__ import annotations

import os
from typing import Iterable, Literal

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048):
    """Train a byte-level BPE tokenizer and wrap it as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def build_tiny_model(
    out_dir: str,
    texts: Iterable[str],
    arch: Literal["llama", "gpt2"] = "llama",
    vocab_size: int = 2048,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 1024,
    seed: int = 0,
) -> str:
    """Build and save a tiny randomly initialized causal LM + tokenizer in ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(seed)
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    common = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "llama":
        config = LlamaConfig(
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 4,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            max_position_embeddings=max_positions,
            tie_word_embeddings=True,
            **common,
        )
    else:
        config = GPT2Config(n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_positions=max_positions, **common)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def corpus_texts(rows: Iterable[dict]) -> list[str]:
    """Text to train the tiny tokenizer on: questions, contexts, answers, subquestions."""
    out: list[str] = []
    for r in rows:
        for key in ("question", "context"):
            if r.get(key):
                out.append(r[key])
        for key in ("answers", "gold_subquestions", "gold_subanswers"):
            out.extend(r.get(key) or [])
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.tiny_models --out DIR [--from PREPARED]``: build a tiny model offline."""
    import argparse

    from pipeline import tables

    parser = argparse.ArgumentParser(prog="python -m pipeline.tiny_models", description=main.__doc__)
    parser.add_argument("--out", required=True, help="model directory to write")
    parser.add_argument("--from", dest="source", default="runs/prepare", help="prepared questions to train the tokenizer on")
    parser.add_argument("--arch", default="llama", choices=["llama", "gpt2"])
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args(argv)
    build_tiny_model(args.out, corpus_texts(tables.iter_rows(args.source)), arch=args.arch, vocab_size=args.vocab_size,
                     hidden_size=args.hidden_size, num_layers=args.layers)
    print(f"tiny {args.arch} model written to {args.out}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
