"""Tiny Hugging Face causal LMs built locally (no downloads).

The embedded default cannot fetch weights, so it trains a byte-level BPE tokenizer with
``tokenizers`` on the shipped corpus text and initializes a small Llama (or GPT-2)
model from a config. The result is an ordinary Hugging Face model directory that
``AutoModelForCausalLM`` / ``AutoTokenizer`` load like any hub model, chat template
included.

:func:`build_family_model` builds tiny random-weight models of hub families (Llama 3,
Qwen2, Mistral, GPT-2, Gemma, Phi-3) from their own ``transformers`` config classes, with
each family's special tokens, pad/eos conventions, tied or untied embeddings, rotary
scaling (Llama 3) and sliding windows (Mistral); the caller passes the family's chat
template (the tests keep them in ``tests/fixtures/chat_templates/``).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Optional

from pipeline import tables

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048, special_tokens: Optional[list[str]] = None,
                    bos: Optional[str] = "<|bos|>", eos: str = "<|end|>", pad: Optional[str] = "<|pad|>",
                    chat_template: Optional[str] = CHAT_TEMPLATE):
    """Train a byte-level BPE tokenizer and wrap it as a ``PreTrainedTokenizerFast``
    (defaults: the project's own tokens and template; a family passes its own)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # lazy: with transformers, below
    from transformers import PreTrainedTokenizerFast  # lazy: ~2 s to import; only building a model needs it

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens or SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=None,
    )
    fast.chat_template = chat_template
    fast.padding_side = "left"
    return fast


UNK = "<|unk|>"
# torch's default generator is process-wide: two threads building models at once (the quickstart builds the
# teacher and the students' base side by side) would interleave their draws, and a seed would no longer fix
# the weights (measured: the teacher's initial weights differed between two runs until this lock)
_INIT_LOCK = threading.Lock()


def _random_model(config: Any, seed: int):
    """A randomly initialized causal LM of ``config``, the same for the same seed in any thread."""
    import torch  # lazy: torch and transformers take ~5 s to import; only building a model needs them
    from transformers import AutoModelForCausalLM  # lazy: as torch

    with _INIT_LOCK:
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)


def train_word_tokenizer(texts: Iterable[str], special_tokens: Optional[list[str]] = None,
                         chat_template: Optional[str] = CHAT_TEMPLATE):
    """A word-level tokenizer whose vocabulary is exactly the pieces of ``texts``: one token per
    word (with its leading space, SentencePiece-style "▁word"), per punctuation mark, per newline
    and per number (a year is one token, as a name is: a tiny model copies and looks up one token far
    more easily than four digits; measured in benchmarks/results/probe_world.md).

    Decoding is lossless for any text made of known pieces (``decode(encode(t)) == t``), so the
    project's parsers read model output exactly; an unknown piece becomes ``<|unk|>``. Meant for a
    generated world whose every word is known (:mod:`pipeline.data.world`): a few hundred tokens
    where a byte-level BPE needs over a thousand to make each world word one token.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # lazy: as train_tokenizer
    from transformers import PreTrainedTokenizerFast  # lazy: as train_tokenizer

    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=True),
        pre_tokenizers.Punctuation(behavior="isolated"),
    ])
    pieces = {p for t in set(texts) for p, _ in pre.pre_tokenize_str(t)}
    # every word in both forms: at a line's start (no "▁") as well as inside it, so a word the texts only
    # ever show mid-line (a name) is still a known token where a turn begins with it (measured: without
    # this, the first name of every echoed list was <|unk|> and the students never learned to copy it)
    pieces |= {p[1:] if p.startswith("\u2581") else "\u2581" + p for p in pieces if p.strip("\u2581").isalpha()}
    specials = list(special_tokens or SPECIAL_TOKENS) + [UNK]
    vocab = {t: i for i, t in enumerate(specials + sorted(pieces - set(specials)))}  # sorted: ids independent of text order
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre
    tok.add_special_tokens(specials)  # the chat markers are one token each, never split into punctuation (and <|unk|>s)
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="never", split=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|end|>", pad_token="<|pad|>",
                                   unk_token=UNK, padding_side="left")
    fast.chat_template = chat_template
    return fast


def build_tiny_model(
    out_dir: str,
    texts: Iterable[str] = (),
    arch: Literal["llama", "gpt2"] = "llama",
    vocab_size: int = 2048,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 1024,
    seed: int = 0,
    tokenizer: Literal["bpe", "word"] = "bpe",
    tokenizer_from: Optional[str] = None,
) -> str:
    """Build and save a tiny randomly initialized causal LM + tokenizer in ``out_dir``.

    The tokenizer is trained on ``texts`` (``"bpe"``: byte-level BPE of ``vocab_size``; ``"word"``:
    :func:`train_word_tokenizer`, sized by the text), or loaded from ``tokenizer_from`` (a model or
    tokenizer directory) so that several models share one vocabulary: a teacher and its students,
    whose token figures are then counted with one tokenizer.
    """
    from transformers import AutoTokenizer, GPT2Config, LlamaConfig  # lazy: transformers takes seconds to import

    if tokenizer_from:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    elif tokenizer == "word":
        tokenizer = train_word_tokenizer(texts)
    else:
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
    model = _random_model(config, seed)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------- hub families
@dataclass(frozen=True)
class Family:
    """What a tiny model of a hub family needs: its config class, tokens and conventions."""

    config_class: str
    special_tokens: list[str]
    eos: str
    bos: Optional[str] = None
    pad: Optional[str] = None  # None: the family has no pad token (trainers and generate use eos)
    stop_tokens: tuple[str, ...] = ()  # extra generation stops (Gemma's <end_of_turn>, Phi-3's <|end|>)
    tie_word_embeddings: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # family-specific config fields
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")  # the attention projections' module names


FAMILIES: dict[str, Family] = {
    "llama": Family(  # Llama 3.x: header tokens, llama3 rotary scaling, tied embeddings (1B/3B)
        "LlamaConfig", ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
                        "<|finetune_right_pad_id|>"],
        eos="<|eot_id|>", bos="<|begin_of_text|>", pad="<|finetune_right_pad_id|>",
        extra={"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 128}},
    ),
    "qwen2": Family(  # ChatML, no bos, pad <|endoftext|>, tied embeddings (0.5B/1.5B), q/k/v biases
        "Qwen2Config", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos="<|im_end|>", pad="<|endoftext|>",
        extra={"use_sliding_window": False, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}},
    ),
    "mistral": Family(  # [INST] markers, no system role, no pad token, untied head, a sliding window
        "MistralConfig", ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], eos="</s>", bos="<s>",
        tie_word_embeddings=False, extra={"sliding_window": 32},
    ),
    "gpt2": Family(  # no chat template, bos = eos = <|endoftext|>, no pad, learned absolute positions
        "GPT2Config", ["<|endoftext|>"], eos="<|endoftext|>", bos="<|endoftext|>", lora_targets=("c_attn",),
    ),
    "gemma": Family(  # <start_of_turn>/<end_of_turn>, role "model", eos <eos> but turns end at <end_of_turn>
        "GemmaConfig", ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], eos="<eos>", bos="<bos>",
        pad="<pad>", stop_tokens=("<end_of_turn>",), extra={"hidden_activation": "gelu_pytorch_tanh"},
    ),
    "phi3": Family(  # <|user|>/<|end|> turns, <|endoftext|> after the last one, fused qkv projection
        "Phi3Config", ["<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        eos="<|endoftext|>", bos="<s>", pad="<|endoftext|>", stop_tokens=("<|end|>",), tie_word_embeddings=False,
        lora_targets=("qkv_proj",),
    ),
}


def family_config(family: str, tokenizer, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                  max_positions: int = 1024):
    """The family's ``transformers`` config for a tiny model with ``tokenizer``'s ids."""
    import transformers  # lazy: ~2 s to import; only building a model needs it

    spec = FAMILIES[family]
    ids = {"vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
           "bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id}
    cls = getattr(transformers, spec.config_class)
    if family == "gpt2":
        return cls(n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_positions=max_positions, **ids)
    kv_heads = max(1, num_heads // 2)  # grouped-query attention, as the hub models use
    return cls(hidden_size=hidden_size, intermediate_size=hidden_size * 3, num_hidden_layers=num_layers,
               num_attention_heads=num_heads, num_key_value_heads=kv_heads, head_dim=hidden_size // num_heads,
               max_position_embeddings=max_positions, tie_word_embeddings=spec.tie_word_embeddings,
               **spec.extra, **ids)


def build_family_model(out_dir: str, family: str, texts: Iterable[str], chat_template: Optional[str],
                       vocab_size: int = 512, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                       max_positions: int = 1024, seed: int = 0) -> str:
    """Build and save a tiny random-weight model of a hub ``family`` (a key of :data:`FAMILIES`)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    spec = FAMILIES[family]
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size, special_tokens=spec.special_tokens, bos=spec.bos,
                                eos=spec.eos, pad=spec.pad, chat_template=chat_template)
    tokenizer.padding_side = "right" if family == "qwen2" else "left"  # as the hub tokenizers ship
    model = _random_model(family_config(family, tokenizer, hidden_size, num_layers, num_heads, max_positions), seed)
    stops = [tokenizer.eos_token_id] + [tokenizer.convert_tokens_to_ids(t) for t in spec.stop_tokens]
    model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
    model.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    model.generation_config.bos_token_id = tokenizer.bos_token_id
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
    sys.exit(main())
