"""Supervised fine-tuning data: chat rows -> token ids with assistant-only labels -> batches.

Rows come from the ``select`` job: Parquet with ``id``, ``question_id``, ``dataset``,
``variant`` and ``messages`` (system?, user, assistant; the last, assistant turn is the
target).

Tokenization renders with :func:`pipeline.chat.render_chat`, the renderer serving uses (the
model's chat template, else a plain ``User: ...\\nAssistant: ...`` transcript). The prompt
length is found by rendering ``messages[:-1]`` with ``add_generation_prompt=True`` (what a
served student reads) and taking the common token prefix with the full rendering; every
token before it gets label ``-100``. An EOS is appended when the target does not already
contain one, then the example is truncated to ``max_length`` (counted; examples with no
target token left are dropped and counted).

Data loading choice: each Ray Train worker reads the (small) SFT Parquet with pyarrow,
tokenizes all of it and builds the *same* seeded batch plan for the epoch, then takes
every ``world_size``-th micro-batch (DistributedSampler-like, padded by wrap-around so
every rank runs the same number of steps, which DeepSpeed's collectives require). This
keeps length grouping / packing and the deterministic skip of already-trained batches on
resume simple and exact; Ray Data's streaming split gives no per-rank order guarantee.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from pipeline import tables
from pipeline.chat import render_chat
from pipeline.config import UsageError

IGNORE_INDEX = -100

# A batch is a list of rows; a row is a list of example indices (more than one when packed).
Row = list[int]
Batch = list[Row]


# ---------------------------------------------------------------- reading
def read_conversations(path: str) -> list[dict[str, Any]]:
    """The ``id`` and ``messages`` of every row of a Parquet dataset (local or s3://), in ``id``
    order (independent of file order); read with :func:`pipeline.tables.read_rows`."""
    names = tables.column_names(path)
    if "messages" not in names:
        raise UsageError(f"{path}: no 'messages' column (found {sorted(names)})")
    rows = tables.read_rows(path, columns=[c for c in ("id", "messages") if c in names])
    if "id" in names:
        rows.sort(key=lambda r: str(r["id"]))
    return rows


def corpus_from_rows(rows: Iterable[dict[str, Any]]) -> list[str]:
    """All message text, to train the tiny tokenizer on."""
    return [m["content"] for r in rows for m in r["messages"] if m.get("content")]


# ---------------------------------------------------------------- tokenization
def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize_messages(tokenizer, messages: Sequence[dict[str, str]], max_length: int) -> Example:
    """One conversation -> ids and labels (-100 everywhere but the final assistant turn)."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant turn (the target)")
    full_text = render_chat(tokenizer, messages, add_generation_prompt=False)
    prompt_text = render_chat(tokenizer, messages[:-1], add_generation_prompt=True)
    ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    prompt_len = _common_prefix(ids, prompt_ids)
    eos = tokenizer.eos_token_id
    if eos is not None and eos not in ids[prompt_len:]:
        ids = ids + [eos]
    labels = [IGNORE_INDEX] * prompt_len + list(ids[prompt_len:])
    truncated = len(ids) > max_length
    return Example(list(ids[:max_length]), labels[:max_length], truncated)


@dataclass
class TokenizedData:
    examples: list[Example] = field(default_factory=list)
    truncated_rows: int = 0
    dropped_rows: int = 0  # no target token left after truncation
    rows: int = 0

    @property
    def lengths(self) -> list[int]:
        return [len(e) for e in self.examples]

    def target_tokens(self) -> int:
        return sum(sum(1 for t in e.labels if t != IGNORE_INDEX) for e in self.examples)


def tokenize_rows(tokenizer, rows: Iterable[dict[str, Any]], max_length: int) -> TokenizedData:
    out = TokenizedData()
    seen: dict[tuple[tuple[str, str], ...], Example] = {}  # a corpus may repeat rows (the world's facts): render each once
    for r in rows:
        out.rows += 1
        key = tuple((m["role"], m["content"]) for m in r["messages"])
        ex = seen.get(key) or seen.setdefault(key, tokenize_messages(tokenizer, r["messages"], max_length))
        out.truncated_rows += int(ex.truncated)
        if all(t == IGNORE_INDEX for t in ex.labels):
            out.dropped_rows += 1
            continue
        out.examples.append(ex)
    return out


# ---------------------------------------------------------------- batch plans
def pack_sequences(order: Sequence[int], lengths: Sequence[int], max_length: int) -> list[Row]:
    """Greedily concatenate examples (in ``order``) into rows of at most ``max_length`` tokens."""
    rows: list[Row] = []
    current: Row = []
    used = 0
    for i in order:
        n = lengths[i]
        if current and used + n > max_length:
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        rows.append(current)
    return rows


def plan_epoch(
    lengths: Sequence[int],
    micro_batch_size: int,
    world_size: int,
    epoch: int,
    seed: int,
    mode: str = "group_by_length",
    max_length: int = 1024,
    shuffle: bool = True,
    mega_batch_multiplier: int = 32,
    shuffle_batches: bool = True,
) -> list[Batch]:
    """The global list of micro-batches for one epoch; identical on every rank (seeded).

    ``group_by_length`` sorts each mega-batch (``micro_batch_size * world_size * mega_batch_multiplier`` rows)
    longest first and cuts it into micro-batches, whose order is then shuffled in steps of ``world_size`` (the
    ranks of one step keep neighbouring lengths), the first mega-batch's longest step first (on a set within one
    mega-batch: the longest, so that memory runs out at once if it will); ``shuffle_batches=False`` keeps the
    sorted order."""
    order = list(range(len(lengths)))
    rng = random.Random(seed * 1_000_003 + epoch)
    if shuffle:
        rng.shuffle(order)
    if mode == "pack":
        rows = pack_sequences(order, lengths, max_length)
        return [rows[i : i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]
    if mode == "group_by_length":
        mega = micro_batch_size * world_size * mega_batch_multiplier
        grouped: list[int] = []
        for s in range(0, len(order), mega):
            grouped.extend(sorted(order[s : s + mega], key=lambda i: -lengths[i]))
        order = grouped
    elif mode != "none":
        raise ValueError(f"unknown pack_or_group mode {mode!r}")
    batches = [[[i] for i in order[s : s + micro_batch_size]] for s in range(0, len(order), micro_batch_size)]
    if mode == "group_by_length" and shuffle and shuffle_batches:
        # Why shuffle: a set that fits one mega-batch (the quickstart's students: 160-433 rows) otherwise runs the
        # same longest-to-shortest curriculum every epoch; through the recipe, S_D-T then guessed a chain question's
        # relation word per entity instead of copying it: 30-40 % exact decompositions of held-out chain questions
        # (3 seeds) against 43-89 % in shuffled steps (benchmarks/results/probe_batch_order.md).
        return _shuffled_steps(batches, world_size, rng)
    return batches


def _shuffled_steps(batches: list[Batch], world_size: int, rng: random.Random) -> list[Batch]:
    """``batches`` in steps of ``world_size`` consecutive micro-batches: the first step kept first and a partial
    last step kept last (the ranks' shares stay aligned), the full steps between them shuffled."""
    steps = [batches[s : s + world_size] for s in range(0, len(batches), world_size)]
    tail = steps.pop() if len(steps) > 1 and len(steps[-1]) < world_size else None
    middle = steps[1:]
    rng.shuffle(middle)
    return [b for step in steps[:1] + middle + ([tail] if tail else []) for b in step]


def shard_batches(batches: Sequence[Batch], rank: int, world_size: int, multiple_of: int = 1) -> list[Batch]:
    """This rank's micro-batches: every world_size-th, the list first padded by wrap-around so that
    every rank gets the same count, a multiple of ``multiple_of`` (gradient accumulation)."""
    if not batches:
        return []
    unit = world_size * multiple_of
    total = -(-len(batches) // unit) * unit
    padded = [batches[i % len(batches)] for i in range(total)]
    return padded[rank::world_size]


def shard_eval_batches(batches: Sequence[Batch], rank: int, world_size: int) -> list[tuple[Batch, bool]]:
    """Validation shard: (batch, counts) pairs, equal length on every rank; padding batches don't count."""
    total = -(-len(batches) // world_size) * world_size if batches else 0
    out = []
    for i in range(rank, total, world_size):
        out.append((batches[i % len(batches)], i < len(batches)))
    return out


# ---------------------------------------------------------------- collate
def collate(examples: Sequence[Example], batch: Batch, pad_id: int, pack: bool = False) -> dict[str, Any]:
    """Right-padded tensors for one micro-batch.

    Unpacked rows get an ``attention_mask``. Packed rows get ``position_ids`` restarting at 0
    for every example (and for the padding tail) and no attention mask, which makes
    Hugging Face models build a block-diagonal causal mask (call the model with
    ``use_cache=False``), so packed examples don't attend to each other; labels keep each
    example's own prompt masking.
    """
    ids_rows, label_rows, pos_rows = [], [], []
    for row in batch:
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        for i in row:
            ex = examples[i]
            ids.extend(ex.input_ids)
            labels.extend(ex.labels)
            pos.extend(range(len(ex.input_ids)))
        ids_rows.append(ids)
        label_rows.append(labels)
        pos_rows.append(pos)
    width = max(len(r) for r in ids_rows)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels_t = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    position = torch.zeros((len(batch), width), dtype=torch.long)
    for b, (ids, labels, pos) in enumerate(zip(ids_rows, label_rows, pos_rows)):
        n = len(ids)
        input_ids[b, :n] = torch.tensor(ids, dtype=torch.long)
        labels_t[b, :n] = torch.tensor(labels, dtype=torch.long)
        attention[b, :n] = 1
        position[b, :n] = torch.tensor(pos, dtype=torch.long)
        position[b, n:] = torch.arange(width - n)
    out: dict[str, Any] = {"input_ids": input_ids, "labels": labels_t}
    if pack:
        out["position_ids"] = position
    else:
        out["attention_mask"] = attention
    return out


def causal_lm_loss(model: Any, tensors: dict[str, Any]) -> torch.Tensor:
    """The mean next-token loss over a collated batch's labelled tokens, as the model's own ``labels=`` loss
    computes it, with the output layer applied only at the positions where some row of the batch has a label
    (Hugging Face's ``logits_to_keep``). A chat row's prompt carries no labels, yet its logits (a matmul and a
    softmax over the whole vocabulary) are most of a small model's step: the quickstart teacher's corpus labels
    36 % of its tokens, its batches 45 % of their positions (benchmarks/bench_labelled_logits)."""
    targets = tensors["labels"][:, 1:]
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    inputs = {k: v for k, v in tensors.items() if k != "labels"}
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits.float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[:, keep].reshape(-1),
                                             ignore_index=IGNORE_INDEX)


def real_tokens(examples: Sequence[Example], batch: Batch) -> int:
    return sum(len(examples[i]) for row in batch for i in row)


def target_tokens(examples: Sequence[Example], batch: Batch) -> int:
    return sum(sum(1 for t in examples[i].labels if t != IGNORE_INDEX) for row in batch for i in row)

