"""A generated world: the embedded miniature of the paper's experiment (issue 12, part 2).

A fictional world of people, cities and companies, deterministic from a seed, with
multi-hop questions over it in three families, shipped as a dataset adapter like the
other corpora (``{dataset: world, split: test}`` in ``prepare``; no file needed).

Families (the ``dataset`` field of each row, which picks the metric):

* ``world_chain`` (Bamboogle-like, accuracy): two-hop entity chains, e.g. "In which city
  was the founder of Vantor Mills born?" -> "Who founded Vantor Mills?", "In which city
  was that person born?".
* ``world_numeric`` (GSM8K-like, exact match of the number): two or three lookups and a
  subtraction, e.g. "How old was the founder of Vantor Mills when Vantor Mills was
  founded?".
* ``world_compare`` (held out from the students: the cross-family transfer test of the
  paper's Table 3): "Which company is older, Vantor Mills or Tesk Press?". Its
  subquestions reuse the numeric family's lookups in a composition the students never see.

Every question carries its gold subquestions (static: later ones refer back with "that
person" / "that company" / "that city"), gold subanswers and answer. Subanswers are fact
sentences of one shape, "The <relation> of <subject> is <object>.", the same sentences the
teacher's knowledge corpus states, and arithmetic lines "1987 - 1931 = 56.".

Design principles (fixed before any result was seen; the world is never tuned to make the
results agree with the paper):

1. *What the teacher knows: everything.* The teacher's corpus (:func:`teacher_corpus`) holds
   every single-hop fact of the world (as its pretraining would), subtraction drills over
   the world's year range (the arithmetic an LLM teacher brings), and worked examples of the
   ``teacher`` split only: decompositions, solving traces, direct answers and self-ask
   traces, rendered with the pipeline's own prompt builders (zero-shot) so that the teacher
   answers exactly the prompts the pipeline sends. It never sees a ``train`` or ``test``
   question.
2. *What students see: only the teacher's outputs on the* ``train`` *split*, selected as in
   the paper (S_D-T, S_D-R, S_E-T, S_E-A). No facts, no drills.
3. *Why solver students lack knowledge the teacher has.* Students learn only from traces of
   ``train`` questions, and a test question asks for facts those traces do not state: the
   student companies are split in two halves; a company of half 0 has its entity-chain
   questions in ``train`` and its numeric questions in ``test``, half 1 the other way round,
   and the held-out family is test-only. A test question's entities thus occur in training
   questions (as a real test set names things a pretrained student has read about), while
   most of the facts it needs do not (shared ones, e.g. a founder's name, are counted by the
   coverage figure, not forced to 0). The teacher's worked examples use other companies.
4. *Names a tiny model can both memorize and copy.* Every entity has one identifying word
   (a company: "<word> <kind>"; a person: "<first> <last>" with a unique first name and a
   pooled surname), so a fact is keyed by one token (measured: a 2-layer model memorizes
   such facts about 10x faster than facts keyed by a two-word combination of pool words).
   A decomposer copies names from the question, which it can do for every token it met in
   training: principle 3 makes every test entity occur in ``train`` questions.
5. *A vocabulary sized to the world.* Every word of the world is a pool word or a template
   word; numbers are written digit by digit by the tokenizer (see
   :func:`pipeline.tiny_models.build_world_tokenizer`), so arithmetic is over digits.
7. *A teacher that can decompose any question.* A pretrained LLM copies any name it reads into
   a subquestion; a model trained from scratch learns that only from many different names
   (measured: 40 companies' worked examples gave a teacher that memorized facts but copied the
   names of other companies into 4 % of its decompositions). So the teacher's corpus also
   decomposes (and self-asks about) questions over ``name_only_companies`` that it knows
   nothing else about: no facts of theirs are in its corpus, no answer of theirs is a target.
8. *No question in two splits*; test has at least 200 questions per family; the held-out
   family has no ``train`` questions.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Optional

from pydantic import Field

from pipeline.config import Strict
from pipeline.schema import Question, Rejected, make_id

CHAIN, NUMERIC, COMPARE = "world_chain", "world_numeric", "world_compare"
FAMILIES = (CHAIN, NUMERIC, COMPARE)
HELD_OUT_FAMILY = COMPARE
SPLITS = ("teacher", "train", "test")
METRICS = {CHAIN: "accuracy", NUMERIC: "exact_match", COMPARE: "accuracy"}


class WorldConfig(Strict):
    """Size of the generated world. The defaults are the embedded default's world."""

    seed: int = Field(0, description="Everything (names, facts, questions, splits) follows from it.")
    cities: int = Field(24, ge=4, description="Cities (shared by every split), each with a mayor.")
    last_names: int = Field(40, ge=4, description="Pooled surnames (first names are one per person).")
    teacher_companies: int = Field(60, ge=2, description="Companies of the teacher's worked examples only.")
    student_companies: int = Field(140, ge=4, description="Companies of the train and test questions (two halves).")
    questions: dict[str, dict[str, int]] = Field(
        default_factory=lambda: {"teacher": {CHAIN: 180, NUMERIC: 200, COMPARE: 120},
                                 "train": {CHAIN: 210, NUMERIC: 210},
                                 "test": {CHAIN: 210, NUMERIC: 210, COMPARE: 210}},
        description="Questions per split and family (capped by what the split's anchors allow).")
    drills: int = Field(1000, ge=0, description="Subtraction drills in the teacher's corpus.")
    name_only_companies: int = Field(1500, ge=0, description="Companies the teacher meets only by name, in worked "
                                     "decompositions and self-ask steps (no facts): principle 7.")
    name_only_questions: dict[str, int] = Field(default_factory=lambda: {CHAIN: 2000, NUMERIC: 1500, COMPARE: 800},
                                                description="Name-only questions per family (teacher corpus only).")


# ---------------------------------------------------------------- names
_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "st", "tr", "th",
           "sh", "h", "j"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou", "au"]
_CODAS = ["", "", "n", "r", "l", "s", "m", "k", "x", "nd", "rt"]
COMPANY_KINDS = ("Mills", "Labs", "Press", "Motors", "Foods", "Records", "Works", "Textiles", "Bank", "Studios")


def _pseudo_words(rng: random.Random, n: int, taken: set[str]) -> list[str]:
    """``n`` new capitalized two-syllable pseudo-words (never an English template word)."""
    out: list[str] = []
    while len(out) < n:
        w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(2)).capitalize()
        if 4 <= len(w) <= 9 and w not in taken:
            taken.add(w)
            out.append(w)
    return out


# ---------------------------------------------------------------- relations
@dataclass(frozen=True)
class Relation:
    name: str
    subject: str  # "company" | "person" | "city"
    object: str  # "person" | "city" | "year"
    question: str  # "{s}": the subject's name
    noun: str  # "The <noun> of <subject> is <object>."


RELATIONS = {r.name: r for r in [
    Relation("founder", "company", "person", "Who founded {s}?", "founder"),
    Relation("founded", "company", "year", "In which year was {s} founded?", "founding year"),
    Relation("home", "company", "city", "In which city is {s} based?", "home city"),
    Relation("birth_city", "person", "city", "In which city was {s} born?", "birth city"),
    Relation("birth_year", "person", "year", "In which year was {s} born?", "birth year"),
    Relation("mayor", "city", "person", "Who is the mayor of {s}?", "mayor"),
]}
REFERENCE = {"company": "that company", "person": "that person", "city": "that city"}
COMPUTE_QUESTION = "How many years are there between these two years?"


def fact_sentence(relation: str, subject: str, obj: Any) -> str:
    """The one way the world states a fact (knowledge corpus, solver answers, self-ask answers)."""
    return f"The {RELATIONS[relation].noun} of {subject} is {obj}."


def subtraction(a: int, b: int) -> str:
    return f"{a} - {b} = {a - b}."


# ---------------------------------------------------------------- the world
@dataclass
class Company:
    name: str
    founder: str
    founded: int
    home: str
    group: str  # "teacher" | "half0" | "half1" (see principle 3)


@dataclass
class Person:
    name: str
    birth_city: str
    birth_year: int


@dataclass
class World:
    config: WorldConfig
    cities: list[str]
    mayors: dict[str, str]  # city -> person name
    people: dict[str, Person]  # founders (anchors); mayors have no facts of their own
    companies: dict[str, Company]
    questions: dict[str, list[Question]] = field(default_factory=dict)  # split -> questions

    def facts(self) -> list[tuple[str, str, Any]]:
        """Every single-hop fact ``(relation, subject, object)``, in a fixed order."""
        out: list[tuple[str, str, Any]] = [("mayor", c, self.mayors[c]) for c in self.cities]
        for co in self.companies.values():
            if co.group == "names":  # known by name only (principle 7)
                continue
            out += [("founder", co.name, co.founder), ("founded", co.name, co.founded), ("home", co.name, co.home)]
            p = self.people[co.founder]
            out += [("birth_city", p.name, p.birth_city), ("birth_year", p.name, p.birth_year)]
        return out

    def lookup(self, relation: str, subject: str) -> Any:
        if relation == "mayor":
            return self.mayors[subject]
        if relation in ("founder", "founded", "home"):
            return getattr(self.companies[subject], relation)
        return getattr(self.people[subject], relation)

    def all_questions(self) -> list[Question]:
        return [q for s in SPLITS for q in self.questions.get(s, [])]


GROUPS = ("teacher", "half0", "half1", "names")


def _build_entities(cfg: WorldConfig, rng: random.Random) -> World:
    taken: set[str] = set()
    cities = _pseudo_words(rng, cfg.cities, taken)
    half = cfg.student_companies // 2
    sizes = {"teacher": cfg.teacher_companies, "half0": half, "half1": cfg.student_companies - half,
             "names": cfg.name_only_companies}
    n_companies = sum(sizes.values())
    lasts = _pseudo_words(rng, cfg.last_names, taken)
    person_names = [f"{first} {rng.choice(lasts)}" for first in _pseudo_words(rng, n_companies + cfg.cities, taken)]
    company_names = [f"{word} {rng.choice(COMPANY_KINDS)}" for word in _pseudo_words(rng, n_companies, taken)]
    mayors = dict(zip(cities, person_names[: len(cities)]))
    founders = person_names[len(cities):]
    people: dict[str, Person] = {}
    companies: dict[str, Company] = {}
    i = 0
    for group in GROUPS:
        for _ in range(sizes[group]):
            born = rng.randint(1900, 1959)
            name, founder = company_names[i], founders[i]
            people[founder] = Person(founder, rng.choice(cities), born)
            companies[name] = Company(name, founder, rng.randint(born + 20, min(1999, born + 60)), rng.choice(cities), group)
            i += 1
    return World(cfg, cities, mayors, people, companies)


# ---------------------------------------------------------------- questions
@dataclass(frozen=True)
class Template:
    """A question over anchors A (and B): lookups in order, then how the answer follows.

    ``steps``: ``(relation, subject)`` where subject is "A", "B" or "#k" (the answer of step k,
    1-based). ``final``: "last" (the last lookup), "diff" (later year minus earlier, a
    computed last step) or "older" (the anchor with the earlier year).
    """

    family: str
    key: str
    text: str
    anchor: str  # "company" | "person"
    steps: tuple[tuple[str, str], ...]
    final: str
    pair: bool = False


TEMPLATES = [
    Template(CHAIN, "founder_birth_city", "In which city was the founder of {A} born?", "company",
             (("founder", "A"), ("birth_city", "#1")), "last"),
    Template(CHAIN, "home_mayor", "Who is the mayor of the city where {A} is based?", "company",
             (("home", "A"), ("mayor", "#1")), "last"),
    Template(CHAIN, "founder_birth_year", "In which year was the founder of {A} born?", "company",
             (("founder", "A"), ("birth_year", "#1")), "last"),
    Template(NUMERIC, "founder_age", "How old was the founder of {A} when {A} was founded?", "company",
             (("founder", "A"), ("birth_year", "#1"), ("founded", "A")), "diff"),
    Template(NUMERIC, "company_gap", "How many years before {B} was {A} founded?", "company",
             (("founded", "A"), ("founded", "B")), "diff", pair=True),
    Template(COMPARE, "older_company", "Which company is older, {A} or {B}?", "company",
             (("founded", "A"), ("founded", "B")), "older", pair=True),
]


@dataclass
class Worked:
    """A question worked out: static and self-ask subquestions, their answers, the answer."""

    question: str
    subquestions: list[str]  # static: later ones say "that person" for an earlier answer
    followups: list[str]  # self-ask: every entity named
    subanswers: list[str]
    answer: str


def work(world: World, t: Template, a: str, b: Optional[str] = None) -> Optional[Worked]:
    """Work ``t`` out on anchors ``a`` (``b``); None when the question would be ill-posed (equal years)."""
    names = {"A": a, "B": b}
    values: list[Any] = []
    subqs, follow, answers = [], [], []
    for relation, subj in t.steps:
        rel = RELATIONS[relation]
        if subj.startswith("#"):
            s = values[int(subj[1:]) - 1]
            subqs.append(rel.question.format(s=REFERENCE[rel.subject]))
        else:
            s = names[subj]
            subqs.append(rel.question.format(s=s))
        follow.append(rel.question.format(s=s))
        v = world.lookup(relation, s)
        values.append(v)
        answers.append(fact_sentence(relation, s, v))
    if t.final == "last":
        answer = str(values[-1])
    else:
        y1, y2 = values[-2], values[-1]
        if y1 == y2:
            return None
        if t.final == "older":
            answer = a if y1 < y2 else b
        else:
            if y1 > y2 and t.key != "founder_age":
                return None  # "how many years before B was A founded" needs A first
            hi, lo = max(y1, y2), min(y1, y2)
            subqs.append(COMPUTE_QUESTION)
            follow.append(f"What is {hi} - {lo}?")
            answers.append(subtraction(hi, lo))
            answer = str(hi - lo)
    return Worked(t.text.format(A=a, B=b), subqs, follow, answers, answer)


# Which companies' questions of a family go to a split (principle 3).
SPLIT_GROUPS = {"teacher": {CHAIN: ("teacher",), NUMERIC: ("teacher",), COMPARE: ("teacher",)},
                "names": {CHAIN: ("names",), NUMERIC: ("names",), COMPARE: ("names",)},
                "train": {CHAIN: ("half0",), NUMERIC: ("half1",), COMPARE: ()},
                "test": {CHAIN: ("half1",), NUMERIC: ("half0",), COMPARE: ("half0", "half1")}}


def _anchors(world: World, split: str, family: str, kind: str) -> list[str]:
    groups = SPLIT_GROUPS[split][family]
    names = [c.name for c in world.companies.values() if c.group in groups]
    return names if kind == "company" else [world.companies[n].founder for n in names]


def _questions_of(world: World, split: str, family: str, n: int, rng: random.Random) -> list[Worked]:
    """``n`` distinct questions of ``family`` over ``split``'s anchors: every single-anchor question
    first (so every anchor of the split is named in one), then sampled pairs; each group shuffled."""
    templates = [t for t in TEMPLATES if t.family == family]
    singles: list[tuple[Template, str, Optional[str]]] = []
    pairs_: list[tuple[Template, str, Optional[str]]] = []
    for t in templates:
        anchors = _anchors(world, split, family, t.anchor)
        if not t.pair:
            singles += [(t, a, None) for a in anchors]
        else:
            pairs = {(a, b) for a, b in (rng.sample(anchors, 2) for _ in range(3 * n))}
            pairs_ += [(t, a, b) for a, b in sorted(pairs)]
    rng.shuffle(singles)
    rng.shuffle(pairs_)
    cands = singles + pairs_
    out, seen = [], set()
    for t, a, b in cands:
        w = work(world, t, a, b)
        if w is None or w.question in seen:
            continue
        seen.add(w.question)
        out.append(w)
        if len(out) == n:
            break
    return out


@functools.lru_cache(maxsize=4)
def _generate_cached(cfg_json: str) -> World:
    cfg = WorldConfig.model_validate_json(cfg_json)
    rng = random.Random(cfg.seed)
    world = _build_entities(cfg, rng)
    for split in SPLITS:
        qs: list[Question] = []
        for family in FAMILIES:
            n = cfg.questions.get(split, {}).get(family, 0)
            for i, w in enumerate(_questions_of(world, split, family, n, rng) if n else []):
                qs.append(Question(id=make_id(family, split, i), dataset=family, split=split, question=w.question,
                                   answers=[w.answer], gold_subquestions=w.subquestions, gold_subanswers=w.subanswers))
        world.questions[split] = qs
    world.questions["names"] = [
        Question(id=make_id(family, "names", i), dataset=family, split="names", question=w.question, answers=[w.answer],
                 gold_subquestions=w.subquestions, gold_subanswers=w.subanswers)
        for family in FAMILIES for i, w in enumerate(_questions_of(world, "names", family, cfg.name_only_questions.get(family, 0), rng)
                                                      if cfg.name_only_questions.get(family, 0) else [])]
    return world


def generate(cfg: Optional[WorldConfig] = None) -> World:
    """The world of ``cfg`` (default: the embedded default's); same config, same world."""
    return _generate_cached((cfg or WorldConfig()).model_dump_json())


def followups(world: World, q: Question) -> list[str]:
    """Self-ask follow-ups of a world question (every entity named, as a self-ask model asks them)."""
    return _worked(world, q).followups


def _worked(world: World, q: Question) -> Worked:
    """Rebuild the worked form of a question from its text (templates are unambiguous)."""
    import re

    for t in TEMPLATES:
        if t.family != q.dataset:
            continue
        parts = re.split(r"(\{A\}|\{B\})", t.text)
        rx, seen = "", set()
        for p in parts:
            if p in ("{A}", "{B}"):
                rx += f"(?P={p[1]})" if p in seen else f"(?P<{p[1]}>.+?)"
                seen.add(p)
            else:
                rx += re.escape(p)
        m = re.fullmatch(rx, q.question)
        if not m:
            continue
        a, b = m.group("A"), m.groupdict().get("B")
        known = world.companies if t.anchor == "company" else world.people
        if a in known and (b is None or b in known):
            w = work(world, t, a, b)
            if w is not None:
                return w
    raise ValueError(f"not a question of this world: {q.question!r}")


# ---------------------------------------------------------------- dataset adapter
def load(src) -> Iterator[Question | Rejected]:
    """The ``src.dataset`` family's questions of ``src.split`` (``teacher`` | ``train`` | ``test``)
    of the world ``src.world`` (default: the embedded default's)."""
    if src.split not in SPLITS:
        raise ValueError(f"world split must be one of {list(SPLITS)}, not {src.split!r}")
    world = generate(src.world)
    for q in world.questions[src.split]:
        if q.dataset == src.dataset:
            yield Question(**{**q.__dict__, "answers": list(q.answers), "gold_subquestions": list(q.gold_subquestions or []),
                              "gold_subanswers": list(q.gold_subanswers or [])})


def row_parser(src):
    raise ValueError(f"{src.dataset} is generated, not read from rows: use {{dataset: {src.dataset}, split: ...}} without a path")


def describe(world: World) -> dict[str, Any]:
    """Counts for logs and the findings: entities, facts, questions per split and family."""
    per = {s: {f: sum(1 for q in world.questions[s] if q.dataset == f) for f in FAMILIES} for s in SPLITS}
    return {"seed": world.config.seed, "cities": len(world.cities), "people": len(world.people) + len(world.mayors),
            "companies": len(world.companies), "facts": len(world.facts()), "questions": per,
            "name_only_questions": len(world.questions.get("names", []))}


if __name__ == "__main__":  # python -m pipeline.data.world: a look at the default world
    w = generate()
    print(json.dumps(describe(w), indent=1))
    for s in SPLITS:
        for q in w.questions[s][:: max(1, len(w.questions[s]) // 4)]:
            print(s, q.dataset, q.question, q.gold_subquestions, q.gold_subanswers, q.answers)
