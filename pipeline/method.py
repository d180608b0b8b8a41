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
subquestions, answers and score offline and online.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Generator, Literal, Optional

from pipeline import metrics, prompts
from pipeline.backends.base import Completion
from pipeline.parsing import ParseError, extract_answer, parse_dynamic_step, parse_solver_output
from pipeline.structured import parse_decomposition

Messages = list[dict[str, str]]
Stage = Literal["decomposer", "solver"]
Mode = Literal["static", "dynamic", "direct", "cot"]
MODES: tuple[str, ...] = ("static", "dynamic", "direct", "cot")


@dataclass(frozen=True)
class Settings:
    """What the method itself needs to know (the jobs and the serve app build it from their configs)."""

    max_subquestions: int = 10  # the one cap on a decomposition (the paper's Table 10 varies it)
    decomposer_few_shot: bool = False  # students are trained zero-shot; teachers want the demos
    solver_few_shot: bool = True
    max_dynamic_steps: int = 6
    drop_f1_threshold: float = 0.5


@dataclass(frozen=True)
class Call:
    """One model call a program asks for: the stage billed for it, the request role the backend
    sees (structured output and the reference backends key on it), and the chat prompt."""

    stage: Stage
    role: str
    messages: Messages


@dataclass
class Usage:
    """Calls and tokens per stage of one question (the one per-question token tally)."""

    calls: dict[str, int] = field(default_factory=lambda: {"decomposer": 0, "solver": 0})
    prompt_tokens: dict[str, int] = field(default_factory=lambda: {"decomposer": 0, "solver": 0})
    completion_tokens: dict[str, int] = field(default_factory=lambda: {"decomposer": 0, "solver": 0})
    truncated_prompts: int = 0

    def add(self, stage: Stage, c: Completion) -> None:
        self.calls[stage] += 1
        self.prompt_tokens[stage] += c.prompt_tokens
        self.completion_tokens[stage] += c.completion_tokens
        self.truncated_prompts += int(c.prompt_truncated)

    def fields(self) -> dict[str, int]:
        """The per-stage columns of an output row."""
        out: dict[str, int] = {}
        for stage in ("decomposer", "solver"):
            out[f"{stage}_calls"] = self.calls[stage]
            out[f"{stage}_prompt_tokens"] = self.prompt_tokens[stage]
            out[f"{stage}_completion_tokens"] = self.completion_tokens[stage]
        return out

    @property
    def total_tokens(self) -> int:
        return sum(self.prompt_tokens.values()) + sum(self.completion_tokens.values())


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


# ------------------------------------------------------------------ the systems (programs)
def static(row: dict[str, Any], s: Settings) -> Program:
    """The paper's method: decompose once, then solve the subquestions in order (2 calls)."""
    out = Outcome()
    dec = yield Call("decomposer", "decomposer", prompts.decomposer_messages(row, few_shot=s.decomposer_few_shot))
    out.usage.add("decomposer", dec)
    out.decomposer_text = dec.text
    if dec.error:
        out.error = f"decomposer error: {dec.error}"
        return out
    out.subquestions, out.decomposition_parsed = read_decomposition(dec.text, s.max_subquestions)
    return (yield from solve_given(row, out.subquestions, s, out))


def solve_given(row: dict[str, Any], subquestions: list[str], s: Settings, out: Optional[Outcome] = None) -> Program:
    """The second stage alone: the solver answers ``subquestions`` in order, each answer seeing the
    earlier ones (one generation), then gives the final answer."""
    out = out if out is not None else Outcome(subquestions=list(subquestions))
    sol = yield Call("solver", "solver", prompts.solver_messages(row, list(subquestions), few_shot=s.solver_few_shot))
    out.usage.add("solver", sol)
    out.solver_text = sol.text
    if sol.error:
        out.error = f"solver error: {sol.error}"
        return out
    out.subanswers, out.prediction, warnings = read_solution(sol.text, row["dataset"], len(subquestions))
    out.warnings.extend(warnings)
    return out


def dynamic(row: dict[str, Any], s: Settings) -> Program:
    """Self-ask: the decomposer asks one follow-up at a time and the solver answers it; the whole
    transcript goes back to the decomposer every step, until it gives the final answer."""
    out = Outcome(subquestions=[], subanswers=[], decomposition_parsed=True, decomposer_text="")
    history: list[tuple[str, str]] = []
    for _ in range(s.max_dynamic_steps):
        step = yield Call("decomposer", "dynamic_decomposer", prompts.dynamic_messages(row, history, few_shot=s.decomposer_few_shot))
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
        ans = yield Call("solver", "dynamic_solver", prompts.dynamic_answer_messages(row, history, text, few_shot=s.solver_few_shot))
        out.usage.add("solver", ans)
        if ans.error:
            out.error = f"solver error: {ans.error}"
            return out
        history.append((text, ans.text.strip()))
        out.subquestions.append(text)
        out.subanswers.append(ans.text.strip())
    out.warnings.append(f"no final answer after {s.max_dynamic_steps} steps (scored wrong)")
    return out


def single_stage(row: dict[str, Any], s: Settings, mode: Literal["direct", "cot"] = "direct") -> Program:
    """The single-stage baselines: the solver answers alone, directly or thinking step by step."""
    build = prompts.direct_messages if mode == "direct" else prompts.cot_messages
    out = Outcome()
    sol = yield Call("solver", "direct", build(row, few_shot=s.solver_few_shot))
    out.usage.add("solver", sol)
    out.solver_text = sol.text
    if sol.error:
        out.error = f"solver error: {sol.error}"
        return out
    out.subanswers, out.prediction, warnings = read_solution(sol.text, row["dataset"], 0)
    out.warnings.extend(w for w in warnings if "subanswers for" not in w)
    return out


def program(mode: str, row: dict[str, Any], s: Settings) -> Program:
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


async def run_async(prog: Program, call: Callable[[Call], Awaitable[Completion]]) -> Outcome:
    """Run one program, awaiting each of its calls (a served request)."""
    try:
        c = next(prog)
        while True:
            c = prog.send(await call(c))
    except StopIteration as done:
        return done.value
