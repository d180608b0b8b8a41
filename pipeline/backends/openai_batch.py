"""Teacher backend for the OpenAI Batch API (``teacher: {type: openai, mode: batch}``): half price, hours.

One :meth:`generate` call (a whole shard: the job's workers hand batch backends every row of a
shard at once, see :func:`chunk_size`) becomes one request set:

1. each request becomes a JSONL line ``{custom_id, method: POST, url: /v1/chat/completions, body}``;
   the body is exactly the online body (same seed, sampling and ``response_format``);
2. the lines are split to respect the provider's per-batch limits (``batch.max_requests``,
   ``batch.max_file_bytes``), each part uploaded (``POST /v1/files``, purpose ``batch``) and a
   batch created (``POST /v1/batches``);
3. **before polling**, the batch ids are written to ``<job dir>/_batches/<key>.json``, where
   ``<key>`` hashes the request set. A killed driver or a restarted actor redoes the shard, builds
   the same key, finds the file and resumes polling the same batches instead of paying twice. The
   one window left (killed between creating a batch and writing its id) is closed by tagging each
   batch with ``metadata.divconq_key`` and adopting a live batch with that tag before creating one;
4. poll ``GET /v1/batches/{id}`` every ``batch.poll_interval_s`` until completed, expired, failed or
   cancelled; download the output and error files (``GET /v1/files/{id}/content``);
5. per request: a 200 result becomes a :class:`Completion`; a 4xx result an error Completion (the
   row is quarantined by the shard commit, exactly as online); a 429/5xx result, an expired
   request or a request with no result at all is **resubmitted** in a new batch of only the
   missing requests, up to ``batch.max_submissions`` rounds; after that the rows are quarantined
   with the reason. A failed batch (the provider rejected the file) is resubmitted the same way
   and stops the job with the provider's error if it keeps failing.

Completions come back in request order, so the worker lands rows through the same exactly-once,
quarantining shard commit as the online path. The key is read from the environment exactly as
:class:`~pipeline.backends.openai_http.OpenAIBackend` does (whose request bodies this reuses).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from typing import Any, Iterator, Optional, Union

import httpx

from pipeline import storage
from pipeline.backends.base import Backend, BackendUnavailable, Completion, Request, SamplingParams
from pipeline.backends.openai_http import AUTH_STATUS, OpenAIBackend, OpenAIBackendConfig, _server_message

log = logging.getLogger(__name__)

ENDPOINT = "/v1/chat/completions"
TERMINAL = frozenset({"completed", "expired", "failed", "cancelled"})
RESUBMIT_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def chunk_size(backend: Backend, default: int) -> int:
    """Rows per ``generate`` call for a worker: a batch backend takes a whole shard at once."""
    inner = getattr(backend, "inner", backend)  # CachedBackend
    return 10**9 if isinstance(inner, OpenAIBatchBackend) else default


class OpenAIBatchBackend(OpenAIBackend):
    mode = "batch"

    def __init__(self, config: Union[OpenAIBackendConfig, dict], job_dir: Optional[str] = None) -> None:
        super().__init__(config)
        self.job_dir = job_dir
        root = job_dir or os.path.join(tempfile.gettempdir(), "divconq-batches")
        self.state_dir = storage.join(root, "_batches")
        self.batches_created = 0
        self.batches_resumed = 0

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config, "job_dir": self.job_dir}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["config"], state.get("job_dir"))  # type: ignore[misc]

    # ------------------------------------------------------------ HTTP (control plane)
    def _http(self) -> httpx.Client:
        key = self._load_key()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base_url + "/", headers=headers, timeout=httpx.Timeout(self.config.timeout_s))

    def _call(self, client: httpx.Client, method: str, path: str, **kw: Any) -> httpx.Response:
        """One control-plane call, retried on timeouts, connection errors, 429 and 5xx."""
        c = self.config
        last = ""
        for attempt in range(c.max_retries + 1):
            try:
                resp = client.request(method, path, **kw)
            except httpx.TransportError as e:
                last = f"{type(e).__name__}: {self._scrub(str(e)) or 'no detail'}"
            else:
                if resp.status_code < 300:
                    return resp
                msg = self._scrub(_server_message(resp))
                if resp.status_code in AUTH_STATUS:
                    raise BackendUnavailable(f"batch endpoint {self.base_url} refused {method} {path} "
                                             f"(HTTP {resp.status_code}: {msg}); check {c.api_key_env}")
                if resp.status_code not in RESUBMIT_STATUS:
                    raise BackendUnavailable(f"batch endpoint {self.base_url}: {method} {path} -> HTTP {resp.status_code}: {msg}")
                last = f"HTTP {resp.status_code}: {msg}"
            time.sleep(min(c.backoff_max_s, c.backoff_base_s * 2 ** attempt))
        raise BackendUnavailable(f"batch endpoint {self.base_url} unreachable after {c.max_retries} retries: {last}")

    # ------------------------------------------------------------ state
    def _state_path(self, key: str) -> str:
        return storage.join(self.state_dir, f"{key}.json")

    def _load_state(self, key: str, n: int) -> dict[str, Any]:
        path = self._state_path(key)
        if storage.exists(path):
            state = storage.read_json(path)
            if state.get("batches"):
                self.batches_resumed += len([b for b in state["batches"] if b["status"] not in TERMINAL])
                log.info("%s: resuming %d batch(es) of request set %s", self.name, len(state["batches"]), key)
            return state
        return {"key": key, "model": self.name, "requests": n, "batches": []}

    def _save_state(self, state: dict[str, Any]) -> None:
        storage.write_json(self._state_path(state["key"]), state)

    # ------------------------------------------------------------ submit
    def _lines(self, requests: list[Request], params: SamplingParams) -> list[tuple[str, bytes]]:
        out = []
        for i, req in enumerate(requests):
            body = self._body(req, params)
            digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]
            custom_id = f"r{i:06d}-{digest}"
            line = {"custom_id": custom_id, "method": "POST", "url": ENDPOINT, "body": body}
            out.append((custom_id, (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")))
        return out

    def _parts(self, lines: list[tuple[str, bytes]]) -> Iterator[list[tuple[str, bytes]]]:
        """Split lines so each part stays within the provider's request-count and file-size limits."""
        b = self.config.batch
        part: list[tuple[str, bytes]] = []
        size = 0
        for cid, raw in lines:
            if part and (len(part) >= b.max_requests or size + len(raw) > b.max_file_bytes):
                yield part
                part, size = [], 0
            part.append((cid, raw))
            size += len(raw)
        if part:
            yield part

    def _find_live(self, client: httpx.Client, tag: str) -> Optional[dict]:
        """A batch already created with this tag (the crash window between create and save)."""
        after = None
        for _ in range(5):  # the newest few hundred batches; ours were created moments before a crash
            page = self._call(client, "GET", "batches", params={"limit": 100, **({"after": after} if after else {})}).json()
            for b in page.get("data") or []:
                if (b.get("metadata") or {}).get("divconq_key") == tag and b.get("status") not in ("failed", "cancelled"):
                    return b
            if not page.get("has_more"):
                return None
            after = page.get("last_id")
        return None

    def _submit(self, client: httpx.Client, state: dict[str, Any], lines: list[tuple[str, bytes]], round_: int) -> None:
        for j, part in enumerate(self._parts(lines)):
            tag = f"{state['key']}:{round_}:{j}"
            live = self._find_live(client, tag)
            if live is None:
                upload = self._call(client, "POST", "files", data={"purpose": "batch"},
                                    files={"file": (f"{tag.replace(':', '-')}.jsonl", b"".join(r for _, r in part), "application/jsonl")})
                live = self._call(client, "POST", "batches", json={
                    "input_file_id": upload.json()["id"], "endpoint": ENDPOINT,
                    "completion_window": self.config.batch.completion_window,
                    "metadata": {"divconq_key": tag, "divconq_model": self.name}}).json()
                self.batches_created += 1
            state["batches"].append({"id": live["id"], "round": round_, "status": live.get("status", "validating"),
                                     "custom_ids": [cid for cid, _ in part]})
            self._save_state(state)  # before any polling: a restart resumes this batch
            log.info("%s: batch %s with %d requests (round %d)", self.name, live["id"], len(part), round_ + 1)

    # ------------------------------------------------------------ poll + collect
    def _poll(self, client: httpx.Client, state: dict[str, Any]) -> dict[str, dict]:
        """Wait until every batch of the state is terminal; returns the batch objects by id."""
        started = time.monotonic()
        objects: dict[str, dict] = {}
        while True:
            for b in state["batches"]:
                if b["id"] not in objects or objects[b["id"]].get("status") not in TERMINAL:
                    objects[b["id"]] = self._call(client, "GET", f"batches/{b['id']}").json()
            pending = [b for b in state["batches"] if objects[b["id"]].get("status") not in TERMINAL]
            changed = [b for b in state["batches"] if b["status"] != objects[b["id"]].get("status")]
            for b in changed:
                b["status"] = objects[b["id"]].get("status")
            if changed:
                self._save_state(state)
            if not pending:
                return objects
            limit = self.config.batch.max_wait_s
            if limit is not None and time.monotonic() - started > limit:
                raise BackendUnavailable(f"batches {[b['id'] for b in pending]} still {pending[0]['status']} after "
                                         f"{limit:g}s; rerun the job to resume polling them")
            time.sleep(self.config.batch.poll_interval_s)  # polling a remote job: nothing to wait on locally

    def _download(self, client: httpx.Client, file_id: Optional[str]) -> list[dict]:
        if not file_id:
            return []
        text = self._call(client, "GET", f"files/{file_id}/content").text
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def _outcome(self, entry: dict, latency: float) -> Optional[Completion]:
        """A final Completion for one result line, or None when the request should be resubmitted."""
        resp = entry.get("response") or {}
        status = resp.get("status_code")
        body = resp.get("body") if isinstance(resp.get("body"), dict) else {}
        if status == 200:
            try:
                choice = body["choices"][0]
                text = choice["message"]["content"]
                if not isinstance(text, str):
                    raise TypeError("content is not a string")
            except (KeyError, IndexError, TypeError) as e:
                return Completion(error=f"malformed batch result ({type(e).__name__}) for {entry.get('custom_id')}")
            usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
            return Completion(text=text, prompt_tokens=int(usage.get("prompt_tokens") or 0),
                              completion_tokens=int(usage.get("completion_tokens") or 0), latency_s=latency,
                              finish_reason=choice.get("finish_reason"))
        if status is None or status in RESUBMIT_STATUS or status >= 500:
            return None  # expired / throttled / server error inside the batch: try again
        err = body.get("error") if isinstance(body.get("error"), dict) else {}
        return Completion(error=self._scrub(f"HTTP {status}: {err.get('message') or 'no message'}"), latency_s=latency)

    def _collect(self, client: httpx.Client, state: dict[str, Any], objects: dict[str, dict],
                 results: dict[str, Completion], collected: set[str]) -> list[str]:
        """Fold each newly terminal batch's output and error files into ``results``; returns failed batches' errors."""
        failures = []
        for b in state["batches"]:
            obj = objects[b["id"]]
            if b["id"] in collected:
                continue
            collected.add(b["id"])
            if obj.get("status") == "failed":
                errs = (obj.get("errors") or {}).get("data") or []
                failures.append(f"batch {b['id']} failed: " + "; ".join(str(e.get("message")) for e in errs[:3]))
                continue
            latency = float((obj.get("completed_at") or obj.get("expired_at") or obj.get("cancelled_at") or 0)
                            - (obj.get("created_at") or 0))
            for entry in self._download(client, obj.get("output_file_id")) + self._download(client, obj.get("error_file_id")):
                cid = entry.get("custom_id")
                if cid in b["custom_ids"] and cid not in results:
                    done = self._outcome(entry, max(latency, 0.0))
                    if done is not None:
                        results[cid] = done
        return failures

    # ------------------------------------------------------------ Backend API
    def generate(self, requests: list[Request], params: SamplingParams) -> list[Completion]:
        if not requests:
            return []
        lines = self._lines(list(requests), params)
        ids = [cid for cid, _ in lines]
        scope = f"{self.state_dir}|{self.base_url}|{self.name}"  # one job's request set, never another job's
        key = hashlib.sha256(f"{scope}|{'|'.join(ids)}".encode()).hexdigest()[:24]
        state = self._load_state(key, len(ids))
        results: dict[str, Completion] = {}
        collected: set[str] = set()
        failures: list[str] = []
        with self._http() as client:
            while True:
                objects = self._poll(client, state) if state["batches"] else {}
                failures += self._collect(client, state, objects, results, collected) if objects else []
                missing = [(cid, raw) for cid, raw in lines if cid not in results]
                rounds = 1 + max((b["round"] for b in state["batches"]), default=-1)
                if not missing:
                    break
                if rounds >= self.config.batch.max_submissions:
                    if failures and len(missing) == len(lines):
                        raise BackendUnavailable(self._scrub(f"{self.name}: {failures[-1]} (after {rounds} submissions)"))
                    for cid, _ in missing:
                        results[cid] = Completion(error=f"no batch result for request {cid} after {rounds} submissions")
                    break
                if state["batches"]:
                    log.warning("%s: resubmitting %d of %d requests (round %d)", self.name, len(missing), len(lines), rounds + 1)
                self._submit(client, state, missing, rounds)
        self._stats["completions"] += sum(1 for c in results.values() if c.error is None)
        return [results[cid] for cid in ids]
