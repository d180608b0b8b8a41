"""The paper's method, written once: two-stage reasoning and its baselines.

A **system** answers one question by calling models: the static two-stage system (decompose
once, then solve every subquestion in order), its second stage alone (``solve`` starts from the
teacher's decompositions), the dynamic self-ask variant, and the single-stage baselines (direct,
chain of thought). Each is a *program*: a generator that yields a :class:`Call` (which stage,
which prompt) and receives the model's :class:`~pipeline.backends.base.Completion`, and returns an
:class:`Outcome` (subquestions, subanswers, prediction, warnings, per-stage usage). Prompt
building, parsing, answer extraction and scoring are pure functions around those calls, in the
style of Ray Data LLM's processors.

Why generators: the same program runs under two drivers without a second copy of the method.
:func:`run_batched` advances many programs in lockstep and sends each round's calls as one batch
per role (the ``solve`` and ``infer`` jobs on Ray Data actors); :func:`run_async` awaits one
program's calls in turn (the served ``/v1/solve`` route). So a question gets the same
subquestions, answers and score offline and online (``tests/test_agreement.py`` checks it).

Also here: :class:`MethodConfig`, the method's settings (the ``method:`` section of the generate,
solve, infer and serve configs), and :class:`Usage`, the one per-stage tally of calls and tokens
(output rows, shard markers, the cost ledger and ``divconq estimate`` all count with it).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Awaitable, Callable, Generator, Literal, Mapping, Optional

from pydantic import Field

from pipeline import datasets, metrics, prompts
from pipeline.backends.base import Backend, Completion, Request, SamplingParams
from pipeline.config import Strict
from pipeline.parsing import ParseError, extract_answer, parse_dynamic_step, parse_solver_output
from pipeline.structured import parse_decomposition

Messages = list[dict[str, str]]
Stage = Literal["decomposer", "solver"]
STAGES: tuple[Stage, ...] = ("decomposer", "solver")
Mode = Literal["static", "dynamic", "direct", "cot"]
MODES: tuple[str, ...] = ("static", "dynamic", "direct", "cot")


class MethodConfig(Strict, frozen=True):
    """The method's own settings: the ``method:`` section of the generate, solve, infer and serve configs
    (each job reads the fields it uses)."""

    max_subquestions: int = Field(10, ge=1, description="The one cap on a decomposition (the paper's Table 10 varies it).")
    decomposer_few_shot: bool = Field(False, description="Worked demos in the decomposer prompt: teachers want them; "
                                                         "students are trained zero-shot.")
    solver_few_shot: bool = Field(True, description="The worked demonstration in the solver prompt.")
    max_dynamic_steps: int = Field(6, ge=1, description="Dynamic (self-ask): follow-ups before the attempt ends unanswered.")
    drop_f1_threshold: float = Field(0.5, ge=0.0, le=1.0, description="f1-scored datasets (DROP): correct when F1 >= this.")


def legacy_method_keys(data: Any, where: Mapping[str, str]) -> Any:
    """A config mapping with its pre-``method:`` keys (``where``: old dotted key -> MethodConfig field) moved
    into its ``method`` section, so configs written before the section existed keep working. A key given
    both ways keeps the old spelling's value (it is the more specific: a command-line override)."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    moved: dict[str, Any] = {}
    for old, new in where.items():
        section, _, key = old.rpartition(".")
        node = data.get(section) if section else data
        if isinstance(node, dict) and key in node:
            node = dict(node)
            moved[new] = node.pop(key)
            if section:
                data[section] = node
            else:
                data = node
    if moved:
        method = data.get("method")
        data["method"] = {**(method.model_dump(exclude_unset=True) if isinstance(method, MethodConfig) else method or {}),
                          **moved}
    return data


@dataclass(frozen=True)
class Call:
    """One model call a program asks for: the stage billed for it, the request role the backend
    sees (structured output and the reference backends key on it), the chat prompt, and the row as
    this call sees it (with the subquestions it answers, or the self-ask history so far; the offline
    reference backends read their gold from it)."""

    stage: Stage
    role: str
    messages: Messages
    row: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass
class StageUsage:
    """Calls and tokens of one stage. Replies from the response cache count in every figure and, apart,
    in ``cached_*`` (they cost nothing: the cost ledger bills the rest)."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_calls: int = 0
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0
    truncated_prompts: int = 0
    latency_s: float = 0.0

    def add(self, c: Completion) -> None:
        self.count(c.prompt_tokens, c.completion_tokens)
        self.truncated_prompts += int(c.prompt_truncated)
        self.latency_s += c.latency_s
        if c.cached:
            self.cached_calls += 1
            self.cached_prompt_tokens += c.prompt_tokens
            self.cached_completion_tokens += c.completion_tokens

    def count(self, prompt_tokens: int, completion_tokens: int, calls: int = 1) -> None:
        """``calls`` calls of these token counts each (``divconq estimate`` counts prompts it never sends)."""
        self.calls += calls
        self.prompt_tokens += calls * prompt_tokens
        self.completion_tokens += calls * completion_tokens

    def merge(self, other: "StageUsage") -> "StageUsage":
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    @classmethod
    def of(cls, completions: Any) -> "StageUsage":
        tally = cls()
        for c in completions:
            tally.add(c)
        return tally


@dataclass
class Usage:
    """Calls and tokens per stage: the one token tally (a question's in its output row, a shard's in its
    commit marker, and what the cost ledger prices)."""

    stages: dict[str, StageUsage] = field(default_factory=lambda: {s: StageUsage() for s in STAGES})

    def add(self, stage: Stage, c: Completion) -> None:
        self.stages[stage].add(c)

    def merge(self, other: "Usage") -> "Usage":
        for stage, tally in other.stages.items():
            self.stages.setdefault(stage, StageUsage()).merge(tally)
        return self

    @property
    def calls(self) -> dict[str, int]:
        return {stage: t.calls for stage, t in self.stages.items()}

    @property
    def total_tokens(self) -> int:
        return sum(t.prompt_tokens + t.completion_tokens for t in self.stages.values())

    def fields(self) -> dict[str, int]:
        """The per-stage columns of an output row."""
        out: dict[str, int] = {}
        for stage in STAGES:
            t = self.stages[stage]
            out.update({f"{stage}_calls": t.calls, f"{stage}_prompt_tokens": t.prompt_tokens,
                        f"{stage}_completion_tokens": t.completion_tokens})
        return out

    def counters(self) -> dict[str, float]:
        """The token counters of a shard's commit marker (summed over committed shards into the manifest)."""
        every = StageUsage()
        for t in self.stages.values():
            every.merge(t)
        return {"prompt_tokens": every.prompt_tokens, "completion_tokens": every.completion_tokens,
                "cached": every.cached_calls, "truncated_prompts": every.truncated_prompts, "latency_s": every.latency_s}


@dataclass
class Outcome:
    """What a system made of one question. ``error`` (a model call failed) means no answer at all:
    the row goes to quarantine and counts as wrong; an unparseable reply is *not* an error."""

    subquestions: Optional[list[str]] = None
    decomposition_parsed: Optional[bool] = None
    subanswers: Optional[list[str]] = None
    prediction: Optional[str] = None
    decomposer_text: Optional[str] = None
    solver_text: Optional[str] = None
    warnings: list[str] = field(default_factory=list)
    error: Optional[str] = None
    usage: Usage = field(default_factory=Usage)

    @property
    def warning(self) -> Optional[str]:
        return "; ".join(self.warnings) or None


Program = Generator[Call, Completion, Outcome]


# ------------------------------------------------------------------ reading replies (pure)
def read_decomposition(text: str, max_subquestions: int) -> tuple[list[str], bool]:
    """``(subquestions, parsed)``: the numbered list (or JSON) of a decomposer reply, capped. An
    unparseable reply is read as "No decomposition" (``[]``, ``False``): the solver then answers
    the question directly, which is what a real deployment of the method would do."""
    try:
        return parse_decomposition(text, max_subquestions), True
    except ParseError:
        return [], False


def read_solution(text: str, dataset: str, n_subquestions: int) -> tuple[list[str], Optional[str], list[str]]:
    """``(subanswers, prediction, warnings)`` of a solver reply: the "A1: ..." lines, the answer
    after the last "The answer is:" (for numeric datasets else the last number), and what was odd."""
    subanswers, marked = parse_solver_output(text)
    prediction = extract_answer(text, dataset)
    warnings = []
    if prediction is None:
        warnings.append("no final answer in solver output (scored wrong)")
    elif marked is None:
        warnings.append("no 'The answer is:' marker; used the last number in the solver output")
    if len(subanswers) != n_subquestions:
        warnings.append(f"{len(subanswers)} subanswers for {n_subquestions} subquestions")
    return subanswers, prediction, warnings


def score(row: dict[str, Any], prediction: Optional[str], drop_f1_threshold: float = 0.5) -> dict[str, Any]:
    """``{"em", "f1", "correct"}`` of a prediction against the row's gold answers (its dataset's metric)."""
    return metrics.score(row["dataset"], prediction, list(row.get("answers") or []), f1_threshold=drop_f1_threshold)


def input_problem(row: dict[str, Any]) -> Optional[str]:
    """Why a question cannot be answered and scored (a dataset the registry does not know), else None."""
    if datasets.find(row.get("dataset")) is None:
        return f"unknown dataset {row.get('dataset')!r} (no metric; known: {sorted(datasets.names())})"
    return None


# ------------------------------------------------------------------ the systems (programs)
def decompose_call(row: dict[str, Any], s: MethodConfig) -> Call:
    """The first stage's call: all subquestions at once (``generate`` asks the teacher exactly this)."""
    return Call("decomposer", "decomposer", prompts.decomposer_messages(row, few_shot=s.decomposer_few_shot), row)


def static(row: dict[str, Any], s: MethodConfig) -> Program:
    """The paper's method: decompose once, then solve the subquestions in order (2 calls)."""
    out = Outcome()
    dec = yield decompose_call(row, s)
    out.usage.add("decomposer", dec)
    out.decomposer_text = dec.text
    if dec.error:
        out.error = f"decomposer error: {dec.error}"
        return out
    out.subquestions, out.decomposition_parsed = read_decomposition(dec.text, s.max_subquestions)
    return (yield from solve_given(row, out.subquestions, s, out))


def solve_given(row: dict[str, Any], subquestions: list[str], s: MethodConfig, out: Optional[Outcome] = None) -> Program:
    """The second stage alone: the solver answers ``subquestions`` in order, each answer seeing the
    earlier ones (one generation), then gives the final answer."""
    out = out if out is not None else Outcome(subquestions=list(subquestions))
    sol = yield Call("solver", "solver", prompts.solver_messages(row, list(subquestions), few_shot=s.solver_few_shot),
                     {**row, "subquestions": list(subquestions)})
    out.usage.add("solver", sol)
    out.solver_text = sol.text
    if sol.error:
        out.error = f"solver error: {sol.error}"
        return out
    out.subanswers, out.prediction, warnings = read_solution(sol.text, row["dataset"], len(subquestions))
    out.warnings.extend(warnings)
    return out


def dynamic(row: dict[str, Any], s: MethodConfig) -> Program:
    """Self-ask: the decomposer asks one follow-up at a time and the solver answers it; the whole
    transcript goes back to the decomposer every step, until it gives the final answer."""
    out = Outcome(subquestions=[], subanswers=[], decomposition_parsed=True, decomposer_text="")
    history: list[tuple[str, str]] = []
    for _ in range(s.max_dynamic_steps):
        seen = {**row, "history": list(history)}
        step = yield Call("decomposer", "dynamic_decomposer", prompts.dynamic_messages(row, history, few_shot=s.decomposer_few_shot),
                          seen)
        out.usage.add("decomposer", step)
        out.decomposer_text = (out.decomposer_text or "") + step.text + "\n"
        if step.error:
            out.error = f"decomposer error: {step.error}"
            return out
        try:
            kind, text = parse_dynamic_step(step.text)
        except ParseError:  # no follow-up and no answer: the attempt ends without a prediction
            out.decomposition_parsed = False
            return out
        if kind == "final":
            out.prediction = text
            return out
        ans = yield Call("solver", "dynamic_solver", prompts.dynamic_answer_messages(row, history, text, few_shot=s.solver_few_shot),
                         seen)
        out.usage.add("solver", ans)
        if ans.error:
            out.error = f"solver error: {ans.error}"
            return out
        history.append((text, ans.text.strip()))
        out.subquestions.append(text)
        out.subanswers.append(ans.text.strip())
    out.warnings.append(f"no final answer after {s.max_dynamic_steps} steps (scored wrong)")
    return out


def single_stage(row: dict[str, Any], s: MethodConfig, mode: Literal["direct", "cot"] = "direct") -> Program:
    """The single-stage baselines: the solver answers alone, directly or thinking step by step."""
    build = prompts.direct_messages if mode == "direct" else prompts.cot_messages
    out = Outcome()
    sol = yield Call("solver", "direct", build(row, few_shot=s.solver_few_shot), row)
    out.usage.add("solver", sol)
    out.solver_text = sol.text
    if sol.error:
        out.error = f"solver error: {sol.error}"
        return out
    out.subanswers, out.prediction, warnings = read_solution(sol.text, row["dataset"], 0)
    out.warnings.extend(w for w in warnings if "subanswers for" not in w)
    return out


def program(mode: str, row: dict[str, Any], s: MethodConfig) -> Program:
    """The program of ``mode`` (``static``, ``dynamic``, ``direct`` or ``cot``) for one question."""
    if mode == "static":
        return static(row, s)
    if mode == "dynamic":
        return dynamic(row, s)
    if mode in ("direct", "cot"):
        return single_stage(row, s, mode)  # type: ignore[arg-type]
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


# ------------------------------------------------------------------ drivers
BatchCall = Callable[[str, list[Call]], list[Completion]]


def run_batched(programs: list[Program], call: BatchCall) -> list[Outcome]:
    """Run many programs together: every round, the pending calls of one role go to ``call(role,
    calls)`` as one batch (a backend batches them on the model), and each program resumes with its
    completion. Programs finish at different rounds (dynamic ones take more)."""
    outcomes: list[Optional[Outcome]] = [None] * len(programs)
    pending: dict[int, Call] = {}

    def advance(i: int, reply: Optional[Completion]) -> None:
        try:
            pending[i] = programs[i].send(reply)  # type: ignore[arg-type]
        except StopIteration as done:
            outcomes[i] = done.value

    for i in range(len(programs)):
        advance(i, None)
    while pending:
        by_role: dict[str, list[int]] = {}
        for i, c in pending.items():
            by_role.setdefault(c.role, []).append(i)
        for role, idxs in by_role.items():
            calls = [pending.pop(i) for i in idxs]
            replies = call(role, calls)
            if len(replies) != len(calls):
                raise RuntimeError(f"{role}: {len(replies)} completions for {len(calls)} calls")
            for i, reply in zip(idxs, replies):
                advance(i, reply)
    return [o for o in outcomes if o is not None]


def requests_of(calls: list[Call]) -> list[Request]:
    """The backend requests of a batch of calls (a row's ``sample_index`` shifts the sampling seed)."""
    return [Request(messages=c.messages, sample_index=int(c.row.get("sample_index") or 0), row=c.row, role=c.role)
            for c in calls]


def on_backends(backends: Mapping[str, Optional[Backend]], params: Mapping[str, SamplingParams]) -> BatchCall:
    """:func:`run_batched`'s ``call`` over the project's backends: a batch of one stage's calls is one
    ``generate`` on that stage's backend with that stage's sampling (the ``solve`` and ``infer`` actors)."""

    def call(role: str, calls: list[Call]) -> list[Completion]:
        stage = calls[0].stage
        backend = backends.get(stage)
        if backend is None:
            raise ValueError(f"a {role!r} call needs a {stage} backend, and none is configured")
        return backend.generate(requests_of(calls), params[stage])

    return call


async def run_async(prog: Program, call: Callable[[Call], Awaitable[Completion]]) -> Outcome:
    """Run one program, awaiting each of its calls (a served request)."""
    try:
        c = next(prog)
        while True:
            c = prog.send(await call(c))
    except StopIteration as done:
        return done.value
