"""HTTP API of the served application: request/response models, limits, error bodies.

Routes (all JSON; the ingress in :mod:`pipeline.serving.deployments` implements them):

* ``GET  /healthz`` -> ``{"status": "ok"}`` (never needs auth)
* ``GET  /v1/models`` -> OpenAI model list with the decomposer's ``served_name``
* ``POST /v1/chat/completions`` -> OpenAI chat completion from the decomposer model
  (``stream: true`` gives OpenAI-style SSE chunks of the finished text)
* ``POST /v1/solve`` ``{question, context?, dataset?}`` -> :class:`SolveResponse`
* ``GET  /v1/stats`` -> batch-size histograms of the decomposer/solver replicas

Request bodies are parsed here, not by FastAPI, so that every failure gets one error
shape, ``{"error": {"message", "type", "param", "code"}}``: malformed JSON, a missing
field, a wrong type (validation is strict: ``"16"`` is not an integer) or an unknown
``/v1/solve`` field -> 400; a value over a limit in :class:`~pipeline.serving.config.LimitsConfig`
-> 400 naming the field and the limit; a body over ``max_body_bytes`` -> 413; an unknown
model -> 404 naming it. Unknown fields of a chat request are ignored (OpenAI clients send
extras such as ``user``), except ones whose meaning we cannot honour (``n`` > 1,
``logprobs``, ``tools``), which get 400.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.serving.config import LimitsConfig, ServeSamplingConfig

DATASETS = ("gsm8k", "drop", "bamboogle", "generic")
_M = TypeVar("_M", bound=BaseModel)


# ---------------------------------------------------------------- errors
class APIError(Exception):
    """An HTTP error with an OpenAI-style body; raised by validation and the routes."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str, param: Optional[str] = None, code: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _loc(loc: tuple) -> Optional[str]:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or None


def from_validation_error(err: ValidationError) -> APIError:
    """The first problem of a pydantic error as a 400 naming the field."""
    e = err.errors(include_url=False)[0]
    kind, param = e["type"], _loc(tuple(e["loc"]))
    msg = str(e.get("msg", "invalid value"))
    if kind == "json_invalid":
        return APIError(400, f"malformed JSON body: {e.get('ctx', {}).get('error', msg)}", code="invalid_json")
    if kind in ("model_type", "model_attributes_type", "dict_type") and not e["loc"]:
        return APIError(400, "the request body must be a JSON object", code="invalid_json")
    if kind == "missing":
        return APIError(400, f"missing required field '{param}'", param=param, code="missing_field")
    if kind == "extra_forbidden":
        return APIError(400, f"unknown field '{param}'", param=param, code="unknown_field")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return APIError(400, f"invalid value for '{param}': {msg}", param=param, code="invalid_value")


def parse_body(model: type[_M], body: bytes, limits: LimitsConfig) -> _M:
    if len(body) > limits.max_body_bytes:
        raise APIError(413, f"request body is {len(body)} bytes; the limit is {limits.max_body_bytes}",
                       code="body_too_large")
    if not body.strip():
        raise APIError(400, "the request body is empty; expected a JSON object", code="invalid_json")
    try:
        return model.model_validate_json(body, strict=True)
    except ValidationError as e:
        raise from_validation_error(e) from None


def _too_long(param: str, n: int, limit: int, unit: str = "characters") -> APIError:
    return APIError(400, f"'{param}' is {n} {unit}; the limit is {limit}", param=param, code="too_long")


# ---------------------------------------------------------------- /v1/solve
class SolveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str
    context: Optional[str] = None
    dataset: Optional[Literal["gsm8k", "drop", "bamboogle", "generic"]] = None

    def check(self, limits: LimitsConfig) -> None:
        if not self.question.strip():
            raise APIError(400, "'question' is empty", param="question", code="invalid_value")
        if len(self.question) > limits.max_question_chars:
            raise _too_long("question", len(self.question), limits.max_question_chars)
        if self.context is not None and len(self.context) > limits.max_context_chars:
            raise _too_long("context", len(self.context), limits.max_context_chars)

    def row(self) -> dict[str, Any]:
        return {"question": self.question, "context": self.context or "", "dataset": self.dataset or "generic"}


class StageUsage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class SolveUsage(BaseModel):
    decomposer: StageUsage
    solver: StageUsage


class SolveResponse(BaseModel):
    """``decomposition_parsed`` is False when the decomposer's text had no recognisable
    subquestion list: it is then treated as "No decomposition" (``subquestions == []``) and
    the solver answers directly. ``answer`` is None when the solver wrote no final-answer
    marker; the raw texts are always returned."""

    subquestions: list[str]
    subanswers: list[str]
    answer: Optional[str]
    decomposition_parsed: bool
    decomposer_text: str
    solver_text: str
    usage: SolveUsage
    models: dict[str, str]
    latency_s: float


# ---------------------------------------------------------------- /v1/chat/completions
class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: Any = Field(None, validate_default=True)
    name: Optional[str] = None

    @field_validator("content", mode="before")
    @classmethod
    def _text(cls, v: Any) -> str:
        """A string, or OpenAI content parts of type ``text`` (joined)."""
        if isinstance(v, str):
            return v
        if isinstance(v, list):
            texts = []
            for part in v:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ValueError("only text content parts ({\"type\": \"text\", \"text\": ...}) are supported")
                texts.append(part["text"])
            return "\n".join(texts)
        raise ValueError("content must be a string or a list of text parts")

    def to_backend(self) -> dict[str, str]:
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage]
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    seed: Optional[int] = None
    stop: Any = Field(None, validate_default=True)
    n: Optional[int] = Field(None, ge=1)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    logprobs: Optional[bool] = None
    tools: Optional[list[Any]] = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: Any) -> list[str]:
        if v is None:
            return []
        if isinstance(v, str):
            return [v]
        if isinstance(v, list) and all(isinstance(s, str) for s in v):
            return list(v)
        raise ValueError("stop must be a string or a list of strings")

    def check(self, limits: LimitsConfig, served_names: tuple[str, ...]) -> None:
        if self.model not in served_names:
            raise APIError(404, f"The model '{self.model}' does not exist; this server serves: {', '.join(served_names)}",
                           param="model", code="model_not_found")
        if not self.messages:
            raise APIError(400, "'messages' must not be empty", param="messages", code="invalid_value")
        if len(self.messages) > limits.max_messages:
            raise _too_long("messages", len(self.messages), limits.max_messages, "messages")
        chars = sum(len(m.content) for m in self.messages)
        if chars > limits.max_message_chars:
            raise _too_long("messages", chars, limits.max_message_chars, "characters of content")
        for name in ("max_tokens", "max_completion_tokens"):
            v = getattr(self, name)
            if v is not None and v > limits.max_tokens:
                raise APIError(400, f"'{name}' is {v}; the limit is {limits.max_tokens}", param=name, code="too_large")
        if len(self.stop) > limits.max_stop:
            raise _too_long("stop", len(self.stop), limits.max_stop, "sequences")
        if self.n not in (None, 1):
            raise APIError(400, "only n=1 is supported", param="n", code="unsupported")
        if self.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs", code="unsupported")
        if self.tools:
            raise APIError(400, "tools are not supported", param="tools", code="unsupported")

    def sampling(self, defaults: ServeSamplingConfig) -> dict[str, Any]:
        """SamplingParams fields: request values over the served model's defaults."""
        max_tokens = self.max_completion_tokens or self.max_tokens or defaults.max_tokens
        return {
            "temperature": defaults.temperature if self.temperature is None else self.temperature,
            "top_p": defaults.top_p if self.top_p is None else self.top_p,
            "max_tokens": max_tokens,
            "seed": defaults.seed if self.seed is None else self.seed,
            "stop": list(self.stop) if self.stop else list(defaults.stop),
        }


class ChatUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatChoiceMessage
    finish_reason: Optional[str] = "stop"
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: ChatUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "divconq"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
