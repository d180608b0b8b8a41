"""A tiny model that has learned the method's two reply formats, for tests that need parseable answers.

An untrained tiny model writes text that no parser reads, so a test comparing two paths through the method
would compare empty decompositions and missing answers. This trains the project's tiny Llama
(:func:`pipeline.tiny_models.build_tiny_model`) with a plain PyTorch loop, in process and in seconds, on the
decomposer's and the solver's zero-shot prompts (:mod:`pipeline.prompts`, rendered as every backend renders
them) with GSM8K socratic gold as the replies: "1. ..." lists and "A1: ... The answer is: N". It learns the
formats, not arithmetic; its answers are mostly wrong, which is fine for what the tests compare.
"""

from __future__ import annotations

import os
import random

from pipeline.chat import render_chat
from pipeline.backends.reference import gold_pairs
from pipeline.data import SourceConfig, load_questions
from pipeline.parsing import format_subquestions
from pipeline.prompts import decomposer_messages, format_solver_output, solver_messages
from pipeline.tiny_models import build_tiny_model

SAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "samples")


def two_stage_examples(limit: int = 48) -> list[tuple[list[dict], str]]:
    """(zero-shot prompt, gold reply) for the decomposer and the solver of ``limit`` GSM8K train questions."""
    good, _ = load_questions(SourceConfig(dataset="gsm8k", path=os.path.join(SAMPLES, "gsm8k", "train_socratic.jsonl"),
                                          split="train", limit=limit))
    out = []
    for q in good:
        row = q.to_row()
        subqs, subas = gold_pairs(row)
        out.append((decomposer_messages(row, few_shot=False), format_subquestions(subqs)))
        out.append((solver_messages(row, subqs, few_shot=False), format_solver_output(subas, row["answers"][0])))
    return out


def train_two_stage_model(out_dir: str, steps: int = 300, batch: int = 8, lr: float = 3e-3, seed: int = 0) -> str:
    """Build the tiny model in ``out_dir``, train it on :func:`two_stage_examples` (loss on the replies only)
    and save it there; returns ``out_dir``. 300 steps of 8 sequences (~250 tokens each) take ~20 s on an idle
    core here; the replies parse after them (measured: every decomposition of 6 test questions parsed)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    examples = two_stage_examples()
    texts = [m["content"] for msgs, _ in examples for m in msgs] + [reply for _, reply in examples]
    build_tiny_model(out_dir, texts, vocab_size=1024, hidden_size=64, num_layers=2, seed=seed)
    tok = AutoTokenizer.from_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    sequences = []
    for msgs, reply in examples:
        prompt = tok(render_chat(tok, msgs), add_special_tokens=False)["input_ids"]
        target = tok(reply, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        sequences.append((prompt + target, [-100] * len(prompt) + target))
    torch.manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        picked = rng.sample(sequences, batch)
        width = max(len(ids) for ids, _ in picked)
        ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s, _ in picked])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in picked])
        mask = torch.arange(width)[None, :] < torch.tensor([len(s) for s, _ in picked])[:, None]
        loss = model(input_ids=ids, attention_mask=mask.long(), labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
