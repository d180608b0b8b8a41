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
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int = 0
    stop: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, cfg: Any) -> "SamplingParams":
        return cls(
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_tokens=cfg.max_tokens,
            seed=cfg.seed,
            stop=tuple(cfg.stop),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d


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
