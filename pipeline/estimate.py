"""``divconq estimate``: what a generate / solve / infer config will send and cost, before anything is spent.

It reads the job's input rows (nothing else: no Ray, no request), builds every prompt exactly as the
job would, and counts:

* **requests** per stage (``sampling.n`` requests per question for generate; 2 per question for
  static infer; one per dynamic step, estimated from the gold decomposition's length);
* **prompt tokens**, with the teacher's tokenizer where known: the backend's ``tokenizer`` (a local
  Hugging Face tokenizer dir) or, for ``type: hf``, the model's own; ``tiktoken`` for OpenAI model
  names when it is installed; otherwise the documented approximation of 4 characters per token
  (OpenAI's rule of thumb for English) plus 3 tokens per message and 3 for the reply (the chat
  format's overhead);
* **completion tokens**: *expected* is the length of the gold target where the row has one (the
  gold decomposition for a decomposer, the gold answers for a solver), capped at ``max_tokens``;
  *max* is ``max_tokens`` per request, the most the job can be billed;

and prices both online and in batch mode from the same table as the cost ledger
(:mod:`pipeline.cost`).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Iterable, Optional, Union

from pipeline import method, prompts
from pipeline.backends.base import Completion
from pipeline.backends.reference import gold_pairs
from pipeline.config import ConfigError
from pipeline.cost import price_of, price_tokens
from pipeline.generation import GenerateConfig
from pipeline.inference import InferConfig
from pipeline.manifest import Manifest
from pipeline.method import Call, MethodConfig, StageUsage
from pipeline.parsing import format_subquestions
from pipeline.solving import SolveConfig

APPROX_CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD = 3
REPLY_OVERHEAD = 3


class TokenCounter:
    """Counts chat prompts and texts in the backend's tokens (see the module docstring)."""

    def __init__(self, backend_cfg: Any) -> None:
        self.method = f"approximation ({APPROX_CHARS_PER_TOKEN} chars/token)"
        self._encode: Optional[Callable[[str], int]] = None
        self._chat: Optional[Callable[[list], int]] = None
        path = getattr(backend_cfg, "tokenizer", None) or (backend_cfg.model if backend_cfg.type in ("hf", "vllm") else None)
        if path and os.path.isdir(os.path.expanduser(path)):
            self._from_hf(os.path.expanduser(path))
        elif backend_cfg.type == "openai":
            self._from_tiktoken(backend_cfg.model)

    def _from_hf(self, path: str) -> None:
        from transformers import AutoTokenizer  # lazy: ~2 s to import, needed only for a local tokenizer dir

        tok = AutoTokenizer.from_pretrained(path)
        self._encode = lambda text: len(tok.encode(text, add_special_tokens=False))
        if getattr(tok, "chat_template", None):
            self._chat = lambda msgs: len(tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True))
        self.method = f"tokenizer {path}"

    def _from_tiktoken(self, model: str) -> None:
        try:
            import tiktoken  # lazy: optional (not a dependency); without it tokens are approximated
        except ImportError:
            return
        try:
            enc = tiktoken.encoding_for_model(model)
        except KeyError:
            return
        self._encode = lambda text: len(enc.encode(text))
        self.method = f"tiktoken {enc.name}"

    def text(self, text: str) -> int:
        if self._encode is not None:
            return self._encode(text)
        return math.ceil(len(text) / APPROX_CHARS_PER_TOKEN)

    def messages(self, messages: list) -> int:
        if self._chat is not None:
            return self._chat(messages)
        return sum(self.text(str(m.get("content") or "")) + MESSAGE_OVERHEAD for m in messages) + REPLY_OVERHEAD


class StageEstimate:
    """What one stage would send: its calls and tokens (a :class:`~pipeline.method.StageUsage` of prompts
    counted, not sent), with the counter, model and token cap they are counted and priced by."""

    def __init__(self, stage: str, backend_cfg: Any, sampling: Any) -> None:
        self.stage, self.backend_cfg, self.max_tokens = stage, backend_cfg, sampling.max_tokens
        self.counter = TokenCounter(backend_cfg)
        self.usage = StageUsage()

    def add(self, messages: list, target: Optional[str], times: int = 1) -> Completion:
        """Count ``times`` requests of ``messages`` answered by ``target`` (None: a reply of ``max_tokens``)."""
        expected = min(self.counter.text(target), self.max_tokens) if target else self.max_tokens
        prompt = self.counter.messages(messages)
        self.usage.count(prompt, expected, calls=times)
        return Completion(text=target or "", prompt_tokens=prompt, completion_tokens=expected)

    def result(self, pricing: Any) -> dict[str, Any]:
        model, u = self.backend_cfg.model, self.usage
        price, source = price_of(model, pricing)
        max_completion = u.calls * self.max_tokens
        cost = {f"{mode}_cost{suffix}": round(price_tokens(price, u.prompt_tokens, completion, mode), 6)
                for mode in ("online", "batch") for suffix, completion in (("", u.completion_tokens), ("_max", max_completion))}
        return {"stage": self.stage, "model": model, "mode": getattr(self.backend_cfg, "mode", "online"),
                "requests": u.calls, "prompt_tokens": u.prompt_tokens,
                "expected_completion_tokens": u.completion_tokens, "max_completion_tokens": max_completion,
                "token_counting": self.counter.method, "price_source": source, **cost}


def _gold_decomposition(row: dict) -> Optional[str]:
    subqs, _ = gold_pairs(row)
    return format_subquestions(subqs) if row.get("gold_subquestions") is not None else None


def _gold_solution(row: dict, subquestions: list[str]) -> Optional[str]:
    _, subas = gold_pairs(row)
    answers = list(row.get("answers") or [])
    if not answers:
        return None
    return prompts.format_solver_output(subas[: len(subquestions)] if subas else [""] * len(subquestions), answers[0])


def _gold_reply(call: Call, s: MethodConfig) -> Optional[str]:
    """What a model that knew the row's gold would answer ``call`` (the expected completion's length)."""
    row = call.row
    gold_q, gold_a = gold_pairs(row)
    asked = len(row.get("history") or [])
    if call.role == "decomposer":
        return _gold_decomposition(row)
    if call.role == "dynamic_decomposer":  # one gold step per call, the final answer when they run out (or the steps do)
        if asked < min(len(gold_q), s.max_dynamic_steps - 1):
            return f"Follow up: {gold_q[asked]}"
        return f"So the final answer is: {(row.get('answers') or [''])[0]}"
    if call.role == "dynamic_solver":
        return gold_a[asked] if asked < len(gold_a) else None
    return _gold_solution(row, list(row.get("subquestions") or []))  # solver, direct


def _replayed(programs: list, tallies: dict[str, StageEstimate], s: MethodConfig) -> None:
    """Run the jobs' own programs (:mod:`pipeline.method`) against a gold replay, counting every call's
    prompt and expected reply: the prompts are exactly the job's, none is sent."""

    def call(role: str, calls: list[Call]) -> list[Completion]:
        return [tallies[c.stage].add(c.messages, _gold_reply(c, s)) for c in calls]

    method.run_batched(programs, call)


def _generate(cfg: Any) -> list[StageEstimate]:
    t = StageEstimate("decomposer", cfg.teacher, cfg.sampling)
    for row in cfg.input.rows():
        t.add(method.decompose_call(row, cfg.method).messages, _gold_decomposition(row), times=cfg.sampling.n)
    return [t]


def _solve(cfg: Any) -> list[StageEstimate]:
    t = StageEstimate("solver", cfg.solver, cfg.sampling)
    # rows without subquestions: the job quarantines them without a request
    programs = [method.solve_given(row, list(row["subquestions"]), cfg.method) for row in cfg.input.rows()
                if row.get("subquestions") is not None]
    _replayed(programs, {"solver": t}, cfg.method)
    return [t]


def _infer(cfg: Any) -> list[StageEstimate]:
    tallies = {"solver": StageEstimate("solver", cfg.solver, cfg.solver_sampling)}
    if cfg.decomposer is not None:
        tallies["decomposer"] = StageEstimate("decomposer", cfg.decomposer, cfg.decomposer_sampling)
    _replayed([method.program(cfg.mode, row, cfg.method) for row in cfg.input.rows()], tallies, cfg.method)
    return [t for t in (tallies.get("decomposer"), tallies["solver"]) if t is not None and t.usage.calls]


ESTIMATORS: dict[str, Callable[[Any], list[StageEstimate]]] = {"generate": _generate, "solve": _solve, "infer": _infer}
CONFIGS = {"generate": GenerateConfig, "solve": SolveConfig, "infer": InferConfig}
EstimatedConfig = Union[GenerateConfig, SolveConfig, InferConfig]


def job_of(data: dict) -> str:
    """Which job a config file is for, from its top-level keys."""
    if "teacher" in data:
        return "generate"
    if {"decomposer", "setting", "mode"} & set(data):
        return "infer"
    if "solver" in data:
        return "solve"
    raise ConfigError("cannot tell which job this config is for (no teacher, solver or decomposer key); pass --job")


def estimate(job: str, cfg: Any) -> dict[str, Any]:
    """Requests, tokens and expected cost (online and batch) per stage of ``cfg`` (a job config)."""
    stages = [t.result(cfg.pricing) for t in ESTIMATORS[job](cfg)]
    totals = {k: round(sum(s[k] for s in stages), 6) for k in
              ("requests", "prompt_tokens", "expected_completion_tokens", "max_completion_tokens",
               "online_cost", "batch_cost", "online_cost_max", "batch_cost_max")}
    return {"job": job, "stages": stages, "total": totals, "currency": cfg.pricing.currency}


def render(result: dict[str, Any]) -> str:
    cur = result["currency"]
    lines = [f"divconq estimate: {result['job']} (nothing sent)", "",
             "| stage | model | requests | prompt tokens | completion tokens (expected / max) | online | batch | tokens counted with | price |",
             "|---|---|---:|---:|---:|---:|---:|---|---|"]
    rows: Iterable[dict[str, Any]] = list(result["stages"]) + [{**result["total"], "stage": "total", "model": "",
                                                                  "token_counting": "", "price_source": ""}]
    for s in rows:
        lines.append(f"| {s['stage']} | {s['model']} | {s['requests']} | {s['prompt_tokens']} | "
                     f"{s['expected_completion_tokens']} / {s['max_completion_tokens']} | "
                     f"{s['online_cost']:.4f} (max {s['online_cost_max']:.4f}) {cur} | "
                     f"{s['batch_cost']:.4f} (max {s['batch_cost_max']:.4f}) {cur} | {s['token_counting']} | {s['price_source']} |")
    return "\n".join(lines)


def run(cfg: EstimatedConfig) -> Manifest:
    """The estimate job: what the generate, solve or infer job of ``cfg`` would send and cost (in
    ``manifest.estimate``; :func:`render` makes it a table). Nothing is sent and nothing is written."""
    started = time.time()
    job = next(name for name, model in CONFIGS.items() if isinstance(cfg, model))
    result = estimate(job, cfg)
    counts = {k: result["total"][k] for k in ("requests", "prompt_tokens", "expected_completion_tokens", "max_completion_tokens")}
    return Manifest.of("estimate", cfg, inputs={"questions": cfg.input.path}, counts=counts, started_at=started,
                       extra={"estimate": result})
