"""Parse model outputs: subquestion lists, solver answers, self-ask steps, GSM8K gold.

Everything here is pure string processing. Malformed output raises :class:`ParseError`
(a ``ValueError``) with a message quoting the start of the text, so callers can
quarantine the row instead of guessing.
"""

from __future__ import annotations

import re

from pipeline import datasets

__all__ = [
    "ParseError",
    "NO_DECOMPOSITION",
    "parse_subquestions",
    "format_subquestions",
    "parse_solver_output",
    "extract_answer",
    "parse_dynamic_step",
    "gsm8k_gold_answer",
    "parse_socratic",
    "find_numbers",
    "last_number",
    "clean_answer",
]

NO_DECOMPOSITION = "No decomposition"


class ParseError(ValueError):
    """Model output (or gold text) does not have the expected shape."""


def _preview(text: str, n: int = 80) -> str:
    return text.strip().replace("\n", " ")[:n]


# ------------------------------------------------------------------ numbers

# A number: optional sign (not when glued to a word, e.g. the "-" in "5-3"), optional "$",
# thousands separators only in groups of 3, decimals, and an optional "/denominator".
_NUMBER_RE = re.compile(
    r"(?<![\w.])(?P<sign>-)?(?:\$\s?)?"
    r"(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?:\s*/\s*(?P<den>\d+(?:\.\d+)?)(?![\d/]))?"
)


def find_numbers(text: str) -> list[str]:
    """All numbers in ``text`` as plain strings: commas/``$`` removed, sign kept, "a/b" kept."""
    out: list[str] = []
    for m in _NUMBER_RE.finditer(text):
        num = m.group("num").replace(",", "")
        if num.startswith("."):
            num = "0" + num
        s = ("-" if m.group("sign") else "") + num
        den = m.group("den")
        if den and m.start() > 0 and text[m.start() - 1] == "/":  # "3/4/2020": not a fraction
            out.extend([s, den])
            continue
        out.append(s + "/" + den if den else s)
    return out


def last_number(text: str) -> str | None:
    """The last number in ``text`` (see :func:`find_numbers`), or None."""
    nums = find_numbers(text)
    return nums[-1] if nums else None


# ------------------------------------------------------------------ subquestions

_MD = r"(?:\*\*|__)"
_ITEM_RE = re.compile(
    r"^(?:[#>]+\s*)?" + _MD + r"?\s*"
    r"(?:"
    r"(?:decomposed\s+)?(?:sub[-\s]?)?(?:question|q|step)\s*#?\s*(?P<n1>\d+)\s*" + _MD + r"?\s*[:.)\-]"
    r"|\((?P<n2>\d+)\)"
    r"|(?P<n3>\d+)\s*[.):](?!\d)"
    r"|(?P<bullet>[-*\u2022+])(?=\s)"
    r")"
    r"(?:\s*" + _MD + r")?\s*(?P<body>.*)$",
    re.IGNORECASE,
)
_NO_DECOMP_RE = re.compile(r"^[\W_]*no\s+decomposition\b", re.IGNORECASE)


def _norm_key(s: str) -> str:
    return " ".join(s.lower().split())


def _clean_body(body: str) -> str:
    body = body.strip()
    body = re.sub(r"^(?:\*\*|__)\s*|\s*(?:\*\*|__)$", "", body)
    return " ".join(body.split())


def _is_no_decomposition(s: str) -> bool:
    return bool(_NO_DECOMP_RE.match(s.strip()))


def parse_subquestions(text: str, max_subquestions: int = 10) -> list[str]:
    """Subquestions from a decomposer output, in order, exact duplicates dropped.

    Numbered items ("1.", "1)", "(1)", "Q1:", "Subquestion 1:", "Decomposed subquestion 1:",
    "Step 1:") win; a restart of the numbering ends the list. Else bullets ("- ", "* ");
    else un-numbered lines ending in "?". "No decomposition" gives ``[]``. Raises
    :class:`ParseError` when nothing is found.
    """
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if lines and _is_no_decomposition(lines[0]):
        return []
    numbered: list[str] = []
    bullets: list[str] = []
    last_n = 0
    for ln in lines:
        m = _ITEM_RE.match(ln)
        if not m:
            continue
        body = _clean_body(m.group("body"))
        if m.group("bullet"):
            if body:
                bullets.append(body)
            continue
        n = int(m.group("n1") or m.group("n2") or m.group("n3"))
        if numbered and n <= last_n:
            break  # numbering restarted: a second list (e.g. answers) follows
        last_n = n
        if body:
            numbered.append(body)
    items = numbered or bullets
    if not items:
        items = [_clean_body(ln) for ln in lines if ln.rstrip("*_ ").endswith("?")]
    out: list[str] = []
    seen: set[str] = set()
    for it in items:
        key = _norm_key(it)
        if not key or key in seen or _is_no_decomposition(it):
            continue
        seen.add(key)
        out.append(it)
    if out:
        return out[:max_subquestions]
    if any(_is_no_decomposition(ln) for ln in lines) or _NO_DECOMP_RE.search(text.replace("\n", " ")):
        return []
    raise ParseError(f"no subquestions found in model output: '{_preview(text)}'")


def format_subquestions(subqs: list[str]) -> str:
    """``"1. q1\\n2. q2"``, or ``"No decomposition"`` for an empty list (inverse of parsing)."""
    if not subqs:
        return NO_DECOMPOSITION
    return "\n".join(f"{i}. {' '.join(q.split())}" for i, q in enumerate(subqs, 1))


# ------------------------------------------------------------------ solver output

_FINAL_RE = re.compile(
    r"\bthe\s+(?:final\s+)?answer\s+is\b\s*[:\uff1a]?"
    r"|\bfinal\s+answer\s*[:\uff1a]"
    r"|####",
    re.IGNORECASE,
)
_SUBANSWER_RE = re.compile(
    r"^\s*" + _MD + r"?\s*(?:A|Answer)\s*(?P<n>\d+)\s*" + _MD + r"?\s*[:.)]\s*" + _MD + r"?\s*(?P<body>.*)$",
    re.IGNORECASE,
)
_NUMBERED_RE = re.compile(r"^\s*(?P<n>\d+)\s*[.)](?!\d)\s*(?P<body>.*)$")
_BOXED_RE = re.compile(r"\\boxed\{([^{}]*)\}")


def clean_answer(ans: str) -> str:
    """Strip markdown bold/code, ``\\boxed{}``, surrounding quotes and a trailing period/comma."""
    s = ans.strip()
    m = _BOXED_RE.search(s)
    if m:
        s = m.group(1)
    prev = None
    while prev != s:
        prev = s
        s = s.strip().strip("*_`").strip()
        if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'":
            s = s[1:-1]
        elif len(s) >= 2 and (s[0], s[-1]) in {("\u201c", "\u201d"), ("\u2018", "\u2019")}:
            s = s[1:-1]
        s = re.sub(r"[.;,]$", "", s)
    return s.strip()


def _final_answer(text: str) -> str | None:
    matches = list(_FINAL_RE.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    rest = text[m.end():]
    lines = rest.split("\n")
    ans = lines[0].strip()
    if not ans:  # marker at end of line: the answer is on the next non-empty line
        ans = next((ln.strip() for ln in lines[1:] if ln.strip()), "")
    ans = clean_answer(ans)
    return ans or None


def parse_solver_output(text: str) -> tuple[list[str], str | None]:
    """``(subanswers, final_answer)`` from a solver output.

    Subanswers come from "A1: ..." / "Answer 1: ..." lines (else "1. ..." lines); the final
    answer follows the last "The answer is:" / "So the final answer is:" / "Final answer:" /
    "####" marker, cleaned by :func:`clean_answer`; None when there is no marker.
    """
    subanswers: list[str] = []
    numbered: list[str] = []
    for ln in text.splitlines():
        if _FINAL_RE.match(ln.strip()):
            continue
        m = _SUBANSWER_RE.match(ln)
        if m:
            subanswers.append(_clean_body(m.group("body")))
            continue
        m = _NUMBERED_RE.match(ln)
        if m:
            numbered.append(_clean_body(m.group("body")))
    return (subanswers or numbered), _final_answer(text)


def format_answer_line(answer: str) -> str:
    """The final-answer line every solver target ends with: ``"The answer is: <answer>"``."""
    return f"The answer is: {' '.join(answer.split())}"


def with_final_answer(text: str, answer: str) -> str:
    """``text`` with its final-answer line replaced by :func:`format_answer_line` of ``answer`` (the paper's S_E-A
    target: the teacher's solving trace with the gold final answer)."""
    kept = [ln for ln in text.splitlines() if not _FINAL_RE.search(ln)]
    return "\n".join(kept + [format_answer_line(answer)])


def extract_answer(text: str, dataset: str) -> str | None:
    """The final answer in a model output: the marker's answer; else, for a dataset whose registry entry
    allows it (numeric answers: GSM8K), the last number."""
    ans = _final_answer(text)
    if ans is None and getattr(datasets.find(dataset), "last_number_fallback", False):
        return last_number(text)
    return ans


# ------------------------------------------------------------------ dynamic (self-ask)

_FOLLOWUP_RE = re.compile(r"follow[\s-]*up(?:\s+question)?\s*[:\uff1a]", re.IGNORECASE)
_DYN_FINAL_RE = re.compile(
    r"(?:so\s+)?the\s+(?:final\s+)?answer\s+is\s*[:\uff1a]?|final\s+answer\s*[:\uff1a]", re.IGNORECASE
)


def parse_dynamic_step(text: str) -> tuple[str, str]:
    """``("followup", question)`` or ``("final", answer)``: the earliest marker in ``text`` wins."""
    cands = []
    for kind, rx in (("followup", _FOLLOWUP_RE), ("final", _DYN_FINAL_RE)):
        for m in rx.finditer(text):
            body = text[m.end():].split("\n")[0].strip()
            if kind == "followup":
                body = _clean_body(body)
            else:
                body = clean_answer(body)
            if body:
                cands.append((m.start(), kind, body))
                break
    if not cands:
        raise ParseError(f"no 'Follow up:' or final answer in model output: '{_preview(text)}'")
    _, kind, body = min(cands)
    return kind, body


# ------------------------------------------------------------------ GSM8K gold

_CALC_RE = re.compile(r"<<[^<>]*>>")


def gsm8k_gold_answer(solution: str) -> str:
    """The number after the last "####" in a GSM8K solution, commas removed."""
    idx = solution.rfind("####")
    if idx < 0:
        raise ParseError(f"no '####' answer in GSM8K solution: '{_preview(solution)}'")
    ans = solution[idx + 4:].strip().split("\n")[0].strip().replace(",", "")
    if not ans:
        raise ParseError(f"empty '####' answer in GSM8K solution: '{_preview(solution)}'")
    return ans


def parse_socratic(solution: str) -> tuple[list[str], list[str]]:
    """``(subquestions, subanswers)`` from a GSM8K socratic solution.

    Each step line is "Subquestion? ** answer text"; calculator annotations "<<48/2=24>>"
    are removed from answers; the final "#### x" line and steps with an empty answer (a
    GSM8K annotation glitch) are skipped.
    """
    subqs: list[str] = []
    subans: list[str] = []
    for ln in solution.splitlines():
        ln = ln.strip()
        if not ln or ln.startswith("####"):
            continue
        if "**" not in ln:
            raise ParseError(f"socratic step has no '**' separator: '{_preview(ln)}'")
        q, a = ln.split("**", 1)
        q, a = q.strip(), " ".join(_CALC_RE.sub("", a).split())
        if not q:
            raise ParseError(f"socratic step has an empty question: '{_preview(ln)}'")
        if not a:  # annotation glitch in 6 GSM8K rows: an empty step, repeated with its answer next
            continue
        subqs.append(q)
        subans.append(a)
    return subqs, subans
