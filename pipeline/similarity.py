"""Text similarity of decompositions: ROUGE-L (LCS F-measure) on lowercased word tokens."""

from __future__ import annotations

import re

_TOKEN = re.compile(r"[a-z0-9]+")


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def _lcs(a: list[str], b: list[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: str, reference: str) -> dict[str, float]:
    """ROUGE-L precision, recall and F1 between two texts."""
    c, r = tokens(candidate), tokens(reference)
    lcs = _lcs(c, r)
    if lcs == 0:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    p, rec = lcs / len(c), lcs / len(r)
    return {"precision": p, "recall": rec, "f1": 2 * p * rec / (p + rec)}


def decomposition_similarity(predicted: list[str], gold: list[str]) -> dict[str, float]:
    """ROUGE-L of the joined subquestion lists, plus whether the counts match."""
    if not predicted and not gold:
        return {"rouge_l": 1.0, "rouge_l_recall": 1.0, "count_match": 1.0}
    scores = rouge_l(" ".join(predicted), " ".join(gold))
    return {"rouge_l": scores["f1"], "rouge_l_recall": scores["recall"], "count_match": float(len(predicted) == len(gold))}
