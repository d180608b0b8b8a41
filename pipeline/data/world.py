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
3. *Every split asks about every company, never the same thing.* A company's three entity-chain
   templates are dealt out one to each split, its single-company numeric question goes to one
   split, and pair questions are distinct pairs. So a test question names entities the
   students met in training questions (as a real test set names things a pretrained student
   has read about), while it asks for facts its training questions mostly did not: the
   solver students lack knowledge the teacher has. Shared facts (a founder's name is the first
   hop of several templates) are counted by the coverage figure, not forced to 0.
4. *Names a tiny model can memorize.* Every entity has one identifying word (a company:
   "<word> <kind>"; a person: "<first> <last>" with a unique first name and a pooled surname),
   so a fact is keyed by one token (measured: a 2-layer model memorizes such facts about 10x
   faster than facts keyed by a two-word combination of pool words).
5. *A vocabulary sized to the world.* Every word of the world is a pool word or a template
   word, and every number is one token (see :func:`pipeline.tiny_models.train_word_tokenizer`):
   the teacher's arithmetic is the subtraction table of the world's years, which its drills
   hold whole, as an LLM knows small differences by heart (measured: with years spelled digit
   by digit, a teacher that recalled every fact got the subtraction line wrong almost always).
6. *Why not disjoint entities per split* (the first design, measured before any student was
   trained): a model trained from scratch copies a name into a subquestion only if it met
   that name in such a position; with the test split's companies unseen in any worked
   example, a teacher that recalled 100 % of their facts copied their names into 4-27 % of
   its decompositions (benchmarks/results/probe_world.md).
7. *No question in two splits*; test has at least 200 questions per family; the held-out
   family (``world_compare``) has no ``train`` questions.
"""

from __future__ import annotations

import functools
import json
import random
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

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
    cities: int = Field(24, ge=4, description="Cities, each with a mayor.")
    last_names: int = Field(40, ge=4, description="Pooled surnames (first names are one per person).")
    companies: int = Field(210, ge=6, description="Companies (each with a founder); every split asks about every one.")
    questions: dict[str, dict[str, int]] = Field(
        default_factory=lambda: {"teacher": {CHAIN: 210, NUMERIC: 800, COMPARE: 500},
                                 "train": {CHAIN: 210, NUMERIC: 210},
                                 "test": {CHAIN: 210, NUMERIC: 210, COMPARE: 210}},
        description="Questions per split and family (entity chains: at most one per company and split).")
    drills: int = Field(4950, ge=0, description="Subtraction drills in the teacher's corpus (4950: every pair of the "
                        "years 1900-1999).")


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

    def names(self) -> list[str]:
        """Every name of the world, in a fixed order: companies, founders, mayors, cities."""
        return sorted(self.companies) + sorted(self.people) + sorted(self.mayors.values()) + list(self.cities)

    def all_questions(self) -> list[Question]:
        return [q for s in SPLITS for q in self.questions.get(s, [])]


def _build_entities(cfg: WorldConfig, rng: random.Random) -> World:
    taken: set[str] = set()
    cities = _pseudo_words(rng, cfg.cities, taken)
    lasts = _pseudo_words(rng, cfg.last_names, taken)
    person_names = [f"{first} {rng.choice(lasts)}" for first in _pseudo_words(rng, cfg.companies + cfg.cities, taken)]
    company_names = [f"{word} {rng.choice(COMPANY_KINDS)}" for word in _pseudo_words(rng, cfg.companies, taken)]
    mayors = dict(zip(cities, person_names[: len(cities)]))
    people: dict[str, Person] = {}
    companies: dict[str, Company] = {}
    for name, founder in zip(company_names, person_names[len(cities):]):
        born = rng.randint(1900, 1959)
        people[founder] = Person(founder, rng.choice(cities), born)
        companies[name] = Company(name, founder, rng.randint(born + 20, min(1999, born + 60)), rng.choice(cities))
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

    family: str
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
    return Worked(t.family, t.text.format(A=a, B=b), subqs, follow, answers, answer)


def _assign(world: World, cfg: WorldConfig, rng: random.Random) -> dict[str, list[Worked]]:
    """Every split's questions (principle 3): each company's entity-chain templates are dealt out one per
    split; its single-company numeric question goes to one split; pair questions are distinct pairs,
    dealt out until each split has its share."""
    out: dict[str, list[Worked]] = {s: [] for s in SPLITS}
    want = {s: dict(cfg.questions.get(s, {})) for s in SPLITS}
    names = list(world.companies)
    chain = [t for t in TEMPLATES if t.family == CHAIN]
    for i, name in enumerate(names):
        order = rng.sample(chain, len(chain))
        for split, t in zip(SPLITS, order):
            _add(out[split], want[split], world, t, name)
        single = next(t for t in TEMPLATES if t.family == NUMERIC and not t.pair)
        _add(out[SPLITS[i % len(SPLITS)]], want[SPLITS[i % len(SPLITS)]], world, single, name)
    for t in [t for t in TEMPLATES if t.pair]:
        splits = [s for s in SPLITS if want[s].get(t.family, 0) > 0]
        tries = 0
        while splits and tries < 50 * len(names) ** 2:
            tries += 1
            a, b = rng.sample(names, 2)
            split = min(splits, key=lambda s: len([w for w in out[s] if w.family == t.family]) / want[s][t.family])
            if _add(out[split], want[split], world, t, a, b, seen={w.question for v in out.values() for w in v}):
                splits = [s for s in splits if want[s].get(t.family, 0) > 0]
    return out


def _add(bucket: list[Worked], want: dict[str, int], world: World, t: Template, a: str, b: Optional[str] = None,
         seen: Optional[set[str]] = None) -> bool:
    """Work ``t`` out on ``a`` (``b``) into ``bucket`` while the split wants more of its family."""
    if want.get(t.family, 0) <= 0:
        return False
    w = work(world, t, a, b)
    if w is None or (seen is not None and w.question in seen):
        return False
    bucket.append(w)
    want[t.family] -= 1
    return True


@functools.lru_cache(maxsize=4)
def _generate_cached(cfg_json: str) -> World:
    cfg = WorldConfig.model_validate_json(cfg_json)
    rng = random.Random(cfg.seed)
    world = _build_entities(cfg, rng)
    for split, worked in _assign(world, cfg, rng).items():
        per_family: dict[str, int] = {}
        qs: list[Question] = []
        for w in sorted(worked, key=lambda w: FAMILIES.index(w.family)):
            i = per_family[w.family] = per_family.get(w.family, -1) + 1
            qs.append(Question(id=make_id(w.family, split, i), dataset=w.family, split=split, question=w.question,
                               answers=[w.answer], gold_subquestions=w.subquestions, gold_subanswers=w.subanswers))
        world.questions[split] = qs
    return world


def generate(cfg: Optional[WorldConfig] = None) -> World:
    """The world of ``cfg`` (default: the embedded default's); same config, same world."""
    return _generate_cached((cfg or WorldConfig()).model_dump_json())


def followups(world: World, q: Question) -> list[str]:
    """Self-ask follow-ups of a world question (every entity named, as a self-ask model asks them)."""
    return _worked(world, q).followups


def _worked(world: World, q: Question) -> Worked:
    """Rebuild the worked form of a question from its text (templates are unambiguous)."""
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
            "companies": len(world.companies), "facts": len(world.facts()), "questions": per}


if __name__ == "__main__":  # python -m pipeline.data.world: a look at the default world
    w = generate()
    print(json.dumps(describe(w), indent=1))
    for s in SPLITS:
        for q in w.questions[s][:: max(1, len(w.questions[s]) // 4)]:
            print(s, q.dataset, q.question, q.gold_subquestions, q.gold_subanswers, q.answers)
