"""A response cache on local disk or S3, keyed by (model, prompt, sampling params, sample index).

The model is the backend's ``cache_name`` where it has one (a local Hugging Face model: its path and a digest
of its weights), else its ``name`` (a served model: the name it is served under).

One small JSON object per key (``<root>/<k[:2]>/<k>.json``), so it is shared by every
actor and node that can reach the same path, and a rerun of a job does not pay twice.
Errors are never cached.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from pipeline import storage
from pipeline.backends.base import Backend, Completion, Request, SamplingParams, cache_key


class CachedBackend(Backend):
    def __init__(self, inner: Backend, root: str):
        self.inner = inner
        self.root = root
        self.name = inner.name
        # a backend may name its model more precisely for the cache than for reports (HFBackend: path and weights)
        self.cache_name = getattr(inner, "cache_name", inner.name)
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> str:
        return storage.join(self.root, key[:2], f"{key}.json")

    def generate(self, requests: list[Request], params: SamplingParams) -> list[Completion]:
        keys = [cache_key(self.cache_name, r.messages, params, r.sample_index) for r in requests]
        results: list[Completion | None] = [None] * len(requests)
        todo = []
        for i, key in enumerate(keys):
            path = self._path(key)
            if storage.exists(path):
                data = json.loads(storage.read_text(path))
                results[i] = Completion(**{**data, "cached": True, "latency_s": 0.0})
                self.hits += 1
            else:
                todo.append(i)
        if todo:
            fresh = self.inner.generate([requests[i] for i in todo], params)
            for i, c in zip(todo, fresh):
                results[i] = c
                self.misses += 1
                if c.error is None:
                    storage.write_text(self._path(keys[i]), json.dumps(asdict(c)))
        return results  # type: ignore[return-value]

    def close(self) -> None:
        self.inner.close()
