"""Check ``pipeline.metrics`` (``get_metrics``, ``drop_em_f1``) against the official allenai DROP metric
over the full DROP dev set, and write the pair count and largest difference to a results file.

The official logic is ``tests/reference_drop_eval.py``: the metric functions of allenai's
``allennlp_rc/eval/drop_eval.py`` (allenai/allennlp-reading-comprehension, commit d4a19b5c, Apache-2.0),
copied verbatim except that its ``scipy.optimize.linear_sum_assignment`` is a brute-force stand-in.
When scipy is importable the script also runs the reference with scipy's own solver, i.e. the official
code exactly as published, and reports both.

Inputs: ``drop_v0_dev.jsonl.gz`` (all 9,536 dev questions, simple-evals format; ``ref_text`` holds the
original answer and every validated answer joined by ``|``). For each question, with its gold answers
``G`` (taken raw, leading spaces and all, as the file has them):

- predicted answers: every gold answer, each split into a span list (on `` and `` / ``, ``), and
  perturbations of each (case, punctuation, a dropped or added token, a changed number, reversed spans,
  spans merged, an answer of another question, the empty string);
- ``get_metrics`` pairs: every predicted answer against every gold answer, as a string and as a span list;
- ``drop_em_f1`` pairs: every predicted answer against ``G`` (the official ``evaluate_json`` rule: max over
  the candidates, skipping those whose first span is blank).

    python scripts/check_drop_metric.py [--data /work/shared/data/drop/drop_v0_dev.jsonl.gz]
                                        [--out benchmarks/results/drop_metric.json] [--limit N]

Exit code 0 when every difference is at most 1e-6, 1 otherwise.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import json
import os
import platform
import random
import re
import sys
from typing import Callable, Iterator, Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from pipeline.metrics import drop_em_f1, get_metrics  # noqa: E402

DEFAULT_DATA = os.environ.get("DIVCONQ_DROP_DEV", "/work/shared/data/drop/drop_v0_dev.jsonl.gz")
DEFAULT_OUT = os.path.join(REPO, "benchmarks", "results", "drop_metric.json")
TOLERANCE = 1e-6
MAX_SPANS = 5  # the brute-force reference solver tries every assignment: 5! at most
SEED = 0


def load_reference(name: str, use_scipy: bool):
    """A fresh copy of tests/reference_drop_eval.py; with ``use_scipy`` its solver is scipy's (as published)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tests", "reference_drop_eval.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if use_scipy:
        from scipy.optimize import linear_sum_assignment

        module.linear_sum_assignment = linear_sum_assignment
    return module


def read_questions(path: str, limit: int | None) -> list[list[str]]:
    """Gold answers per question: ``ref_text.split('|')``, unstripped (or a parsed file's ``answers``)."""
    out = []
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            out.append(row["ref_text"].split("|") if "ref_text" in row else list(row["answers"]))
            if limit and len(out) >= limit:
                break
    return out


def split_spans(answer: str) -> list[str]:
    """A multi-span reading of a joined answer ("a and b", "a, b"), capped at MAX_SPANS (tail merged)."""
    spans = [s for s in re.split(r",\s*|\s+and\s+", answer) if s.strip()] or [answer]
    if len(spans) > MAX_SPANS:
        spans = spans[: MAX_SPANS - 1] + [" ".join(spans[MAX_SPANS - 1:])]
    return spans


def _bump_number(text: str) -> str | None:
    m = re.search(r"\d+(\.\d+)?", text)
    if not m:
        return None
    return text[: m.start()] + str(float(m.group()) + 1).rstrip("0").rstrip(".") + text[m.end():]


def perturbations(answer: str, rng: random.Random, other: str) -> Iterator[str | list[str]]:
    tokens = answer.split()
    yield answer.upper()
    yield f"{answer}."
    yield f"the {answer}"
    yield f"{answer} yards"
    if len(tokens) > 1:
        yield " ".join(tokens[1:])
        yield " ".join(tokens[:-1])
        yield " ".join(rng.sample(tokens, len(tokens)))
    bumped = _bump_number(answer)
    if bumped is not None:
        yield bumped
    spans = split_spans(answer)
    if len(spans) > 1:
        yield spans
        yield list(reversed(spans))
        yield spans[:-1]
        yield spans + [other]
    yield [answer, other]
    yield other
    yield ""


def predictions(golds: list[str], rng: random.Random, others: list[list[str]]) -> list[str | list[str]]:
    preds: list[str | list[str]] = []
    for gold in golds:
        other = rng.choice(rng.choice(others))
        preds.append(gold)
        preds.append(gold.strip())
        preds.extend(perturbations(gold.strip(), rng, other.strip()))
    unique, seen = [], set()
    for p in preds:
        key = json.dumps(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def official_max(ref, predicted, golds: Sequence) -> tuple[float, float]:
    """evaluate_json's rule for one question: max over candidates whose first span is not blank."""
    best_em = best_f1 = 0.0
    for gold in golds:
        gold = (gold,) if isinstance(gold, str) else tuple(gold)
        em, f1 = ref.get_metrics(predicted, gold)
        if gold[0].strip() != "":
            best_em, best_f1 = max(best_em, em), max(best_f1, f1)
    return best_em, float(best_f1)


class Tally:
    """Pair count, largest |ours - official| for EM and F1, and the first mismatches."""

    def __init__(self) -> None:
        self.pairs = 0
        self.max_em = self.max_f1 = 0.0
        self.mismatches: list[dict] = []
        self.n_mismatches = 0

    def add(self, ours: tuple[float, float], official: tuple[float, float], case: dict) -> None:
        self.pairs += 1
        d_em, d_f1 = abs(ours[0] - float(official[0])), abs(ours[1] - float(official[1]))
        self.max_em, self.max_f1 = max(self.max_em, d_em), max(self.max_f1, d_f1)
        if max(d_em, d_f1) > TOLERANCE:
            self.n_mismatches += 1
            if len(self.mismatches) < 20:
                self.mismatches.append({**case, "ours": list(ours), "official": [float(x) for x in official]})

    def summary(self) -> dict:
        return {"pairs": self.pairs, "max_abs_diff_em": self.max_em, "max_abs_diff_f1": self.max_f1,
                "pairs_over_tolerance": self.n_mismatches, "first_mismatches": self.mismatches}


def compare(questions: list[list[str]], ref) -> dict:
    rng = random.Random(SEED)
    per_pair, per_question = Tally(), Tally()
    multi_span_pairs = 0
    for qi, golds in enumerate(questions):
        gold_forms: list = list(golds) + [split_spans(g.strip()) for g in golds if len(split_spans(g.strip())) > 1]
        for pred in predictions(golds, rng, questions):
            for gold in gold_forms:
                g = gold if isinstance(gold, str) else tuple(gold)
                multi_span_pairs += isinstance(pred, list) or isinstance(gold, list)
                per_pair.add(get_metrics(pred, g), ref.get_metrics(pred, g), {"question": qi, "pred": pred, "gold": gold})
            per_question.add(drop_em_f1(pred, golds), official_max(ref, pred, golds),
                             {"question": qi, "pred": pred, "golds": golds})
    return {"get_metrics": per_pair.summary(), "drop_em_f1": per_question.summary(),
            "get_metrics_pairs_with_a_span_list": multi_span_pairs}


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict:
    out = {"python": platform.python_version(), "numpy": np.__version__}
    try:
        import scipy

        out["scipy"] = scipy.__version__
    except ImportError:
        out["scipy"] = None
    return out


def run(data: str, limit: int | None) -> dict:
    questions = read_questions(data, limit)
    result = {"data": {"path": os.path.basename(data), "sha256": sha256(data), "questions": len(questions),
                       "gold_answers": sum(len(g) for g in questions)},
              "tolerance": TOLERANCE, "seed": SEED, "versions": versions(),
              "reference": "tests/reference_drop_eval.py (allenai drop_eval.py metric functions, commit d4a19b5c)",
              "solvers": {}}
    solvers: dict[str, Callable] = {"bruteforce": lambda: load_reference("ref_bruteforce", False)}
    if result["versions"]["scipy"]:
        solvers["scipy"] = lambda: load_reference("ref_scipy", True)
    for name, make in solvers.items():
        result["solvers"][name] = compare(questions, make())
    result["ok"] = all(s[k]["pairs_over_tolerance"] == 0 for s in result["solvers"].values()
                       for k in ("get_metrics", "drop_em_f1"))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--limit", type=int, default=None, help="first N questions only (a quick check)")
    args = ap.parse_args(argv)
    result = run(args.data, args.limit)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
        f.write("\n")
    for name, s in result["solvers"].items():
        for k in ("get_metrics", "drop_em_f1"):
            t = s[k]
            print(f"{name:10s} {k:11s} pairs={t['pairs']:>8d} max|dEM|={t['max_abs_diff_em']:.3g} "
                  f"max|dF1|={t['max_abs_diff_f1']:.3g} over {TOLERANCE:g}: {t['pairs_over_tolerance']}")
    print(f"{'OK' if result['ok'] else 'MISMATCH'}: written to {args.out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
