"""A local Hugging Face ``transformers`` causal LM as a batched backend.

Loads any hub name, local directory or ``s3://`` directory (downloaded once), picks the
device automatically (CUDA, then MPS, then CPU) unless the config says otherwise, and
generates a whole batch at once with left padding and the tokenizer's chat template.
Inside Ray Data it is held by an actor, so the model loads once per actor.

A prompt longer than the model takes (:attr:`HFBackend.prompt_limit`) is never cut silently:
it comes back as an error Completion ("prompt of N tokens exceeds the model's M"), so its row
goes to quarantine, unless ``truncate_prompts`` asks for its oldest tokens to be cut, and
then the Completion says ``prompt_truncated`` (jobs count those in their manifest).
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import time
from typing import Any, Literal, Optional

from pydantic import Field

from pipeline import storage
from pipeline.backends.base import Backend, Completion, Request, SamplingParams
from pipeline.config import Tagged
from pipeline.chat import render_chat

log = logging.getLogger(__name__)


class HFBackendConfig(Tagged):
    """``type: hf``: a local Hugging Face causal LM."""

    type: Literal["hf"] = "hf"
    model: str = Field(..., description="Hub name, local directory or s3:// directory of a causal LM.")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    batch_size: int = Field(8, ge=1)
    trust_remote_code: bool = False
    max_input_tokens: int = Field(2048, ge=16)
    truncate_prompts: bool = Field(False, description="A prompt longer than the model takes (max_input_tokens, "
                                   "the model's context less one): false = quarantine its row; true = cut its "
                                   "oldest tokens and count it in the manifest (counts.truncated_prompts).")
    generation_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra model.generate() kwargs, e.g. {repetition_penalty: 1.2}.")
    wait_for: Optional[str] = Field(None, description="A path (local or s3://) that must exist before the model is "
                                    "loaded: the completion marker of the job that writes it. The backend imports torch "
                                    "and transformers first, so a replica started while its model still trains is up "
                                    "and loads it the moment it is written.")
    wait_timeout_s: float = Field(3600.0, gt=0, description="How long to wait for wait_for before failing.")


WEIGHT_FILES = (".safetensors", ".bin", ".pt")
_EDGE = 1 << 20  # bytes read from each end of a weights file by :func:`weights_digest`


def weights_digest(folder: str) -> str:
    """A short digest of a model folder's weights (local or object storage): each weights file's name, size and first
    and last MiB, so it is cheap for a model of any size, the same for a copy (an ``s3://`` model and its local copy)
    and different for retrained weights. "" when ``folder`` holds no weights (a hub name: its name is its identity)."""
    digest, found = hashlib.sha256(), False
    if storage.is_dir(folder):
        for uri in storage.list_files(folder, recursive=False):
            name = posixpath.basename(uri)
            if not name.endswith(WEIGHT_FILES):
                continue
            found = True
            with storage.open_input(uri) as f:  # two ranged reads: never the whole file from object storage
                size = f.seek(0, os.SEEK_END)
                f.seek(0)
                head = f.read(_EDGE)
                f.seek(max(0, size - _EDGE))
                tail = f.read(_EDGE)
            digest.update(f"{name}:{size}:".encode() + head + tail)
    return digest.hexdigest()[:16] if found else ""


def pick_device(requested: str = "auto") -> str:
    import torch  # lazy: ~3 s to import; only a process that loads a model needs it

    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(requested: str, device: str):
    import torch  # lazy: ~3 s to import; only a process that loads a model needs it

    if requested != "auto":
        return getattr(torch, requested)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class HFBackend(Backend):
    def __init__(self, model: str, device: str = "auto", dtype: str = "auto", batch_size: int = 8,
                 trust_remote_code: bool = False, max_input_tokens: int = 2048, generation_kwargs: dict | None = None,
                 truncate_prompts: bool = False, wait_for: Optional[str] = None, wait_timeout_s: float = 3600.0):
        import torch  # lazy: torch and transformers take ~5 s to import; only a process that loads a model needs them
        from transformers import AutoModelForCausalLM, AutoTokenizer  # lazy: as torch

        if wait_for:
            import transformers.modeling_utils  # lazy: as torch; from_pretrained would import it (2 s): now, while we wait  # noqa: F401
            storage.wait_for(wait_for, wait_timeout_s, f"model {model}: wait_for")
        self.name = model
        path = model if storage.is_local(model) else storage.localize(model)  # a hub name is "local": no scheme
        # the response cache's name for this model: its path *and* weights, so a model retrained into the same folder
        # never reads the replies its predecessor left in a shared cache
        weights = weights_digest(path)
        self.cache_name = f"{model}@{weights}" if weights else model
        self.device = pick_device(device)
        self.batch_size = batch_size
        self.max_input_tokens = max_input_tokens
        self.truncate_prompts = truncate_prompts
        self.generation_kwargs = dict(generation_kwargs or {})
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.tokenizer.padding_side = "left"
        self.tokenizer.truncation_side = "left"  # over-long prompts lose their oldest text, never the generation prompt
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=pick_dtype(dtype, self.device), trust_remote_code=trust_remote_code
        ).to(self.device)
        self.model.eval()
        self._torch = torch
        log.info("loaded %s on %s", model, self.device)

    @property
    def prompt_limit(self) -> int:
        """The most prompt tokens this model takes: ``max_input_tokens``, and one less than its context."""
        cfg = self.model.config
        max_pos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        return min(self.max_input_tokens, int(max_pos) - 1) if max_pos else self.max_input_tokens

    def _generate_chunk(self, requests: list[Request], params: SamplingParams) -> list[Completion]:
        torch = self._torch
        prompts = [render_chat(self.tokenizer, r.messages) for r in requests]
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, truncation=True,
                             max_length=self.prompt_limit, add_special_tokens=False).to(self.device)
        max_pos = getattr(self.model.config, "max_position_embeddings", None) or getattr(self.model.config, "n_positions", None)
        max_new = params.max_tokens
        if max_pos:
            max_new = max(1, min(max_new, max_pos - enc["input_ids"].shape[1]))
        kwargs = dict(max_new_tokens=max_new, pad_token_id=self.tokenizer.pad_token_id, **self.generation_kwargs)
        if params.temperature > 0:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
            torch.manual_seed(params.seed + requests[0].sample_index)
        else:
            kwargs.update(do_sample=False)
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(**enc, **kwargs)
        latency = time.perf_counter() - start
        new_tokens = out[:, enc["input_ids"].shape[1]:]
        completions = []
        for i in range(len(requests)):
            ids = new_tokens[i]
            n_prompt = int(enc["attention_mask"][i].sum())
            eos_hit = (ids == self.tokenizer.eos_token_id).nonzero()
            n_gen = int(eos_hit[0]) + 1 if len(eos_hit) else int((ids != self.tokenizer.pad_token_id).sum())
            text = self.tokenizer.decode(ids[:n_gen], skip_special_tokens=True)
            finish = "stop" if len(eos_hit) else "length"
            for s in params.stop:
                if s and s in text:
                    text, finish = text.split(s, 1)[0], "stop"
            completions.append(Completion(text=text.strip(), prompt_tokens=n_prompt, completion_tokens=n_gen,
                                          latency_s=latency / len(requests), finish_reason=finish))
        return completions

    def generate(self, requests: list[Request], params: SamplingParams) -> list[Completion]:
        limit = self.prompt_limit
        lengths = [len(ids) for ids in self.tokenizer([render_chat(self.tokenizer, r.messages) for r in requests],
                                                       add_special_tokens=False)["input_ids"]]
        out: list[Completion | None] = [None] * len(requests)
        todo = []
        for i, n in enumerate(lengths):
            if n > limit and not self.truncate_prompts:
                out[i] = Completion(error=f"prompt of {n} tokens exceeds the model's {limit}", prompt_tokens=n)
            else:
                todo.append(i)
        for start in range(0, len(todo), self.batch_size):
            idx = todo[start : start + self.batch_size]
            for i, c in zip(idx, self._generate_chunk([requests[i] for i in idx], params)):
                c.prompt_truncated = lengths[i] > limit
                out[i] = c
        return out  # type: ignore[return-value]
