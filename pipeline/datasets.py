"""The dataset registry: one entry per dataset, saying everything the rest of the code asks about it.

A :class:`Dataset` entry gives a dataset's

* ``name`` (the ``dataset`` column of every row, the ``dataset:`` of a source config);
* ``metric``: how a prediction is scored (:mod:`pipeline.metrics`): ``exact_match`` (the last number
  of the prediction equals a gold number, GSM8K), ``f1`` (official DROP F1; correct at
  F1 >= the job's ``drop_f1_threshold``) or ``accuracy`` (a normalized answer match, Bamboogle);
* ``last_number_fallback``: whether a solver reply without "The answer is:" may be read as its last
  number (:func:`pipeline.parsing.extract_answer`; numeric answers only);
* ``answer_style`` and ``demos``: the final answer's form as every prompt asks for it, and two
  worked decompositions for the few-shot decomposer prompt, the first also the solver's and the
  single-stage baselines' demonstration (:mod:`pipeline.prompts`);
* ``loader``: the module under :mod:`pipeline.data` that reads its raw files (``load(src)`` and
  ``row_parser(src)``), named, not imported, so that scoring never pulls in the file readers;
* ``generated``: the loader makes the rows itself (no ``path``; the generated world's families);
* ``compact_prompts``: every system message is a task tag ("Decompose.") instead of instructions,
  for models trained from scratch on the prompts (:func:`pipeline.prompts._system`).

Adding a dataset: write its loader module, then one :func:`register` call below (or in a module
imported at the end of this one). Source configs, ``/v1/solve``, scoring, answer extraction and the
prompts all take it from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

Metric = Literal["exact_match", "f1", "accuracy"]


@dataclass(frozen=True)
class Demo:
    """A worked example for the prompts: its decomposition, the answers in order, the final answer and
    a chain of thought (for the CoT baseline)."""

    question: str
    subquestions: tuple[str, ...]
    subanswers: tuple[str, ...]
    answer: str
    reasoning: str
    context: str = ""


@dataclass(frozen=True)
class Dataset:
    name: str
    metric: Metric
    last_number_fallback: bool
    answer_style: str
    demos: tuple[Demo, Demo]
    loader: str
    generated: bool = False
    compact_prompts: bool = False


REGISTRY: dict[str, Dataset] = {}


def register(dataset: Dataset) -> Dataset:
    if dataset.name in REGISTRY:
        raise ValueError(f"dataset {dataset.name!r} is registered twice")
    REGISTRY[dataset.name] = dataset
    return dataset


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def find(name: Optional[str]) -> Optional[Dataset]:
    return REGISTRY.get(name) if name is not None else None


def get(name: str) -> Dataset:
    """The entry of ``name``; a ValueError naming the known ones otherwise."""
    found = find(name)
    if found is None:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(REGISTRY)}")
    return found


def check_name(name: str) -> str:
    """``name`` when it is registered (a pydantic field validator for config and request fields)."""
    return get(name).name


# ------------------------------------------------------------------ the worked examples
_MUFFINS = Demo(
    question="A baker makes 24 muffins a day and gives away 4. He sells the rest for $3 each. "
    "How much money does he make in a week?",
    subquestions=(
        "How many muffins does he sell each day?",
        "How much money does he make each day?",
        "How much money does he make in a week?",
    ),
    subanswers=("He sells 24 - 4 = 20 muffins.", "He makes 20 * 3 = $60.", "He makes 60 * 7 = $420."),
    answer="420",
    reasoning="He sells 24 - 4 = 20 muffins a day for 20 * 3 = $60. In a week he makes 60 * 7 = $420.",
)
_MARBLES = Demo(
    question="Tom has 15 marbles. He buys 2 bags of 6 marbles and gives 5 marbles to his sister. "
    "How many marbles does he have now?",
    subquestions=("How many marbles are in the 2 bags?", "How many marbles does Tom have now?"),
    subanswers=("2 * 6 = 12 marbles.", "15 + 12 - 5 = 22 marbles."),
    answer="22",
    reasoning="The bags hold 2 * 6 = 12 marbles, so Tom has 15 + 12 - 5 = 22 marbles.",
)
_FIELD_GOALS = Demo(
    context="The Bears opened the scoring with a 12-yard touchdown run by Lee. The Hawks replied "
    "with field goals of 45 and 31 yards. In the third quarter Lee caught a 7-yard touchdown pass, "
    "and the Hawks added a 28-yard field goal.",
    question="How many yards longer was the longest field goal than the shortest?",
    subquestions=(
        "How long was the longest field goal?",
        "How long was the shortest field goal?",
        "What is the difference between the two lengths?",
    ),
    subanswers=("45 yards.", "28 yards.", "45 - 28 = 17."),
    answer="17",
    reasoning="The field goals were 45, 31 and 28 yards. The longest minus the shortest is 45 - 28 = 17.",
)
_HOUSEHOLDS = Demo(
    context="Of all households, 48% were married couples living together and 11% had a female "
    "householder with no husband present.",
    question="What percent of households were married couples?",
    subquestions=(),
    subanswers=(),
    answer="48",
    reasoning="The passage says 48% of households were married couples.",
)
_EIFFEL = Demo(
    question="Who was the US president when the Eiffel Tower was completed?",
    subquestions=("When was the Eiffel Tower completed?", "Who was the US president in that year?"),
    subanswers=("1889.", "Benjamin Harrison."),
    answer="Benjamin Harrison",
    reasoning="The Eiffel Tower was completed in 1889. The US president in 1889 was Benjamin Harrison.",
)
_TELEPHONE = Demo(
    question="In what country was the inventor of the telephone born?",
    subquestions=("Who invented the telephone?", "In what country was he born?"),
    subanswers=("Alexander Graham Bell.", "Scotland."),
    answer="Scotland",
    reasoning="The telephone was invented by Alexander Graham Bell, who was born in Scotland.",
)

NUMBER_ONLY = "The final answer is a number only, without units."
SHORT_ANSWER = "The final answer is short: at most 5 words, numbers as digits."

# ------------------------------------------------------------------ the datasets
GSM8K = register(Dataset("gsm8k", "exact_match", True, NUMBER_ONLY, (_MUFFINS, _MARBLES), "pipeline.data.gsm8k"))
DROP = register(Dataset("drop", "f1", False, "The final answer is short: a number (as digits) or a few words from the "
                        "passage, at most 5 words.", (_FIELD_GOALS, _HOUSEHOLDS), "pipeline.data.drop"))
BAMBOOGLE = register(Dataset("bamboogle", "accuracy", False, SHORT_ANSWER, (_EIFFEL, _TELEPHONE), "pipeline.data.bamboogle"))
# Any question set with gold answers, read through a column mapping (pipeline/data/generic.py).
GENERIC = register(Dataset("generic", "accuracy", False, SHORT_ANSWER, (_EIFFEL, _MUFFINS), "pipeline.data.generic"))

# The generated world of the embedded miniature (pipeline/data/world.py): one entry per question
# family, each a source of its own ({dataset: world_chain, split: test}). Fictional demos: the
# miniature's prompts are zero-shot, these serve a few-shot prompt to a real LLM.
_FOUNDER_CITY = Demo(
    question="In which city was the founder of Acme Mills born?",
    subquestions=("Who founded Acme Mills?", "In which city was that person born?"),
    subanswers=("The founder of Acme Mills is Ada Stone.", "The birth city of Ada Stone is Dover."),
    answer="Dover",
    reasoning="Acme Mills was founded by Ada Stone, who was born in Dover.",
)
_MAYOR = Demo(
    question="Who is the mayor of the city where Bolt Press is based?",
    subquestions=("In which city is Bolt Press based?", "Who is the mayor of that city?"),
    subanswers=("The home city of Bolt Press is Hull.", "The mayor of Hull is Cy Reed."),
    answer="Cy Reed",
    reasoning="Bolt Press is based in Hull, whose mayor is Cy Reed.",
)
_FOUNDER_AGE = Demo(
    question="How old was the founder of Acme Mills when Acme Mills was founded?",
    subquestions=("Who founded Acme Mills?", "In which year was that person born?", "In which year was Acme Mills founded?",
                  "How many years are there between these two years?"),
    subanswers=("The founder of Acme Mills is Ada Stone.", "The birth year of Ada Stone is 1921.",
                "The founding year of Acme Mills is 1958.", "1958 - 1921 = 37."),
    answer="37",
    reasoning="Ada Stone was born in 1921 and founded Acme Mills in 1958: 1958 - 1921 = 37.",
)
_OLDER = Demo(
    question="Which company is older, Acme Mills or Bolt Press?",
    subquestions=("In which year was Acme Mills founded?", "In which year was Bolt Press founded?"),
    subanswers=("The founding year of Acme Mills is 1958.", "The founding year of Bolt Press is 1949."),
    answer="Bolt Press",
    reasoning="Acme Mills was founded in 1958 and Bolt Press in 1949, so Bolt Press is older.",
)
WORLD_CHAIN = register(Dataset("world_chain", "accuracy", False, SHORT_ANSWER, (_FOUNDER_CITY, _MAYOR),
                               "pipeline.data.world", generated=True, compact_prompts=True))
WORLD_NUMERIC = register(Dataset("world_numeric", "exact_match", True, NUMBER_ONLY, (_FOUNDER_AGE, _FOUNDER_AGE),
                                 "pipeline.data.world", generated=True, compact_prompts=True))
WORLD_COMPARE = register(Dataset("world_compare", "accuracy", False, SHORT_ANSWER, (_OLDER, _FOUNDER_CITY),
                                 "pipeline.data.world", generated=True, compact_prompts=True))
