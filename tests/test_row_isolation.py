"""One odd row never stops a job: each bad-input class goes to quarantine with a reason naming the row,
the stage and the cause, every other row is processed, and the job exits 0. Only infrastructure stops a
job, with one line; a bug keeps its traceback. Also: prepare stops on an I/O error mid-stream (bad rows
still quarantined), over-long prompts for a local model are quarantined or counted, never cut silently."""

from __future__ import annotations

import errno
import io
import logging
import os

import pytest
from fsspec.implementations.local import LocalFileSystem

from pipeline import storage, tables
from ray_jobs._shell import run_main
from pipeline.manifest import read_manifest
from ray_jobs import generate, infer, prepare, solve
from tests.conftest import REPO, SAMPLES
from tests.servers.openai_stub import DECOMPOSITION_REPLY, SOLUTION_REPLY, OpenAIStubServer

FAST_RETRIES = "max_retries: 1, backoff_base_s: 0.01, backoff_max_s: 0.02"


def read_out(out: str) -> tuple[list[dict], list[dict]]:
    def rows(sub: str) -> list[dict]:
        path = storage.join(out, sub)
        return tables.read_rows(path) if storage.exists(path) else []

    return rows("data"), rows("quarantine")


def odd_input(prepared: str, tmp_path, n: int = 8) -> tuple[str, list[dict]]:
    """n GSM8K questions; the last has no id (the other rows are untouched)."""
    rows = [r for r in tables.read_rows(prepared) if r["dataset"] == "gsm8k"][:n]
    rows[-1] = {**rows[-1], "id": None}
    path = str(tmp_path / "questions" / "part-0.parquet")
    tables.write_rows(path, rows)
    return path, rows


def test_generate_quarantines_each_odd_answer_and_input_row(ray_session, prepared_samples, tmp_path):
    """usage "n/a", choices [], content null, a lone surrogate (Parquet cannot store it), a row without id."""
    path, rows = odd_input(prepared_samples, tmp_path)
    odd = {rows[0]["question"]: "usage", rows[1]["question"]: "no choices", rows[2]["question"]: "null content",
           rows[3]["question"]: "surrogate"}

    def responder(messages, body):
        kind = next((k for q, k in odd.items() if q in messages[-1]["content"]), None)
        ok = {"choices": [{"index": 0, "message": {"role": "assistant", "content": DECOMPOSITION_REPLY}, "finish_reason": "stop"}]}
        if kind == "usage":
            return {**ok, "usage": {"prompt_tokens": "n/a", "completion_tokens": 3}}
        if kind == "no choices":
            return {"choices": []}
        if kind == "null content":
            return {"choices": [{"index": 0, "message": {"role": "assistant", "content": None}}]}
        if kind == "surrogate":
            return "1. What is \ud800 here?\n2. And then?"
        return DECOMPOSITION_REPLY

    out = str(tmp_path / "gen")
    with OpenAIStubServer(responder=responder) as srv:
        rc = generate.main(["--config", os.path.join(REPO, "configs", "generate.yaml"), f"input.path={path}",
                            f"output.dir={out}", "output.shard_size=8", "sampling.n=1",
                            "teacher={type: openai, model: stub, base_url: '" + srv.base_url + "', api_key_env: null, "
                            + FAST_RETRIES + "}"])
    assert rc == 0
    good, bad = read_out(out)
    assert sorted(r["request_id"] for r in good + bad) == sorted([f"{r['id']}#0" for r in rows[:-1]] + ["input-row-7#0"])
    why = {r["request_id"]: r["error"] for r in bad}
    assert set(why) == {f"{r['id']}#0" for r in rows[:4]} | {"input-row-7#0"}, why
    assert "n/a" in why[f"{rows[0]['id']}#0"] and "IndexError" in why[f"{rows[1]['id']}#0"]
    assert "content is not a string" in why[f"{rows[2]['id']}#0"]
    surrogate = why[f"{rows[3]['id']}#0"]
    assert "stage write" in surrogate and "Parquet" in surrogate and "surrogates not allowed" in surrogate
    assert [r["subquestions"] for r in bad if r["request_id"] == f"{rows[3]['id']}#0"] == [["What is \\ud800 here?", "And then?"]]
    assert "stage input" in why["input-row-7#0"] and "'id'" in why["input-row-7#0"]
    assert all(r["request_id"] in r["error"] for r in bad)  # every reason names its row
    assert [r["subquestions"] for r in good] == [["What is the first step?", "What is the final result?"]] * 3
    assert read_manifest(out)["counts"]["quarantined"] == 5


def test_solve_and_infer_quarantine_odd_rows(ray_session, prepared_samples, tmp_path):
    """infer: an unknown dataset and a row without id; solve: a row without question. Both exit 0."""
    rows = [r for r in tables.read_rows(prepared_samples) if r["dataset"] == "gsm8k"][:6]
    rows[0] = {**rows[0], "dataset": "nope"}
    rows[1] = {**rows[1], "id": None}
    path = str(tmp_path / "q" / "part-0.parquet")
    tables.write_rows(path, rows)
    out = str(tmp_path / "infer")
    assert infer.main(["--config", os.path.join(REPO, "configs", "infer.yaml"), f"input.path={path}", f"output.dir={out}",
                       "output.shard_size=6", "input.datasets=null", "input.splits=null"]) == 0
    good, bad = read_out(out)
    why = {r["request_id"]: r["error"] for r in bad}
    assert len(good) == 4 and set(why) == {rows[0]["id"], "input-row-1"}, why
    assert "stage input" in why[rows[0]["id"]] and "unknown dataset 'nope'" in why[rows[0]["id"]]
    assert "'id'" in why["input-row-1"] and all(r["correct"] is False for r in bad)

    gen = [{**r, "request_id": f"{r['id']}#0", "sample_index": 0, "subquestions": ["a?"]} for r in rows[2:]]
    gen[0] = {**gen[0], "question": None}
    gpath = str(tmp_path / "g" / "part-0.parquet")
    tables.write_rows(gpath, gen)
    out = str(tmp_path / "solve")
    with OpenAIStubServer(responder=lambda m, b: SOLUTION_REPLY) as srv:
        assert solve.main(["--config", os.path.join(REPO, "configs", "solve.yaml"), f"input.path={gpath}",
                           f"output.dir={out}", "solver={type: openai, model: s, base_url: '" + srv.base_url
                           + "', api_key_env: null}"]) == 0
    good, bad = read_out(out)
    assert len(good) == 3 and [r["request_id"] for r in bad] == [gen[0]["request_id"]]
    assert "stage input" in bad[0]["error"] and "'question'" in bad[0]["error"]


def test_a_row_that_raises_unexpectedly_is_isolated(tmp_path, caplog):
    """The base class's net: process() raising for one row of a shard quarantines that row only."""
    import pyarrow as pa

    from pipeline.sharded import Layout, ShardWorker, stage_requests

    class Fragile(ShardWorker):
        schema = pa.schema([("request_id", pa.string()), ("n", pa.int64()), ("error", pa.string())])

        def process(self, rows):
            return [{**r, "n": 100 // r["n"]} for r in rows], [], {"calls": len(rows)}

    layout = Layout(str(tmp_path / "job"))
    stage_requests(layout, [{"request_id": f"r{i}", "n": i} for i in range(4)], 4, {"x": 1})
    with caplog.at_level(logging.ERROR, logger="pipeline.sharded"):
        stats = Fragile(layout.root).run_shard("shard-00000")
    good, bad = read_out(layout.root)
    assert [r["n"] for r in good] == [100, 50, 33] and [r["request_id"] for r in bad] == ["r0"]
    assert "request r0, stage process: ZeroDivisionError" in bad[0]["error"] and "test_row_isolation.py" in bad[0]["error"]
    assert stats["quarantined"] == 1 and stats["rows_out"] == 3
    assert any(r.exc_info for r in caplog.records)  # the cause keeps its traceback in the log


def test_run_main_keeps_a_bugs_traceback_and_reports_usage_errors_in_one_line(caplog):
    from pipeline.config import UsageError

    def bug():
        return int("n/a")

    def usage():
        raise UsageError("input x lacks column 'subquestions'")

    with caplog.at_level(logging.ERROR, logger="divconq"):
        assert run_main(bug) == 1
        assert run_main(usage) == 1
        assert run_main(lambda: (_ for _ in ()).throw(OSError("storage unreachable"))) == 1
    bug_rec, usage_rec, os_rec = [r for r in caplog.records if r.levelno >= logging.ERROR][-3:]
    assert bug_rec.exc_info and bug_rec.exc_info[0] is ValueError and "invalid literal" in caplog.text
    assert usage_rec.exc_info is None and usage_rec.getMessage() == "UsageError: input x lacks column 'subquestions'"
    assert os_rec.exc_info is None and "storage unreachable" in os_rec.getMessage()


# ---------------------------------------------------------------------- prepare: I/O error vs bad rows
class _FailingRaw(io.RawIOBase):
    """A file that returns its first ``ok_bytes`` bytes, then fails like a disk or network read does."""

    def __init__(self, path: str, ok_bytes: int):
        self._f = open(path, "rb")
        self._left = ok_bytes

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self._left <= 0:
            raise OSError(errno.EIO, "Input/output error")
        data = self._f.read(min(len(b), self._left, 512))
        self._left -= len(data)
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._f.close()
        super().close()


class _FailingFS(LocalFileSystem):
    """The local filesystem, except that reads of ``path`` fail after ``ok_bytes`` (a storage wrapper)."""

    def __init__(self, path: str, ok_bytes: int):
        super().__init__()
        self.path, self.ok_bytes = path, ok_bytes

    def open(self, p, mode="rb", **kwargs):
        return io.BufferedReader(_FailingRaw(p, self.ok_bytes))


def test_prepare_stops_on_an_io_error_mid_stream_and_still_quarantines_bad_rows(tmp_path, monkeypatch, caplog):
    lines = open(os.path.join(SAMPLES, "gsm8k", "train_socratic.jsonl")).read().splitlines()[:40]
    lines[2] = lines[2][:30]  # a bad row before the failure: quarantined as usual
    src = tmp_path / "raw.jsonl"
    src.write_text("\n".join(lines) + "\n")
    ok_bytes = sum(len(x) + 1 for x in lines[:10]) + 5  # the read fails inside line 11
    real = storage.filesystem
    monkeypatch.setattr(storage, "filesystem",
                        lambda uri: (_FailingFS(str(src), ok_bytes), str(src)) if str(uri) == str(src) else real(uri))
    out = str(tmp_path / "prepared")
    argv = ["--config", os.path.join(REPO, "configs", "prepare.yaml"),
            f"sources=[{{dataset: gsm8k, path: '{src}', split: train}}]", f"output.dir={out}"]
    with caplog.at_level(logging.ERROR, logger="divconq"):
        assert prepare.main(argv) == 1
    err = [r for r in caplog.records if r.levelno >= logging.ERROR][-1]
    line = err.getMessage()
    assert err.exc_info is None and str(src) in line and "after line 10" in line and "Input/output error" in line
    assert read_manifest(out) is None  # no manifest: the output is not a finished corpus

    monkeypatch.setattr(storage, "filesystem", real)  # the storage is back: the rerun completes
    assert prepare.main(argv) == 0
    good, bad = read_out(out)
    assert len(good) == 39 and [r["location"] for r in bad] == ["line 3"]


def test_prepare_quarantines_a_row_parquet_cannot_store(tmp_path):
    """A JSON escape of a lone surrogate decodes to a string Parquet cannot encode: that row is
    quarantined (escaped), the others are kept, the job exits 0."""
    lines = open(os.path.join(SAMPLES, "gsm8k", "train_socratic.jsonl")).read().splitlines()[:5]
    lines[1] = lines[1].replace('"question": "', '"question": "\\ud800 ', 1)
    assert "\\ud800" in lines[1]
    src = tmp_path / "raw.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "prepared")
    assert prepare.main(["--config", os.path.join(REPO, "configs", "prepare.yaml"),
                         f"sources=[{{dataset: gsm8k, path: '{src}', split: train}}]", f"output.dir={out}"]) == 0
    good, bad = read_out(out)
    assert len(good) == 4 and len(bad) == 1 and bad[0]["location"] == "gsm8k:train:1"
    assert "Parquet" in bad[0]["error"] and "surrogates not allowed" in bad[0]["error"] and "\\ud800" in bad[0]["raw"]
    m = read_manifest(out)["counts"]
    assert (m["rows_out"], m["quarantined"], m["by_dataset"]) == (4, 1, {"gsm8k/train": 4})


def test_a_source_removed_from_s3_mid_stream_stops_with_the_line_reached(s3_bucket):
    """Real S3 (moto): the object goes away while it is read; the stream stops with the file and the
    last line read, never with a quietly shorter corpus."""
    import re

    import boto3

    from pipeline.data import SourceConfig, load_source
    from pipeline.data.sources import SourceReadError

    lines = open(os.path.join(SAMPLES, "gsm8k", "train_socratic.jsonl")).read().splitlines()
    bucket, key = s3_bucket[len("s3://"):], "raw/train.jsonl"
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    s3.put_object(Bucket=bucket, Key=key, Body=("\n".join(lines) + "\n").encode())
    rows = load_source(SourceConfig(dataset="gsm8k", path=f"{s3_bucket}/{key}", split="train"))
    read = [next(rows) for _ in range(10)]
    s3.delete_object(Bucket=bucket, Key=key)
    with pytest.raises(SourceReadError) as e:
        for row in rows:  # rows already buffered still come out, then the next read fails
            read.append(row)
    assert len(read) < len(lines) and f"{s3_bucket}/{key}" in str(e.value)
    assert re.search(r"after line (\d+)", str(e.value)).group(1) == str(len(read))


# ---------------------------------------------------------------------- context length, local HF model
@pytest.mark.slow
def test_overlong_prompts_are_quarantined_or_counted_when_truncation_is_asked(ray_session, prepared_samples,
                                                                               tiny_model_dir, tmp_path):
    common = [f"input.path={prepared_samples}", "input.limit=3", "sampling.n=1", "sampling.max_tokens=4", "few_shot=false"]
    teacher = f"teacher={{type: hf, model: '{tiny_model_dir}', batch_size: 4, max_input_tokens: 24"
    out = str(tmp_path / "quarantine")
    assert generate.main(["--config", os.path.join(REPO, "configs", "generate.yaml"), *common, f"output.dir={out}",
                          teacher + "}"]) == 0
    good, bad = read_out(out)
    assert not good and len(bad) == 3
    assert all("prompt of" in r["error"] and "tokens exceeds the model's 24" in r["error"] for r in bad), bad[0]["error"]
    assert all(r["prompt_tokens"] > 24 and r["completion_tokens"] == 0 for r in bad)

    out = str(tmp_path / "truncated")
    assert generate.main(["--config", os.path.join(REPO, "configs", "generate.yaml"), *common, f"output.dir={out}",
                          teacher + ", truncate_prompts: true}"]) == 0
    good, bad = read_out(out)
    assert len(good) + len(bad) == 3 and not any("exceeds" in r["error"] for r in bad)
    assert all(r["prompt_tokens"] == 24 for r in good + bad)  # cut to what the model takes
    assert read_manifest(out)["counts"]["truncated_prompts"] == 3
