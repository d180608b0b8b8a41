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

from pipeline import prompts
from pipeline.backends.reference import gold_pairs
from pipeline.config import ConfigError
from pipeline.cost import price_of, price_tokens
from pipeline.generation import GenerateConfig
from pipeline.inference import InferConfig
from pipeline.manifest import Manifest
from pipeline.outputs import filtered_rows
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


class StageTally:
    def __init__(self, stage: str, backend_cfg: Any, sampling: Any) -> None:
        self.stage, self.backend_cfg, self.max_tokens = stage, backend_cfg, sampling.max_tokens
        self.counter = TokenCounter(backend_cfg)
        self.requests = self.prompt_tokens = self.expected_completion = 0

    def add(self, messages: list, target: Optional[str], times: int = 1) -> None:
        expected = min(self.counter.text(target), self.max_tokens) if target else self.max_tokens
        self.requests += times
        self.prompt_tokens += times * self.counter.messages(messages)
        self.expected_completion += times * expected

    def result(self, pricing: Any) -> dict[str, Any]:
        model = self.backend_cfg.model
        price, source = price_of(model, pricing)
        max_completion = self.requests * self.max_tokens
        cost = {f"{mode}_cost{suffix}": round(price_tokens(price, self.prompt_tokens, completion, mode), 6)
                for mode in ("online", "batch") for suffix, completion in (("", self.expected_completion), ("_max", max_completion))}
        return {"stage": self.stage, "model": model, "mode": getattr(self.backend_cfg, "mode", "online"),
                "requests": self.requests, "prompt_tokens": self.prompt_tokens,
                "expected_completion_tokens": self.expected_completion, "max_completion_tokens": max_completion,
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


def _generate(cfg: Any) -> list[StageTally]:
    t = StageTally("decomposer", cfg.teacher, cfg.sampling)
    for row in filtered_rows(cfg.input):
        t.add(prompts.decomposer_messages(row, few_shot=cfg.few_shot), _gold_decomposition(row), times=cfg.sampling.n)
    return [t]


def _solve(cfg: Any) -> list[StageTally]:
    t = StageTally("solver", cfg.solver, cfg.sampling)
    for row in filtered_rows(cfg.input):
        if row.get("subquestions") is None:
            continue  # the job quarantines these without a request
        subqs = list(row["subquestions"])
        t.add(prompts.solver_messages(row, subqs, few_shot=cfg.few_shot), _gold_solution(row, subqs))
    return [t]


def _infer(cfg: Any) -> list[StageTally]:
    dec = StageTally("decomposer", cfg.decomposer, cfg.decomposer_sampling) if cfg.decomposer is not None else None
    sol = StageTally("solver", cfg.solver, cfg.solver_sampling)
    for row in filtered_rows(cfg.input):
        subqs, subas = gold_pairs(row)
        if cfg.mode == "static":
            dec.add(prompts.decomposer_messages(row, few_shot=cfg.decomposer_few_shot), _gold_decomposition(row))
            sol.add(prompts.solver_messages(row, subqs, few_shot=cfg.solver_few_shot), _gold_solution(row, subqs))
        elif cfg.mode == "dynamic":  # one decomposer + one solver call per gold step, then the final answer
            history: list[tuple[str, str]] = []
            for q, a in list(zip(subqs, subas))[: cfg.max_dynamic_steps - 1]:
                dec.add(prompts.dynamic_messages(row, history, few_shot=cfg.decomposer_few_shot), f"Follow up: {q}")
                sol.add(prompts.dynamic_answer_messages(row, history, q, few_shot=cfg.solver_few_shot), a)
                history.append((q, a))
            answers = list(row.get("answers") or [""])
            dec.add(prompts.dynamic_messages(row, history, few_shot=cfg.decomposer_few_shot), f"So the final answer is: {answers[0]}")
        else:
            build = prompts.direct_messages if cfg.mode == "direct" else prompts.cot_messages
            sol.add(build(row, few_shot=cfg.solver_few_shot), _gold_solution(row, []))
    return [t for t in (dec, sol) if t is not None and t.requests]


ESTIMATORS: dict[str, Callable[[Any], list[StageTally]]] = {"generate": _generate, "solve": _solve, "infer": _infer}
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
