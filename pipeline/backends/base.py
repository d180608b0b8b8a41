"""The one interface every teacher / solver / student backend implements.

A backend takes a batch of :class:`Request` (chat messages + sample index) and
:class:`SamplingParams`, and returns one :class:`Completion` per request, in order,
with token usage and latency. Per-request failures that retrying cannot fix (e.g. the
server rejects the prompt) come back as ``Completion.error`` so the row can be
quarantined; a backend that is unreachable after its retries raises
:class:`BackendUnavailable`, which fails the job (progress already written is kept).
"""

from __future__ import annotations

import abc
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from pydantic import Field

from pipeline.config import Strict

Messages = list[dict[str, str]]


class SamplingParams(Strict, frozen=True):
    """How to sample completions: the one sampling type. A job config's ``sampling`` section, a served
    model's defaults and a chat request's values are all this; every backend's ``generate`` takes it.
    Frozen, so hashable: the serve replicas group a batch's requests by it."""

    n: int = Field(1, ge=1, description="Samples per question: generate asks n decompositions of each; "
                                        "every other job and the serve app take 1.")
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(256, ge=1, le=32768)
    seed: int = Field(0, description="Sample k of a question is drawn with seed + k.")
    stop: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The parameters of one completion (``n`` is a job's business), as the response cache keys them."""
        return {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens,
                "seed": self.seed, "stop": list(self.stop)}


@dataclass
class Request:
    messages: Messages
    sample_index: int = 0
    # Free-form row data a backend may use (the reference teacher replays gold data from it).
    row: dict[str, Any] = field(default_factory=dict)
    role: str = "decomposer"


@dataclass
class Completion:
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    error: Optional[str] = None
    cached: bool = False
    finish_reason: Optional[str] = None
    prompt_truncated: bool = False  # the backend cut the prompt to fit the model (counted in manifests)


class BackendUnavailable(RuntimeError):
    """The backend could not be reached after all retries; the job should stop."""


class Backend(abc.ABC):
    """Batched text generation. Subclasses set ``name`` (the model id used in outputs)."""

    name: str = "backend"

    @abc.abstractmethod
    def generate(self, requests: list[Request], params: SamplingParams) -> list[Completion]:
        ...

    def close(self) -> None:  # pragma: no cover - optional hook
        pass


def cache_key(model: str, messages: Messages, params: SamplingParams, sample_index: int) -> str:
    payload = json.dumps(
        {"model": model, "messages": messages, "params": params.to_dict(), "sample_index": sample_index},
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()
