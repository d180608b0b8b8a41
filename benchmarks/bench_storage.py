"""The shard commit pattern of ``pipeline/sharded.py`` on ``pipeline.storage`` (fsspec: s3fs, fsspec's local
filesystem) against the ``pyarrow.fs`` implementation it replaced, on local disk and on S3 (moto's real server
on 127.0.0.1, in this process).

    python -m benchmarks.bench_storage [--quick] [--shards 100 --repeats 5]

Per shard, what an actor does in ``ShardWorker.run_shard`` / ``commit``: remove temp files of a killed write (data,
quarantine), read the request shard, write the data shard, delete the (absent) quarantine shard, write the
commit marker ``_done/<shard>.json``. Then what the driver does: list ``_done/`` (``pending_shards``) and read every
marker (``totals``). Both implementations run in the same process, interleaved, ``--repeats`` times each; the
figure is the median time, and the ratio fsspec ÷ pyarrow.fs (above 1: fsspec slower).
"""

from __future__ import annotations

import glob
import io
import json
import os
import statistics
import sys
import time
import uuid

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

NAME = "bench_storage"


class PyarrowStorage:
    """The storage helpers the commit pattern uses, as they were on ``pyarrow.fs`` (pipeline/storage.py before
    fsspec), the baseline."""

    def __init__(self) -> None:
        import pyarrow.fs as pafs

        self.pafs = pafs

    def filesystem(self, uri: str):
        pafs = self.pafs
        if uri.startswith("s3://"):
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            kwargs = {}
            if endpoint:
                scheme, _, rest = endpoint.partition("://")
                kwargs = {"endpoint_override": rest or scheme, "scheme": scheme if rest else "https"}
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            if region:
                kwargs["region"] = region
            kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=10)
            return pafs.S3FileSystem(**kwargs), uri[len("s3://"):].rstrip("/")
        return pafs.LocalFileSystem(), os.path.abspath(uri)

    def join(self, uri: str, *parts: str) -> str:
        return "/".join([uri.rstrip("/"), *parts])

    def exists(self, uri: str) -> bool:
        fs, path = self.filesystem(uri)
        return fs.get_file_info(path).type != self.pafs.FileType.NotFound

    def read_bytes(self, uri: str) -> bytes:
        fs, path = self.filesystem(uri)
        with fs.open_input_stream(path) as f:
            return f.read()

    def read_json(self, uri: str):
        return json.loads(self.read_bytes(uri))

    def write_bytes(self, uri: str, data: bytes) -> None:
        fs, path = self.filesystem(uri)
        fs.create_dir(os.path.dirname(path), recursive=True)
        if uri.startswith("s3://"):
            with fs.open_output_stream(path) as f:
                f.write(data)
            return
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    def write_json(self, uri: str, obj) -> None:
        self.write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def delete(self, uri: str) -> None:
        fs, path = self.filesystem(uri)
        info = fs.get_file_info(path)
        if info.type == self.pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == self.pafs.FileType.File:
            fs.delete_file(path)

    def delete_partial_writes(self, uri: str) -> None:
        if uri.startswith("s3://"):
            return
        for tmp in glob.glob(glob.escape(self.filesystem(uri)[1]) + ".tmp-*"):
            os.remove(tmp)

    def list_files(self, uri: str, suffix: str = "") -> list[str]:
        fs, path = self.filesystem(uri)
        if fs.get_file_info(path).type == self.pafs.FileType.NotFound:
            return []
        infos = fs.get_file_info(self.pafs.FileSelector(path, recursive=True))
        prefix = "s3://" if uri.startswith("s3://") else ""
        return sorted(prefix + i.path for i in infos if i.type == self.pafs.FileType.File and i.path.endswith(suffix))


def shard_bytes(rows: int = 64) -> bytes:
    """A data shard like generate's: ``rows`` rows of question text and subquestions, as Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{"request_id": f"gsm8k:train:{i}#0", "question": "How many apples does Alice have? " * 8,
                                   "subquestions": [f"What is step {k}?" for k in range(4)]} for i in range(rows)])
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def commit_pattern(st, root: str, shards: int, payload: bytes) -> dict[str, float]:
    """Seconds per shard for the actors' part, and for the driver's listing and marker reads."""
    names = [f"shard-{i:05d}" for i in range(shards)]
    for name in names:  # staged request shards (not timed)
        st.write_bytes(st.join(root, "_requests", f"{name}.parquet"), payload)
    t0 = time.perf_counter()
    for name in names:
        for kind in ("data", "quarantine"):
            st.delete_partial_writes(st.join(root, kind, f"{name}.parquet"))
        st.read_bytes(st.join(root, "_requests", f"{name}.parquet"))
        st.write_bytes(st.join(root, "data", f"{name}.parquet"), payload)
        st.delete(st.join(root, "quarantine", f"{name}.parquet"))
        st.write_json(st.join(root, "_done", f"{name}.json"), {"shard": name, "rows_out": 64})
    t1 = time.perf_counter()
    done = st.list_files(st.join(root, "_done"), ".json")
    t2 = time.perf_counter()
    for name in names:  # sharded.totals: read each marker, a missing one is not committed
        try:
            st.read_json(st.join(root, "_done", f"{name}.json"))
        except FileNotFoundError:
            pass
    t3 = time.perf_counter()
    assert len(done) == shards, (len(done), shards)
    return {"commit_ms_per_shard": (t1 - t0) / shards * 1e3, "list_done_ms": (t2 - t1) * 1e3,
            "totals_ms_per_shard": (t3 - t2) / shards * 1e3, "total_s": t3 - t0}


def start_moto() -> tuple[object, str]:
    import boto3
    from moto.server import ThreadedMotoServer

    port = common.free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"})
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket=bucket)
    return server, f"s3://{bucket}"


def main(argv=None) -> int:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=None, help="shards per run (default 100; quick 30)")
    p.add_argument("--repeats", type=int, default=None, help="runs of each implementation (default 5; quick 2)")
    args = p.parse_args(argv)
    report = common.Report(NAME, args, "Storage: shard commit pattern, fsspec vs pyarrow.fs")
    shards = args.shards or (30 if report.quick else 100)
    repeats = args.repeats or (2 if report.quick else 5)

    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from pipeline import storage

    payload = shard_bytes()
    server, bucket = start_moto()
    impls = {"pyarrow.fs": PyarrowStorage(), "fsspec": storage}
    where = {"local": common.scratch(NAME), "s3 (moto)": f"{bucket}/{NAME}"}
    raw: dict[str, dict[str, list[dict[str, float]]]] = {w: {i: [] for i in impls} for w in where}
    try:
        for w, base in where.items():
            for r in range(repeats):
                order = list(impls) if r % 2 == 0 else list(reversed(impls))  # alternate who goes first
                for name in order:
                    root = storage.join(base, f"{name.replace('.', '-')}-{r}")
                    raw[w][name].append(commit_pattern(impls[name], root, shards, payload))
                    storage.delete(root)
    finally:
        server.stop()

    def med(w: str, impl: str, key: str) -> float:
        return statistics.median(run[key] for run in raw[w][impl])

    rows, results = [], {"shards": shards, "repeats": repeats, "payload_bytes": len(payload), "runs": raw, "ratios": {}}
    for w in where:
        for key, label in (("commit_ms_per_shard", "commit, ms/shard"), ("list_done_ms", f"list _done/ ({shards} markers), ms"),
                           ("totals_ms_per_shard", "read markers, ms/shard"), ("total_s", "whole pattern, s")):
            old, new = med(w, "pyarrow.fs", key), med(w, "fsspec", key)
            results["ratios"][f"{w}: {key}"] = new / old
            rows.append([w, label, old, new, new / old])
    table = common.md_table(["storage", "step", "pyarrow.fs", "fsspec", "fsspec ÷ pyarrow.fs"], rows)
    notes = (f"{shards} shards of a {len(payload) // 1024} KiB Parquet file, median of {repeats} interleaved runs per "
             "implementation. *commit* is what an actor does per shard (2 temp-file sweeps, read the request shard, write "
             "the data shard, delete the absent quarantine shard, write the marker); *list _done/* and *read markers* are "
             "the driver's `pending_shards` and `totals`. The S3 server runs in this process (moto), so S3 figures include "
             "its CPU time; both implementations pay it alike. Local fsspec writes keep the temp file + `os.replace`; on "
             "local disk the temp-file sweep lists the data folder (a glob did the same before).")
    report.write(results, table, notes, params={"shards": shards, "repeats": repeats})
    return 0


if __name__ == "__main__":
    sys.exit(main())
