"""A flaky OpenAI-compatible teacher for the soak benchmark (benchmarks must not import tests/).

aiohttp on 127.0.0.1 in a background thread. Each request, at the given rates: 429 (with
``Retry-After``), 500, slow (``slow_s`` extra), or garbage (an HTML 200, a 200 with ``choices: []``,
or a 200 whose ``usage`` is ``"n/a"``); otherwise a parseable decomposition. A question whose hash
falls in ``refuse_rate`` is always answered with no subquestions (a deterministic parse error: its
rows are quarantined, on every attempt alike). It counts every answer it gave per (question, seed),
so a benchmark can tell how many requests a kill made it redo.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import random
import threading
from typing import Any, Optional

from aiohttp import web

REPLY = "1. What is the first quantity?\n2. What is the second quantity?\n3. What is the result?"


class FlakyTeacher:
    def __init__(self, *, latency_s: float = 0.01, rate_429: float = 0.05, rate_500: float = 0.05,
                 rate_garbage: float = 0.03, rate_slow: float = 0.02, slow_s: float = 0.5,
                 refuse_rate: float = 0.005, seed: int = 0) -> None:
        self.latency_s, self.slow_s = latency_s, slow_s
        self.rates = (rate_429, rate_500, rate_garbage, rate_slow)
        self.refuse_rate = refuse_rate
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.outcomes: collections.Counter = collections.Counter()
        self.answered: collections.Counter = collections.Counter()  # (question digest, seed) -> good 200s
        self.port: Optional[int] = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="flaky-teacher")
        self._runner: Optional[web.AppRunner] = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "FlakyTeacher":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def close(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def _pick(self) -> str:
        with self._lock:
            u = self._rng.random()
            kind = self._rng.choice(("html", "no_choices", "usage_na"))
        r429, r500, rg, rs = self.rates
        for name, edge in (("429", r429), ("500", r429 + r500), (kind, r429 + r500 + rg), ("slow", r429 + r500 + rg + rs)):
            if u < edge:
                return name
        return "ok"

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        question = str(body["messages"][-1]["content"])
        outcome = self._pick()
        with self._lock:
            self.outcomes[outcome] += 1
        await asyncio.sleep(self.latency_s + (self.slow_s if outcome == "slow" else 0.0))
        if outcome == "429":
            return web.json_response({"error": {"message": "Rate limit reached"}}, status=429, headers={"Retry-After": "0.05"})
        if outcome == "500":
            return web.json_response({"error": {"message": "internal error"}}, status=500)
        if outcome == "html":
            return web.Response(status=200, text="<html>upstream hiccup</html>", content_type="text/html")
        if outcome == "no_choices":
            return web.json_response({"choices": []})
        digest = hashlib.sha256(question.encode()).hexdigest()
        refuse = int(digest[:8], 16) / 0xFFFFFFFF < self.refuse_rate
        text = "I cannot help with that." if refuse else REPLY
        usage: dict[str, Any] = {"prompt_tokens": len(question.split()), "completion_tokens": len(text.split())}
        if outcome == "usage_na":
            usage["prompt_tokens"] = "n/a"
        else:
            with self._lock:
                self.answered[(digest, body.get("seed"))] += 1
        return web.json_response({"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                               "finish_reason": "stop"}], "usage": usage})

    def figures(self) -> dict[str, Any]:
        with self._lock:
            return {"outcomes": dict(self.outcomes), "answered_keys": len(self.answered),
                    "answered_again": sum(v - 1 for v in self.answered.values() if v > 1)}


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
