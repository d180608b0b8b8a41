"""Offline reference backends that replay gold data, so the embedded default runs without any LLM.

* Decomposer role: replays the row's gold decomposition (e.g. GSM8K socratic
  subquestions, which a model wrote from the human solution steps: real teacher-style
  decompositions). Sample 0 is the gold list verbatim; sample k > 0 is a deterministic
  perturbation of it (a step dropped, two steps merged, or steps reordered), standing in
  for the diversity a sampled teacher gives, so rejection sampling has something to reject.
* Solver role: an *oracle* solver. It answers correctly when the decomposition it is
  given covers the gold reasoning steps (ROUGE-L recall against the gold subquestions at
  or above ``coverage_threshold``; rows without a gold decomposition always get the gold
  answer), and otherwise returns a wrong answer. It therefore scores the *decomposition*,
  which is exactly what the decomposer-distillation experiments vary.

Neither is a language model: figures produced with them measure pipeline mechanics and
decomposition quality, not LLM reasoning. Real runs name an OpenAI-compatible, Hugging
Face or vLLM backend in the config instead.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from pydantic import Field

from pipeline.backends.base import Backend, Completion, Request, SamplingParams
from pipeline.config import Tagged
from pipeline.parsing import format_subquestions
from pipeline.prompts import format_solver_output
from pipeline.similarity import rouge_l


class ReferenceBackendConfig(Tagged):
    type: Literal["reference"] = "reference"
    model: str = "reference-gold"
    role: Literal["decomposer", "solver"] = "decomposer"
    coverage_threshold: float = Field(0.8, ge=0.0, le=1.0, description="Oracle solver: ROUGE-L recall of the gold steps needed to answer correctly.")


def _word_count(text: str) -> int:
    return len(text.split())


def gold_pairs(row: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Gold (subquestions, subanswers) with repeated subquestions dropped (pairs kept aligned)."""
    subqs = list(row.get("gold_subquestions") or [])
    subas = list(row.get("gold_subanswers") or [])
    subas += [""] * (len(subqs) - len(subas))
    seen, out_q, out_a = set(), [], []
    for q, a in zip(subqs, subas):
        key = " ".join(q.lower().split())
        if key in seen:
            continue
        seen.add(key)
        out_q.append(q)
        out_a.append(a)
    return out_q, out_a


def perturb(subqs: list[str], sample_index: int, key: str) -> list[str]:
    """Deterministic variant ``sample_index`` of a gold decomposition (index 0: unchanged)."""
    if sample_index == 0 or len(subqs) < 2:
        return list(subqs)
    h = int(hashlib.sha256(f"{key}:{sample_index}".encode()).hexdigest(), 16)
    kind, pos = h % 3, (h // 3) % len(subqs)
    out = list(subqs)
    if kind == 0:  # drop one step
        del out[pos]
    elif kind == 1:  # merge two adjacent steps
        pos = min(pos, len(out) - 2)
        out[pos : pos + 2] = [out[pos].rstrip("?") + " and " + out[pos + 1][0].lower() + out[pos + 1][1:]]
    else:  # swap two steps
        pos = min(pos, len(out) - 2)
        out[pos], out[pos + 1] = out[pos + 1], out[pos]
    return out


def _wrong_answer(gold: str) -> str:
    try:
        return str(int(float(gold.replace(",", ""))) + 1)
    except ValueError:
        return "unknown"


class ReferenceBackend(Backend):
    def __init__(self, model: str = "reference-gold", role: str = "decomposer", coverage_threshold: float = 0.8):
        self.name = model
        self.role = role
        self.coverage_threshold = coverage_threshold

    def _decompose(self, req: Request) -> Completion:
        row = req.row
        subqs, _ = gold_pairs(row)
        if not subqs and row.get("gold_subquestions") is None:
            return Completion(error=f"row {row.get('id')!r} has no gold decomposition for the reference teacher")
        return Completion(text=format_subquestions(perturb(subqs, req.sample_index, str(row.get("id")))))

    def _solve(self, req: Request) -> Completion:
        row = req.row
        gold = (row.get("answers") or [""])[0]
        given = list(row.get("subquestions") or [])
        gold_q, gold_a = gold_pairs(row)
        if gold_q:
            coverage = rouge_l(" ".join(given), " ".join(gold_q))["recall"]
            correct = coverage >= self.coverage_threshold and len(given) >= len(gold_q)
        else:
            correct = True
        subanswers = [gold_a[i] if i < len(gold_a) else "" for i in range(len(given))]
        return Completion(text=format_solver_output(subanswers, gold if correct else _wrong_answer(gold)))

    def _dynamic_step(self, req: Request) -> Completion:
        """Self-ask decomposer: the next gold subquestion as a follow-up, then the final answer."""
        gold_q, _ = gold_pairs(req.row)
        asked = len(req.row.get("history") or [])
        if asked < len(gold_q):
            return Completion(text=f"Follow up: {gold_q[asked]}")
        return Completion(text=f"So the final answer is: {(req.row.get('answers') or [''])[0]}")

    def _dynamic_answer(self, req: Request) -> Completion:
        _, gold_a = gold_pairs(req.row)
        asked = len(req.row.get("history") or [])
        return Completion(text=gold_a[asked] if asked < len(gold_a) else "unknown")

    def generate(self, requests: list[Request], params: SamplingParams) -> list[Completion]:
        roles = {"decomposer": self._decompose, "solver": self._solve, "dynamic_decomposer": self._dynamic_step,
                 "dynamic_solver": self._dynamic_answer, "direct": self._solve}
        out = []
        for req in requests:
            c = roles[req.role](req)
            c.prompt_tokens = sum(_word_count(m["content"]) for m in req.messages)
            c.completion_tokens = _word_count(c.text)
            c.finish_reason = "stop" if c.error is None else None
            out.append(c)
        return out
