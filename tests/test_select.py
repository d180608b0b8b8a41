"""select: training sets from a real solve output (and from synthetic rows): splits never leak a question,
per_question / tie_break / dedupe, S_D-R within S_D-T, ShareGPT JSONL, dataset card, local and s3://."""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict

import pyarrow.parquet as pq
import pytest

from pipeline import storage, tables
from pipeline.manifest import read_manifest
from pipeline.parsing import format_subquestions, with_final_answer
from pipeline.prompts import decomposer_messages, solver_messages
from pipeline.selection import SELECT_SCHEMA, VARIANTS, canonical_order, select_variant, split_of, to_sharegpt
from ray_jobs import generate, select, solve
from tests.conftest import REPO

CONFIG = os.path.join(REPO, "configs", "select.yaml")


def run_select(*overrides: str) -> int:
    return select.main(["--config", CONFIG, *overrides])


def read_jsonl(uri: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]


def variant_rows(out: str, variant: str) -> dict[str, list[dict]]:
    return {s: tables.read_rows(storage.join(out, variant, s, "part-00000.parquet")) for s in ("train", "validation")}


@pytest.fixture(scope="module")
def pipeline_outputs(ray_session, prepared_samples, tmp_path_factory):
    """generate (40 GSM8K train questions x 3 samples) -> solve, both with the offline reference backends."""
    root = tmp_path_factory.mktemp("sel")
    gen, sol = str(root / "generate"), str(root / "solve")
    assert generate.main(["--config", os.path.join(REPO, "configs", "generate.yaml"), f"input.path={prepared_samples}",
                          f"output.dir={gen}", "input.limit=40", "sampling.n=3", "output.shard_size=40"]) == 0
    assert solve.main(["--config", os.path.join(REPO, "configs", "solve.yaml"), f"input.path={gen}", f"output.dir={sol}",
                       "output.shard_size=40"]) == 0
    return {"generate": gen, "solve": sol, "prepare": prepared_samples}


# ---------------------------------------------------------------- synthetic rows


def _row(qid: str, k: int, subqs: list[str], correct: bool | None = None, solver_text: str | None = None) -> dict:
    return {"id": qid, "dataset": "gsm8k", "split": "train", "question": f"What is {qid}?", "context": "",
            "request_id": f"{qid}#{k}", "sample_index": k, "subquestions": subqs, "teacher": "t", "prompt_version": "v1",
            "correct": correct, "solver_raw_text": solver_text, "solver": "s" if solver_text else None,
            "answers": [{"q1": "3", "q2": "5", "q3": "0", "q4": "4"}.get(qid, "1")]}


def test_split_is_a_stable_hash_of_the_question_id():
    rng = random.Random(0)
    ids = [f"gsm8k:train:{rng.randrange(10**9)}" for _ in range(20000)]
    splits = {q: split_of(q, 0, 0.1) for q in ids}
    assert all(split_of(q, 0, 0.1) == s for q, s in splits.items())  # deterministic
    share = sum(s == "validation" for s in splits.values()) / len(splits)
    assert 0.09 < share < 0.11
    assert {split_of(q, 0, 0.0) for q in ids[:500]} == {"train"} and {split_of(q, 0, 1.0) for q in ids[:500]} == {"validation"}
    assert sum(split_of(q, 1, 0.1) != split_of(q, 0, 0.1) for q in ids) > 1000  # the seed reshuffles
    # a larger fraction only moves questions train -> validation (nested buckets)
    assert all(split_of(q, 0, 0.3) == "validation" for q, s in splits.items() if s == "validation")


def test_many_samples_per_question_never_straddle_splits():
    rng = random.Random(1)
    rows = []
    for i in range(3000):
        for k in range(rng.randint(1, 4)):
            subqs = [f"step {j} of {i}" for j in range(rng.randint(0, 3))] + ([f"variant {k}"] if rng.random() < 0.7 else [])
            rows.append(_row(f"q{i}", k, subqs, rng.random() < 0.5, f"A1: x\nThe answer is: {k}"))
    rng.shuffle(rows)
    ordered, dup = canonical_order(rows)
    assert dup == 0
    seen: dict[str, set] = defaultdict(set)
    for variant in VARIANTS:
        out, _ = select_variant(ordered, variant, per_question=2, validation_fraction=0.25, seed=7)
        for r in out:
            seen[r["question_id"]].add(r["split"])
            assert r["split"] == split_of(r["question_id"], 7, 0.25)
        assert len({r["id"] for r in out}) == len(out)
    assert all(len(s) == 1 for s in seen.values())
    assert {s for v in seen.values() for s in v} == {"train", "validation"}


def test_dedupe_per_question_and_tie_break():
    rows, _ = canonical_order([
        _row("q1", 0, ["a?", "b?", "c?"], True, "A1: 1\nThe answer is: 3"),
        _row("q1", 1, ["a?", "b?", "c?"], True, "A1: 1\nThe answer is: 3"),   # duplicate decomposition and trace
        _row("q1", 2, ["ab?"], True, "A1: 3\nThe answer is: 3"),
        _row("q1", 3, ["a?", "b?", "c?", "a much longer last step?"], True, "A1: 2\nThe answer is: 3"),
        _row("q1", 4, ["x?"], False, "A1: 9\nThe answer is: 9"),
        _row("q2", 0, [], True, "The answer is: 5"),  # "No decomposition"
        _row("q2", 1, [], False, "The answer is: 6"),  # same decomposition as q2#0: a duplicate for the decomposer
        _row("q3", 0, ["y?"], False, "The answer is: 0"),
        _row("q3", 0, ["y?"], False, "The answer is: 0"),  # a repeated request id
        _row("q4", 0, ["z?"], True, "A1: it is 4"),  # right (GSM8K last-number fallback) but no answer line
    ])
    assert len(rows) == 9
    all_rows, stats = select_variant(rows, "decomposer_all", validation_fraction=0.0)
    assert [r["source_request_id"] for r in all_rows] == ["q1#0", "q1#2", "q1#3", "q1#4", "q2#0", "q3#0", "q4#0"]
    assert stats["duplicates_removed"] == 2 and stats["candidates"] == 9
    assert all_rows[4]["messages"][-1] == {"role": "assistant", "content": "No decomposition"}

    def pick(tie_break: str, per_question=1) -> list[str]:
        return [r["source_request_id"] for r in
                select_variant(rows, "decomposer_correct", per_question=per_question, tie_break=tie_break, validation_fraction=0.0)[0]]

    assert pick("first_sample") == ["q1#0", "q2#0", "q4#0"]
    assert pick("fewest_subquestions") == ["q1#2", "q2#0", "q4#0"]
    assert pick("most_subquestions") == ["q1#3", "q2#0", "q4#0"]
    assert pick("shortest_text") == ["q1#2", "q2#0", "q4#0"]
    assert pick("most_subquestions", per_question=2) == ["q1#3", "q1#0", "q2#0", "q4#0"]
    assert pick("first_sample", per_question=None) == ["q1#0", "q1#2", "q1#3", "q2#0", "q4#0"]
    # the solver variants (the paper's S_E-T, S_E-A): every trace with an answer line, right or wrong (q4#0 has none);
    # prompts differ by decomposition, so only identical conversations are duplicates
    teacher = select_variant(rows, "solver_teacher", validation_fraction=0.0)[0]
    assert [r["source_request_id"] for r in teacher] == ["q1#0", "q1#2", "q1#3", "q1#4", "q2#0", "q2#1", "q3#0"]
    assert teacher[3]["messages"] == solver_messages(rows[4], ["x?"], few_shot=False) + [
        {"role": "assistant", "content": "A1: 9\nThe answer is: 9"}]
    assert teacher[3]["correct"] is False and teacher[3]["solver"] == "s" and teacher[3]["id"] == "solver_teacher:q1#4"
    # S_E-A: the same traces, the final answer replaced by the gold one; q2#1 then equals q2#0 and is a duplicate
    gold = select_variant(rows, "solver_gold", validation_fraction=0.0)[0]
    assert [r["source_request_id"] for r in gold] == ["q1#0", "q1#2", "q1#3", "q1#4", "q2#0", "q3#0"]
    assert gold[3]["messages"][-1] == {"role": "assistant", "content": "A1: 9\nThe answer is: 3"} and gold[3]["id"] == "solver_gold:q1#4"


# ---------------------------------------------------------------- the job on real outputs


def test_select_on_solve_output(pipeline_outputs, tmp_path):
    out = str(tmp_path / "select")
    assert run_select(f"input.path={pipeline_outputs['solve']}", f"output.dir={out}", "validation_fraction=0.25") == 0
    solved = {r["request_id"]: r for r in tables.read_rows(pipeline_outputs["solve"])}
    files = {v: variant_rows(out, v) for v in VARIANTS}
    split_of_q: dict[str, str] = {}
    for variant, splits in files.items():
        # exactly the documented columns, in order; rows are unique and carry lineage
        for s in ("train", "validation"):
            schema = pq.read_schema(storage.join(out, variant, s, "part-00000.parquet"))
            assert schema.names == SELECT_SCHEMA.names
        rows = splits["train"] + splits["validation"]
        assert len({r["id"] for r in rows}) == len(rows) and rows
        assert len({(r["question_id"], json.dumps(r["messages"])) for r in rows}) == len(rows)  # deduped
        for s, part in splits.items():
            for r in part:
                src = solved[r["source_request_id"]]
                assert r["split"] == s and r["variant"] == variant and r["question_id"] == src["id"]
                assert r["id"] == f"{variant}:{src['request_id']}" and r["prompt_version"] == "v1"
                assert r["teacher"] == src["teacher"] and r["solver"] == src["solver"] and r["correct"] == src["correct"]
                assert split_of_q.setdefault(r["question_id"], s) == s, "a question is in both splits"
                if variant.startswith("decomposer"):
                    assert r["messages"] == decomposer_messages(src, few_shot=False) + [
                        {"role": "assistant", "content": format_subquestions(src["subquestions"])}]
                else:
                    assert r["messages"][:-1] == solver_messages(src, src["subquestions"], few_shot=False)
                    target = src["solver_raw_text"] if variant == "solver_teacher" else with_final_answer(
                        src["solver_raw_text"], src["answers"][0])
                    assert r["messages"][-1] == {"role": "assistant", "content": target}
                if variant == "decomposer_correct":
                    assert r["correct"] is True
        # JSONL mirrors the Parquet rows in FastChat/ShareGPT form
        for s, part in splits.items():
            lines = read_jsonl(storage.join(out, variant, f"{s}.jsonl"))
            assert lines == [to_sharegpt(r) for r in part]
            for line in lines:
                assert set(line) == {"id", "conversations"}
                assert [c["from"] for c in line["conversations"]] == ["system", "human", "gpt"]
    assert set(split_of_q.values()) == {"train", "validation"}
    # S_D-R is a subset of S_D-T; one decomposition per question by default; every correct question is represented
    key = lambda r: (r["question_id"], r["messages"][-1]["content"])  # noqa: E731
    sdt = {key(r) for s in files["decomposer_all"].values() for r in s}
    sdr = [r for s in files["decomposer_correct"].values() for r in s]
    assert {key(r) for r in sdr} <= sdt and len(sdr) < len(sdt)
    assert len({r["question_id"] for r in sdr}) == len(sdr) == len({r["id"] for r in solved.values() if r["correct"]})
    assert all(r["source_request_id"].endswith("#0") for r in sdr)  # first_sample: the gold sample 0 is always correct
    # S_E-T holds wrong traces too (the paper's); S_E-A is built from the same traces
    se_t = [r for s in files["solver_teacher"].values() for r in s]
    assert any(r["correct"] is False for r in se_t) and any(r["correct"] is True for r in se_t)
    assert {r["source_request_id"] for s in files["solver_gold"].values() for r in s} <= {r["source_request_id"] for r in se_t}
    # dataset card and manifest
    card = storage.read_text(storage.join(out, "README.md"))
    m = read_manifest(out)
    for variant, splits in files.items():
        c = m["variants"][variant]
        assert c["splits"] == {s: len(p) for s, p in splits.items()}
        assert m["counts"][f"{variant}/train"] == len(splits["train"])
        assert f"| gsm8k | {variant} | {len(splits['train'])} | {len(splits['validation'])} |" in card
    for needle in ("S_D-T", "S_D-R", "S_E-T", "S_E-A", "Prompt version `v1`", "first_sample", "validation_fraction=0.25",
                   "sha256", pipeline_outputs["solve"], pipeline_outputs["generate"], "`generate`", "`solve`", "reference-gold"):
        assert needle in card, needle
    assert [e["job"] for e in m["lineage"]][:2] == ["solve", "generate"]  # (the fixture prepare writes no manifest)
    assert m["job"] == "select" and m["counts"]["rows_in"] == 120 and m["warnings"] == []
    # a rerun replaces the output (deterministic: identical files)
    before = {f: storage.read_bytes(f) for f in storage.list_files(out, ".parquet")}
    assert run_select(f"input.path={pipeline_outputs['solve']}", f"output.dir={out}", "validation_fraction=0.25") == 0
    assert {f: storage.read_bytes(f) for f in storage.list_files(out, ".parquet")} == before


def test_per_question_and_tie_break_on_real_output(pipeline_outputs, tmp_path):
    out = str(tmp_path / "select")
    assert run_select(f"input.path={pipeline_outputs['solve']}", f"output.dir={out}", "variants=[decomposer_correct]",
                      "per_question=3", "tie_break=fewest_subquestions", "validation_fraction=0") == 0
    assert sorted(os.listdir(out)) == ["README.md", "_select.json", "decomposer_correct", "manifest.json"]
    rows = variant_rows(out, "decomposer_correct")
    assert rows["validation"] == [] and read_jsonl(os.path.join(out, "decomposer_correct", "validation.jsonl")) == []
    solved = tables.read_rows(pipeline_outputs["solve"])
    by_q: dict[str, list[dict]] = defaultdict(list)
    for r in rows["train"]:
        by_q[r["question_id"]].append(r)
    for qid, picked in by_q.items():
        correct = {format_subquestions(r["subquestions"]): len(r["subquestions"]) for r in solved if r["id"] == qid and r["correct"]}
        assert len(picked) == min(3, len(correct))
        n_picked = sorted(correct[p["messages"][-1]["content"]] for p in picked)
        assert n_picked == sorted(correct.values())[: len(picked)]  # the fewest subquestions first
    assert any(len(p) > 1 for p in by_q.values())


def test_generate_output_is_enough_for_decomposer_all(pipeline_outputs, tmp_path, capsys):
    out = str(tmp_path / "select")
    assert run_select(f"input.path={pipeline_outputs['generate']}", f"output.dir={out}", "variants=[decomposer_all]") == 0
    rows = variant_rows(out, "decomposer_all")
    assert all(r["correct"] is None and r["solver"] is None for s in rows.values() for r in s)
    assert sum(map(len, rows.values())) > 0
    # the scored variants need a solve output: one clear error
    assert run_select(f"input.path={pipeline_outputs['generate']}", f"output.dir={out}") == 1
    # a half-written select output (crash before the manifest) is replaced on the next run
    os.remove(os.path.join(out, "manifest.json"))
    assert run_select(f"input.path={pipeline_outputs['generate']}", f"output.dir={out}", "variants=[decomposer_all]") == 0
    # never clobber a directory that is not a select output
    assert run_select(f"input.path={pipeline_outputs['solve']}", f"output.dir={pipeline_outputs['generate']}") == 1
    assert read_manifest(pipeline_outputs["generate"])["job"] == "generate"
    # an empty variant is written (empty files) with a warning in the manifest and the card
    empty = str(tmp_path / "empty")
    assert run_select(f"input.path={pipeline_outputs['solve']}", f"output.dir={empty}", "input.datasets=[drop]") == 0
    m = read_manifest(empty)
    assert len(m["warnings"]) == 4 and "Warnings" in storage.read_text(os.path.join(empty, "README.md"))
    assert variant_rows(empty, "decomposer_all") == {"train": [], "validation": []}


def test_select_to_and_from_s3(pipeline_outputs, s3_bucket, tmp_path):
    src = f"{s3_bucket}/solve"
    storage.copy_dir(pipeline_outputs["solve"], src)
    out = f"{s3_bucket}/select"
    assert run_select(f"input.path={src}", f"output.dir={out}") == 0
    local = str(tmp_path / "local")
    assert run_select(f"input.path={pipeline_outputs['solve']}", f"output.dir={local}") == 0
    for v in VARIANTS:
        for s in ("train", "validation"):
            assert tables.read_rows(f"{out}/{v}/{s}") == tables.read_rows(os.path.join(local, v, s))
            assert storage.read_text(f"{out}/{v}/{s}.jsonl") == storage.read_text(os.path.join(local, v, f"{s}.jsonl"))
    assert read_manifest(out)["counts"] == read_manifest(local)["counts"]
    assert "S_D-R" in storage.read_text(f"{out}/README.md")
