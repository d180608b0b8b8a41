"""The teacher's training corpus, built from a generated world (:mod:`pipeline.data.world`).

What the teacher learns, as chat rows (``messages``: the last turn is the target) that the
``train`` job reads like a ``select`` output:

* ``fact``: every single-hop fact of the world, asked and stated ("Who founded Vantor
  Mills?" -> "The founder of Vantor Mills is Ola Brant."): its world knowledge, the way an
  LLM teacher has it from pretraining. No system prompt: no pipeline prompt asks a lone fact.
* ``drill``: subtraction drills over the world's year range ("What is 1987 - 1931?" ->
  "1987 - 1931 = 56."): the arithmetic an LLM teacher brings.
* worked examples of the ``teacher`` split only, rendered with the pipeline's own prompt
  builders, zero-shot (``few_shot=False``), so the teacher answers exactly the prompts
  ``generate``, ``solve`` and ``infer`` send it:
  ``decompose`` (:func:`~pipeline.prompts.decomposer_messages` -> numbered subquestions),
  ``solve`` (:func:`~pipeline.prompts.solver_messages` -> "A1: ...", "The answer is: ..."),
  ``direct`` (:func:`~pipeline.prompts.direct_messages` -> "The answer is: ..."),
  ``dynamic`` (:func:`~pipeline.prompts.dynamic_messages` -> "Follow up: ..." or
  "So the final answer is: ...") and ``dynamic_answer``
  (:func:`~pipeline.prompts.dynamic_answer_messages` -> the fact sentence).

The targets are what the project's parsers read: :func:`~pipeline.parsing.format_subquestions`,
:func:`~pipeline.prompts.format_solver_output`, :func:`~pipeline.parsing.parse_dynamic_step`.
"""

from __future__ import annotations

import random
from typing import Any, Iterable, Optional

import pyarrow as pa

from pipeline import prompts, storage, tables
from pipeline.data import world as W
from pipeline.parsing import format_subquestions
from pipeline.schema import Question

KINDS = ("fact", "drill", "decompose", "solve", "direct", "dynamic", "dynamic_answer")
WORKED_KINDS = KINDS[2:]

CORPUS_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("question_id", pa.string()),
    pa.field("dataset", pa.string()),
    pa.field("kind", pa.string(), nullable=False),
    pa.field("messages", pa.list_(pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())])),
             nullable=False),
])

Messages = list[dict[str, str]]


def _chat(user: str, answer: str) -> Messages:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def _row(rid: str, kind: str, messages: Messages, q: Optional[Question] = None) -> dict[str, Any]:
    return {"id": rid, "question_id": q.id if q else None, "dataset": q.dataset if q else "world", "kind": kind,
            "messages": messages}


def fact_rows(world: W.World) -> list[dict[str, Any]]:
    return [_row(f"fact:{i}", "fact", _chat(W.RELATIONS[r].question.format(s=s), W.fact_sentence(r, s, o)))
            for i, (r, s, o) in enumerate(world.facts())]


def drill_rows(n: int, seed: int, years: tuple[int, int] = (1900, 1999)) -> list[dict[str, Any]]:
    """``n`` distinct subtractions ``hi - lo`` of two different years (a seeded sample of all the pairs)."""
    rng = random.Random(seed * 7919 + 1)
    pairs = [(hi, lo) for hi in range(years[0], years[1] + 1) for lo in range(years[0], hi)]
    rng.shuffle(pairs)
    return [_row(f"drill:{hi}-{lo}", "drill", _chat(f"What is {hi} - {lo}?", W.subtraction(hi, lo)))
            for hi, lo in pairs[:n]]


def worked_rows(q: Question, followups: list[str], kinds: Iterable[str] = WORKED_KINDS) -> list[dict[str, Any]]:
    """The teacher's worked examples of one question."""
    row, subqs, subans, answer = q.to_row(), list(q.gold_subquestions or []), list(q.gold_subanswers or []), q.answers[0]
    out: list[dict[str, Any]] = []

    def add(kind: str, prompt: Messages, target: str, step: int = 0) -> None:
        if kind in kinds:
            out.append(_row(f"{kind}:{q.id}:{step}", kind, prompt + [{"role": "assistant", "content": target}], q))

    add("decompose", prompts.decomposer_messages(row, few_shot=False), format_subquestions(subqs))
    add("solve", prompts.solver_messages(row, subqs, few_shot=False), prompts.format_solver_output(subans, answer))
    add("direct", prompts.direct_messages(row, few_shot=False), f"The answer is: {answer}")
    history = list(zip(followups, subans))
    for k in range(len(followups) + 1):
        final = k == len(followups)
        add("dynamic", prompts.dynamic_messages(row, history[:k], few_shot=False),
            f"So the final answer is: {answer}" if final else f"Follow up: {followups[k]}", k)
        if not final:
            add("dynamic_answer", prompts.dynamic_answer_messages(row, history[:k], followups[k], few_shot=False), subans[k], k)
    return out


def teacher_corpus(world: W.World, kinds: Iterable[str] = KINDS, dynamic_every: int = 1,
                   repeat: Optional[dict[str, int]] = None) -> list[dict[str, Any]]:
    """Every row of the teacher's corpus (facts, drills, worked ``teacher``-split examples).

    ``dynamic_every``: self-ask traces for every k-th teacher question only (they are the
    longest rows: a prompt re-sent per step). ``repeat``: copies of each row of a kind in one
    epoch (the mixture: facts need many more passes than drills).
    """
    rows = _teacher_rows(world, set(kinds), dynamic_every)
    repeat = repeat or {}
    return [r for r in rows for _ in range(repeat.get(r["kind"], 1))]


def _teacher_rows(world: W.World, kinds: set[str], dynamic_every: int) -> list[dict[str, Any]]:
    out = fact_rows(world) if "fact" in kinds else []
    if "drill" in kinds:
        out += drill_rows(world.config.drills, world.config.seed)
    for i, q in enumerate(world.questions["teacher"]):
        ks = kinds if i % dynamic_every == 0 else kinds - {"dynamic", "dynamic_answer"}
        out += worked_rows(q, W.followups(world, q), ks)
    return out


def name_listing_rows(world: W.World, n: int, seed: int) -> list[dict[str, Any]]:
    """The students' pretraining: "list the names in this text", each on a numbered line after a few words.

    The user turn is a random run of the world's lowercase words with one to three of its names
    (companies, people, cities) among them; the target lists those names in order, one numbered
    line each, every name after one to three random words of the same kind ("1. city the Vantor
    Mills?"). The paper's students are pretrained LMs, which copy any name they read into what they
    write; a model trained from scratch on a few hundred decompositions learns their shape but
    writes names it memorized. This corpus gives the students that generic skill and nothing else:
    no fact, no question of the world, no task of the pipeline. The untrained student is this base.

    Measured (benchmarks/results/probe_student_base.md, gold decompositions, the quickstart's
    schedule): students from this base, or from one listing bare names, decompose 94-97 % of test
    questions exactly after 420 training rows and 19-34 % after 120; from a base echoing names, or
    from no pretraining, 0-17 %.
    """
    rng = random.Random(seed * 104_729 + 7)
    names, words = world.names(), template_words(world)
    out = []
    for i in range(n):
        picked = rng.sample(names, rng.randint(1, 3))
        runs = [" ".join(rng.sample(words, rng.randint(1, 4))) for _ in range(len(picked) + 1)]
        text = runs[0] + "".join(f" {name} {run}" for name, run in zip(picked, runs[1:])) + "?"
        lines = [" ".join(rng.sample(words, rng.randint(1, 3))) + f" {name}?" for name in picked]
        out.append(_row(f"names:{i}", "names", _chat(text, format_subquestions(lines))))
    return out


def template_words(world: W.World) -> list[str]:
    """The world's template words ("founded", "city", ...): every one is a word of the teacher's corpus."""
    texts = [m["content"] for r in fact_rows(world) for m in r["messages"]]
    return sorted({w.strip("?.") for t in texts for w in t.split() if w.strip("?.").isalpha() and w.islower()})


def gold_decompositions(world: W.World, split: str) -> list[dict[str, Any]]:
    """The gold decompositions of a split's questions as ``decompose`` rows (the probes' stand-in for a teacher's)."""
    return [r for q in world.questions[split] for r in worked_rows(q, W.followups(world, q), ["decompose"])]


def world_texts(world: W.World) -> list[str]:
    """Every text the pipeline may put before a model of this world: the tokenizer's corpus."""
    texts = [m["content"] for r in teacher_corpus(world) for m in r["messages"]]
    for split in ("train", "test"):
        for q in world.questions[split]:
            texts += [m["content"] for r in worked_rows(q, W.followups(world, q)) for m in r["messages"]]
    return texts


def write_corpus(out_dir: str, rows: list[dict[str, Any]]) -> str:
    """``<out_dir>/train/part-00000.parquet`` (the ``train`` job's ``data.train_path``); returns that path."""
    path = storage.join(out_dir, "train")
    tables.write_rows(storage.join(path, "part-00000.parquet"), rows, CORPUS_SCHEMA)
    return path
