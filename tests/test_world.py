"""The generated world (pipeline/data/world.py), its teacher corpus and its tokenizer."""

from __future__ import annotations

import re

import pytest

from pipeline import metrics, parsing, prompts, tables
from pipeline.data import SourceConfig, load_questions
from pipeline.data import world as W
from pipeline.data import world_corpus as C

SMALL = W.WorldConfig(seed=5, cities=8, last_names=12, companies=30,
                      questions={"teacher": {W.CHAIN: 30, W.NUMERIC: 30, W.COMPARE: 20},
                                 "train": {W.CHAIN: 30, W.NUMERIC: 30}, "test": {W.CHAIN: 24, W.NUMERIC: 24, W.COMPARE: 24}},
                      drills=50)


@pytest.fixture(scope="module")
def world() -> W.World:
    return W.generate()


def _rows(w: W.World) -> list[tuple]:
    return [(q.id, q.question, tuple(q.answers), tuple(q.gold_subquestions), tuple(q.gold_subanswers)) for q in w.all_questions()]


def test_same_seed_same_world_other_seed_other_world():
    W._generate_cached.cache_clear()
    a = _rows(W.generate(SMALL))
    W._generate_cached.cache_clear()
    assert _rows(W.generate(SMALL)) == a
    assert _rows(W.generate(SMALL.model_copy(update={"seed": 6}))) != a


def test_splits_are_disjoint_and_sized(world):
    texts = [q.question for q in world.all_questions()]
    assert len(texts) == len(set(texts)), "a question is in two splits (or twice in one)"
    ids = [q.id for q in world.all_questions()]
    assert len(ids) == len(set(ids))
    per = W.describe(world)["questions"]
    assert all(per["test"][f] >= 200 for f in W.FAMILIES)
    assert per["train"][W.HELD_OUT_FAMILY] == 0 and per["teacher"][W.HELD_OUT_FAMILY] > 0
    for s in W.SPLITS:
        assert all(q.split == s and q.id.split(":")[1] == s for q in world.questions[s])


def _anchors(world: W.World, q) -> set[str]:
    names = set(world.companies) | set(world.people)
    return {n for n in names if n in q.question}


def test_every_split_asks_about_every_company_never_the_same_question(world):
    """Principle 3: a test question's companies are named in train questions, a company's chain templates
    are dealt one per split, and no question text is in two splits."""
    companies = set(world.companies)
    named = {s: set().union(*(_anchors(world, q) & companies for q in world.questions[s])) for s in W.SPLITS}
    assert named["test"] <= named["train"] and named["test"] <= named["teacher"]
    chain_templates = {}
    for s in W.SPLITS:
        for q in world.questions[s]:
            if q.dataset == W.CHAIN:
                (name,) = _anchors(world, q) & companies
                chain_templates.setdefault(name, []).append((s, q.gold_subquestions[-1]))
    for name, seen in chain_templates.items():
        assert len({s for s, _ in seen}) == len(seen) and len({t for _, t in seen}) == len(seen), name


_SENTENCE = re.compile(r"^The (?P<noun>[a-z ]+) of (?P<s>.+) is (?P<o>.+)\.$")
_SUB = re.compile(r"^(?P<a>\d+) - (?P<b>\d+) = (?P<c>-?\d+)\.$")


def test_every_question_is_answerable_from_the_facts(world):
    facts = {(r, s): o for r, s, o in world.facts()}
    by_noun = {rel.noun: name for name, rel in W.RELATIONS.items()}
    for q in world.all_questions():
        assert len(q.gold_subquestions) == len(q.gold_subanswers) and 2 <= len(q.gold_subquestions) <= 4
        values = []
        for sent in q.gold_subanswers:
            m, d = _SENTENCE.match(sent), _SUB.match(sent)
            if m:
                key = (by_noun[m["noun"]], m["s"])
                assert key in facts and str(facts[key]) == m["o"], f"{q.id}: {sent!r} is not a fact"
                values.append(m["o"])
            else:
                assert d and int(d["a"]) - int(d["b"]) == int(d["c"]) > 0, f"{q.id}: bad arithmetic {sent!r}"
                values.append(d["c"])
        if q.dataset == W.COMPARE:
            a, b = re.match(r"^(?:Which company|Who) is older, (.+) or (.+)\?$", q.question).groups()
            assert q.answers == [a if int(values[0]) < int(values[1]) else b]
        else:
            assert q.answers == [values[-1]]


def test_followups_name_every_entity(world):
    for q in world.questions["teacher"][:50]:
        fu = W.followups(world, q)
        assert len(fu) == len(q.gold_subquestions)
        assert not any("that person" in f or "that company" in f or "that city" in f for f in fu)


def test_families_have_their_metrics():
    assert {f: metrics.METRIC_NAME[f] for f in W.FAMILIES} == W.METRICS
    assert metrics.score(W.NUMERIC, "56 years", ["56"])["correct"]
    assert not metrics.score(W.NUMERIC, "57", ["56"])["correct"]
    assert metrics.score(W.CHAIN, "Kalmor", ["Kalmor"])["correct"]
    assert metrics.score(W.COMPARE, "Vantor Mills", ["Vantor Mills"])["correct"]
    assert not metrics.score(W.CHAIN, "Tesk", ["Kalmor"])["correct"]
    assert metrics.primary_metric(W.NUMERIC, {"em": 1.0}) == 1.0


def test_source_config_for_the_world():
    src = SourceConfig(dataset=W.CHAIN, split="test", world=SMALL.model_dump())
    good, bad = load_questions(src)
    assert not bad and len(good) == 24 and {q.dataset for q in good} == {W.CHAIN}
    assert len(load_questions(src.model_copy(update={"limit": 5}))[0]) == 5
    with pytest.raises(ValueError, match="splits"):
        SourceConfig(dataset=W.CHAIN, split="dev")
    with pytest.raises(ValueError, match="remove path"):
        SourceConfig(dataset=W.CHAIN, split="test", path="x.jsonl")
    with pytest.raises(ValueError, match="path: missing"):
        SourceConfig(dataset="gsm8k")
    with pytest.raises(ValueError, match="world is only used"):
        SourceConfig(dataset="gsm8k", path="x.jsonl", world=SMALL.model_dump())


def test_prepare_writes_the_world(tmp_path):
    from pipeline.preparation import PrepareConfig, prepare

    cfg = PrepareConfig.model_validate({"sources": [{"dataset": f, "split": s, "world": SMALL.model_dump()}
                                                    for s in W.SPLITS for f in W.FAMILIES
                                                    if SMALL.questions[s].get(f)], "output": {"dir": str(tmp_path / "prep")}})
    counts = prepare(cfg)
    rows = tables.read_rows(str(tmp_path / "prep"))
    assert counts["quarantined"] == 0 and counts["rows_out"] == len(rows) == len(W.generate(SMALL).all_questions())
    assert {r["dataset"] for r in rows} == set(W.FAMILIES)
    assert all(r["gold_subquestions"] and r["answers"] for r in rows)


def test_teacher_corpus_is_the_pipelines_prompts_and_parses_back():
    w = W.generate(SMALL)
    rows = C.teacher_corpus(w)
    kinds = {r["kind"] for r in rows}
    assert kinds == set(C.KINDS)
    assert sum(r["kind"] == "fact" for r in rows) == len(w.facts())
    held_out = {q.question for s in ("train", "test") for q in w.questions[s]}
    for r in rows:
        assert r["messages"][-1]["role"] == "assistant"
        assert not any(q in m["content"] for m in r["messages"] for q in held_out if r["kind"] != "fact"), r["id"]
    teacher_qs = {q.id: q for q in w.questions["teacher"]}
    for r in rows:
        target = r["messages"][-1]["content"]
        q = teacher_qs.get(r["question_id"])
        if r["kind"] == "decompose":
            assert r["messages"][:-1] == prompts.decomposer_messages(q.to_row(), few_shot=False)
            assert parsing.parse_subquestions(target) == q.gold_subquestions
        elif r["kind"] == "solve":
            assert parsing.parse_solver_output(target) == (q.gold_subanswers, q.answers[0])
            assert metrics.score(q.dataset, parsing.extract_answer(target, q.dataset), q.answers)["correct"]
        elif r["kind"] == "dynamic":
            kind, text = parsing.parse_dynamic_step(target)
            assert (kind == "final") == (text == q.answers[0] and target.startswith("So the final answer"))
        elif r["kind"] == "direct":
            assert parsing.extract_answer(target, q.dataset) == q.answers[0]


def test_drills_are_distinct_and_right():
    rows = C.drill_rows(200, seed=0)
    assert len({r["id"] for r in rows}) == 200
    for r in rows:
        a, b = map(int, re.findall(r"\d+", r["messages"][0]["content"]))
        assert r["messages"][1]["content"] == f"{a} - {b} = {a - b}." and a > b


def test_word_tokenizer_round_trips_through_the_parsers(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.tiny_models import build_tiny_model
    from training.sft_data import tokenize_messages

    w = W.generate(SMALL)
    d = build_tiny_model(str(tmp_path / "m"), C.world_texts(w), tokenizer="word", hidden_size=32, num_layers=1)
    tok = AutoTokenizer.from_pretrained(d)
    assert len(tok) < 600 and tok.padding_side == "left"
    for r in C.teacher_corpus(w)[::7]:
        for m in r["messages"]:
            ids = tok(m["content"], add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids and tok.decode(ids) == m["content"]
    q = w.questions["test"][0]
    target = prompts.format_solver_output(q.gold_subanswers, q.answers[0])
    assert parsing.parse_solver_output(tok.decode(tok(target)["input_ids"])) == (q.gold_subanswers, q.answers[0])
    sub = parsing.format_subquestions(q.gold_subquestions)
    assert parsing.parse_subquestions(tok.decode(tok(sub)["input_ids"])) == q.gold_subquestions
    msgs = prompts.solver_messages(q.to_row(), q.gold_subquestions, few_shot=False) + [{"role": "assistant", "content": target}]
    ex = tokenize_messages(tok, msgs, 1024)
    labelled = [t for t, lab in zip(ex.input_ids, ex.labels) if lab != -100]
    # the loss covers the target, the <|end|> that stops generation, and the template's newline after it
    assert tok.decode(labelled, skip_special_tokens=True) == target + "\n" and tok.eos_token_id in labelled
    model = AutoModelForCausalLM.from_pretrained(d)
    with torch.inference_mode():
        out = model.generate(**tok(["Question: Who founded"], return_tensors="pt", add_special_tokens=False),
                             max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == 4 + len(tok("Question: Who founded")["input_ids"])
    other = build_tiny_model(str(tmp_path / "s"), hidden_size=16, num_layers=1, tokenizer_from=d)
    assert AutoTokenizer.from_pretrained(other).get_vocab() == tok.get_vocab()


def test_word_tokenizer_knows_every_turn_of_the_students_base_corpus(tmp_path):
    """The students' base reads and writes every name as a known token: the chat markers are one token each,
    and a name that starts a turn (only ever seen mid-sentence in the texts) is not <|unk|>. With either
    broken, the first name of each listed or echoed row was <|unk|> and no student learned to copy it."""
    from transformers import AutoTokenizer

    from pipeline.chat import render_chat
    from pipeline.tiny_models import SPECIAL_TOKENS, build_tiny_model

    w = W.generate(SMALL)
    teacher_texts = [m["content"] for r in C.teacher_corpus(w) for m in r["messages"]]  # what the teacher's train job reads
    tok = AutoTokenizer.from_pretrained(build_tiny_model(str(tmp_path / "m"), teacher_texts, tokenizer="word",
                                                         hidden_size=16, num_layers=1))
    for marker in SPECIAL_TOKENS:
        assert len(tok(marker, add_special_tokens=False)["input_ids"]) == 1, marker
    rows = C.name_listing_rows(w, 50, seed=1)
    for r in rows:
        text = render_chat(tok, r["messages"], add_generation_prompt=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids and tok.decode(ids) == text
        listed = parsing.parse_subquestions(r["messages"][1]["content"])
        assert listed and all(line.split()[-1].rstrip("?") in r["messages"][0]["content"] for line in listed)
    name = sorted(w.companies)[0]
    assert tok.unk_token_id not in tok(f"{name} was founded.", add_special_tokens=False)["input_ids"]


def test_world_prompts_are_compact_and_real_datasets_keep_their_instructions():
    q = W.generate(SMALL).questions["test"][0].to_row()
    assert prompts.decomposer_messages(q, few_shot=False)[0] == {"role": "system", "content": "Decompose."}
    assert prompts.solver_messages(q, ["Who founded X?"], few_shot=False)[0]["content"] == "Solve."
    gsm = {"dataset": "gsm8k", "question": "Tom has 3 apples. How many?"}
    assert len(prompts.decomposer_messages(gsm, few_shot=False)[0]["content"]) > 100
