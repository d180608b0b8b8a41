"""Structured output for the decomposer: the numbered subquestion list as JSON, where the teacher supports it.

With ``structured_output: true`` an OpenAI-compatible teacher gets ``response_format`` with a
JSON schema (``{"subquestions": [str, ...]}``, OpenAI's strict ``json_schema`` mode, also served by
vLLM's OpenAI server); a vLLM engine gets the same schema as guided decoding
(:func:`guided_decoding_params`, the ``sampling_params`` field of a ``ray.data.llm`` processor).
:func:`parse_decomposition` reads the JSON and falls back to the free-text parser for teachers
that ignore the schema (or for unstructured configs), so a parse failure becomes rare but is
still possible and still quarantined.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.parsing import ParseError, parse_subquestions

SUBQUESTIONS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"subquestions": {"type": "array", "items": {"type": "string"}}},
    "required": ["subquestions"],
    "additionalProperties": False,
}

RESPONSE_FORMAT: dict[str, Any] = {
    "type": "json_schema",
    "json_schema": {"name": "subquestions", "strict": True, "schema": SUBQUESTIONS_SCHEMA},
}

# Roles whose reply is the numbered subquestion list (the dynamic decomposer replies one step at a time).
STRUCTURED_ROLES = frozenset({"decomposer"})


def structured_request_fields(config: Any, role: str) -> dict[str, Any]:
    """Extra request-body fields for a chat request of ``role`` under ``config``."""
    if getattr(config, "structured_output", False) and role in STRUCTURED_ROLES:
        return {"response_format": RESPONSE_FORMAT}
    return {}


def guided_decoding_params() -> dict[str, Any]:
    """vLLM guided decoding of the subquestion JSON (``sampling_params`` of ``ray.data.llm`` / vLLM)."""
    return {"guided_decoding": {"json": SUBQUESTIONS_SCHEMA}}


def _json_subquestions(text: str) -> list[str] | None:
    stripped = text.strip()
    if stripped.startswith("```"):  # some servers fence JSON even in JSON mode
        stripped = stripped.strip("`").removeprefix("json").strip()
    if not stripped.startswith(("{", "[")):
        return None
    try:
        data = json.loads(stripped)
    except ValueError:
        return None
    items = data.get("subquestions") if isinstance(data, dict) else data
    if not isinstance(items, list) or not all(isinstance(q, str) for q in items):
        return None
    return items


def parse_decomposition(text: str, max_subquestions: int = 10) -> list[str]:
    """Subquestions from a structured (JSON) reply, else from free text (:func:`parse_subquestions`)."""
    items = _json_subquestions(text)
    if items is None:
        return parse_subquestions(text, max_subquestions)
    out: list[str] = []
    for q in (" ".join(q.split()) for q in items):
        if q and q not in out:
            out.append(q)
    if not out and items:
        raise ParseError("structured reply lists only empty subquestions")
    return out[:max_subquestions]
