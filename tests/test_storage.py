"""pipeline.storage on fsspec: one interface for every protocol.

- ``memory://`` (one process) for the helpers, pyarrow through :func:`storage.arrow_filesystem`, errors;
- ``ftp://`` (fsspec ships it; a real pyftpdlib server on 127.0.0.1, tests/servers/ftp.py) where several
  processes share the storage: prepare -> generate -> solve -> select on Ray actors, and Ray Train writing
  its checkpoints there and resuming from them;
- ``s3://`` on moto's real S3 server (tests/conftest.py) for listings that must see other writers.
"""

from __future__ import annotations

import ftplib
import io
import json
import os
import pickle
import uuid

import fsspec
import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from pipeline import storage, tables
from pipeline.manifest import read_manifest
from pipeline.selection import VARIANTS
from ray_jobs import generate, prepare, select, solve
from tests.conftest import REPO, SAMPLES
from tests.servers.ftp import FTPServer


@pytest.fixture
def mem():
    """A fresh ``memory://`` folder."""
    root = f"memory://t-{uuid.uuid4().hex[:8]}"
    yield root
    storage.delete(root)


# ---------------------------------------------------------------- URLs
def test_protocols_and_joins():
    assert storage.protocol_of("runs/x") == storage.protocol_of("/abs") == storage.protocol_of("file:///x") == "file"
    assert [storage.protocol_of(u) for u in ("s3://b/k", "gs://b", "az://c/p", "hf://datasets/o/n", "ftp://h:21/d")] == \
        ["s3", "gs", "az", "hf", "ftp"]
    assert storage.is_local("org/model-name") and not storage.is_local("memory://x")  # a hub name has no scheme
    assert storage.is_s3("s3://b") and not storage.is_s3("gs://b")
    assert storage.join("s3://b/", "a", "x.json") == "s3://b/a/x.json"
    assert storage.join("ftp://127.0.0.1:21/d", "_done") == "ftp://127.0.0.1:21/d/_done"
    assert storage.join("runs/x", "data") == os.path.join("runs/x", "data")
    assert storage.filesystem("file:///tmp/x/../y")[1] == "/tmp/y"
    for uri in ("s3://b/k/x.parquet", "memory://a/b/", "file:///tmp/y", "runs/x", "hf://datasets/o/n/f.parquet"):
        assert storage.inner_path(uri) == storage.filesystem(uri)[1]  # the former without building a filesystem


def test_hub_dataset_or_hub_file():
    """``hf://<owner>/<name>`` is a hub dataset (read with ``datasets``); a longer path is a file of a hub
    repository, read through huggingface_hub's fsspec filesystem like any other URL."""
    from pipeline.data import SourceConfig

    assert SourceConfig(dataset="gsm8k", path="hf://openai/gsm8k").is_hub
    assert not SourceConfig(dataset="gsm8k", path="hf://datasets/openai/gsm8k/main/test-00000-of-00001.parquet").is_hub
    fs, path = storage.filesystem("hf://datasets/openai/gsm8k/main/x.parquet")  # built offline: no request yet
    assert type(fs).__name__ == "HfFileSystem" and path == "datasets/openai/gsm8k/main/x.parquet"


# ---------------------------------------------------------------- memory://: the helpers
def test_memory_round_trip(mem, tmp_path):
    storage.write_json(storage.join(mem, "a", "x.json"), {"k": 1})
    storage.write_text(storage.join(mem, "a", "b", "y.txt"), "line 1\nline 2\n")
    storage.write_bytes(storage.join(mem, "_done", "s.json"), b"{}")
    storage.write_bytes(storage.join(mem, "a", ".hidden"), b"")
    assert storage.exists(mem) and storage.is_dir(mem) and not storage.is_dir(storage.join(mem, "a", "x.json"))
    assert not storage.exists(storage.join(mem, "nope"))
    assert storage.read_json(storage.join(mem, "a", "x.json")) == {"k": 1}
    assert list(storage.iter_lines(storage.join(mem, "a", "b", "y.txt"))) == ["line 1", "line 2"]
    # sorted URLs of the same kind; names starting with . or _ left out (their folders are listed)
    assert storage.list_files(mem) == [f"{mem}/_done/s.json", f"{mem}/a/b/y.txt", f"{mem}/a/x.json"]
    assert storage.list_files(storage.join(mem, "a"), ".json", recursive=False) == [f"{mem}/a/x.json"]
    assert storage.list_files(storage.join(mem, "a", "x.json")) == [f"{mem}/a/x.json"]
    assert storage.list_files(storage.join(mem, "missing")) == []

    local = str(tmp_path / "copy")
    storage.copy_dir(mem, local)  # memory -> local -> memory
    assert sorted(os.path.relpath(p, local) for p in storage.list_files(local)) == ["_done/s.json", "a/b/y.txt", "a/x.json"]
    back = storage.join(mem, "back")
    storage.copy_dir(local, back)
    assert storage.read_bytes(storage.join(back, "a", ".hidden")) == b"" and storage.read_text(f"{back}/a/b/y.txt") == "line 1\nline 2\n"
    assert storage.localize(storage.join(mem, "a")) != storage.join(mem, "a")
    assert open(os.path.join(storage.localize(storage.join(mem, "a")), "x.json")).read() == storage.read_text(f"{mem}/a/x.json")

    storage.delete(storage.join(mem, "a"))
    storage.delete(storage.join(mem, "a"))  # deleting what is not there is fine
    assert not storage.exists(storage.join(mem, "a", "x.json"))


def test_tables_through_pyarrow(mem):
    rows = [{"id": f"q{i}", "n": i} for i in range(5)]
    tables.write_rows(storage.join(mem, "data", "part-0.parquet"), rows[:3])
    tables.write_rows(storage.join(mem, "data", "part-1.parquet"), rows[3:])
    assert tables.read_rows(mem) == rows and tables.count_rows(mem) == 5  # a job root resolves to data/
    fs, path = storage.arrow_filesystem(storage.join(mem, "data"))
    assert isinstance(fs, pa.fs.PyFileSystem) and path.endswith("/data")
    assert pads.dataset(path, filesystem=fs, format="parquet").count_rows() == 5
    with fs.open_output_stream(f"{path}/written-by-arrow.bin") as f:
        f.write(b"arrow")
    assert storage.read_bytes(storage.join(mem, "data", "written-by-arrow.bin")) == b"arrow"
    local_fs, local_path = storage.arrow_filesystem("relative/dir")
    assert isinstance(local_fs, pa.fs.LocalFileSystem) and local_path == os.path.abspath("relative/dir")


def test_missing_paths_raise_file_not_found_naming_the_path(mem, tmp_path):
    for base in (mem, str(tmp_path)):
        missing = storage.join(base, "no", "such.json")
        for read in (storage.read_bytes, storage.read_json, storage.open_input, tables.read_rows):
            with pytest.raises(FileNotFoundError, match="no/such.json"):
                read(missing)
        with pytest.raises(FileNotFoundError, match="no/such.json"):
            storage.copy_dir(missing, str(tmp_path / "dst"))


# ---------------------------------------------------------------- errors of a backend
class _BrokenFS(fsspec.AbstractFileSystem):
    """A storage whose transport is gone: every call raises what a backend library raises on its own
    (``ftplib.error_temp``, like botocore's and aiohttp's errors, is not an OSError)."""

    protocol = "brokenfs"

    def _gone(self, *args, **kwargs):
        raise ftplib.error_temp("421 service not available, closing control connection")

    info = ls = cat_file = _open = _gone


def test_backend_errors_are_oserrors_naming_the_path(monkeypatch):
    """Jobs stop with one line on an OSError, and a row-level handler must never take a storage failure
    for a bad row: whatever a backend raises comes out of storage (and of pyarrow over it) as an OSError."""
    fsspec.register_implementation("brokenfs", _BrokenFS, clobber=True)
    uri = "brokenfs://bucket/data/part-0.parquet"
    for call in (storage.exists, storage.is_dir, storage.read_bytes, storage.list_files, storage.delete):
        with pytest.raises(OSError, match="brokenfs://bucket/data/part-0.parquet.*error_temp: 421"):
            call(uri)
    fs, path = storage.arrow_filesystem(uri)
    with pytest.raises(OSError, match="brokenfs://bucket/data/part-0.parquet"):
        fs.get_file_info(path)
    with pytest.raises(OSError, match="brokenfs://bucket/data/part-0.parquet"):
        pads.dataset([path], filesystem=fs, format="parquet")


def test_protocols_whose_package_is_missing_or_unknown_fail_in_one_line():
    for url, package in (("gs://bucket/x", "gcsfs"), ("az://container/x", "adlfs")):
        try:
            __import__(package)
            continue  # installed here: nothing to report
        except ImportError:
            pass
        with pytest.raises(storage.StorageError, match=f"pip install {package}$"):
            storage.exists(url)
    with pytest.raises(storage.StorageError, match="nosuchproto://"):
        storage.read_bytes("nosuchproto://x/y")


# ---------------------------------------------------------------- FTP: credentials, listings, processes
@pytest.fixture(scope="module")
def ftp(tmp_path_factory):
    """An anonymous, writable FTP server on 127.0.0.1 (its own process); yields it (``.url``, ``.root``)."""
    with FTPServer(str(tmp_path_factory.mktemp("ftp-root"))) as server:
        yield server


def test_ftp_credentials_come_from_the_environment_and_are_never_pickled(tmp_path, monkeypatch):
    """fsspec's FSSPEC_<PROTOCOL>_<OPTION> variables configure a protocol in every process that starts with
    them; a filesystem handed to Ray (pickled) carries its URL only and logs in again where it is unpickled."""
    secret = "pw-" + uuid.uuid4().hex
    with FTPServer(str(tmp_path / "root"), user="divconq", password=secret) as server:
        uri = f"{server.url}/private/x.json"
        with pytest.raises(OSError, match=server.url):  # no credentials: the login is refused, naming the URL
            storage.write_json(uri, {"a": 1})
        monkeypatch.setenv("FSSPEC_FTP_USERNAME", "divconq")
        monkeypatch.setenv("FSSPEC_FTP_PASSWORD", secret)
        conf: dict = {}
        fsspec.config.set_conf_env(conf)  # what importing fsspec does in a process started with these variables
        monkeypatch.setitem(fsspec.config.conf, "ftp", conf["ftp"])
        storage.write_json(uri, {"a": 1})
        assert storage.read_json(uri) == {"a": 1}
        fs, path = storage.arrow_filesystem(uri)
        blob = pickle.dumps(fs)
        assert secret.encode() not in blob and server.url.encode() in blob
        with pickle.loads(blob).open_input_stream(path) as f:
            assert json.loads(f.read()) == {"a": 1}


def test_listings_see_files_other_processes_wrote(ftp, s3_bucket):
    """No listing cache: a rerun (or the driver) sees the commit markers actors wrote since its last look."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    bucket = s3_bucket[len("s3://"):]

    def ftp_put(path: str) -> None:  # another client, as another process would be
        with ftplib.FTP() as client:
            client.connect("127.0.0.1", ftp.port)
            client.login()
            client.storbinary(f"STOR {path}", io.BytesIO(b"{}"))

    for done, put in ((f"{s3_bucket}/job/_done", lambda name: s3.put_object(Bucket=bucket, Key=f"job/_done/{name}", Body=b"{}")),
                      (f"{ftp.url}/listing/_done", lambda name: ftp_put(f"/listing/_done/{name}"))):
        storage.write_json(storage.join(done, "shard-00000.json"), {})
        assert storage.list_files(done, ".json") == [storage.join(done, "shard-00000.json")]
        fs, path = storage.arrow_filesystem(done)
        assert len(fs.get_file_info(pa.fs.FileSelector(path))) == 1
        put("shard-00001.json")
        assert storage.list_files(done, ".json") == [storage.join(done, f"shard-0000{i}.json") for i in (0, 1)]
        assert storage.exists(storage.join(done, "shard-00001.json"))
        assert len(fs.get_file_info(pa.fs.FileSelector(path))) == 2


def test_prepare_generate_solve_select_on_ftp(ray_session, ftp, tmp_path):
    """Every input and output of the four jobs on ftp://: the raw corpus, the corpora, the response cache;
    Ray actors read and write it from their own processes. The result equals select run on a local copy."""
    base = f"{ftp.url}/pipeline"
    storage.copy_dir(os.path.join(SAMPLES, "gsm8k"), f"{base}/raw")
    prep, gen, sol, sel = (f"{base}/{name}" for name in ("prepared", "generate", "solve", "select"))
    sources = f"sources=[{{dataset: gsm8k, path: '{base}/raw/train_socratic.jsonl', split: train, limit: 30}}]"
    assert prepare.main(["--config", os.path.join(REPO, "configs", "prepare.yaml"), sources, f"output.dir={prep}"]) == 0
    assert read_manifest(prep)["counts"]["rows_out"] == 30

    gen_args = ["--config", os.path.join(REPO, "configs", "generate.yaml"), f"input.path={prep}", f"output.dir={gen}",
                "input.limit=12", "sampling.n=2", "output.shard_size=8", f"cache_dir={base}/cache"]
    assert generate.main(gen_args) == 0
    rows = tables.read_rows(gen) + (tables.read_rows(f"{gen}/quarantine") if storage.exists(f"{gen}/quarantine") else [])
    ids = [r["request_id"] for r in rows]
    assert len(ids) == len(set(ids)) == 24
    assert read_manifest(gen)["counts"]["shards_committed"] == 3
    assert storage.list_files(f"{base}/cache", ".json")
    before = {f: storage.read_bytes(f) for f in storage.list_files(f"{gen}/data")}
    assert generate.main(gen_args) == 0  # the actors' commit markers are seen: nothing is redone
    assert {f: storage.read_bytes(f) for f in storage.list_files(f"{gen}/data")} == before

    assert solve.main(["--config", os.path.join(REPO, "configs", "solve.yaml"), f"input.path={gen}", f"output.dir={sol}",
                       "output.shard_size=8"]) == 0
    assert read_manifest(sol)["counts"]["rows_in"] == len(tables.read_rows(gen))
    assert select.main(["--config", os.path.join(REPO, "configs", "select.yaml"), f"input.path={sol}", f"output.dir={sel}"]) == 0

    local_sol, local_sel = str(tmp_path / "solve"), str(tmp_path / "select")
    storage.copy_dir(sol, local_sol)
    assert select.main(["--config", os.path.join(REPO, "configs", "select.yaml"), f"input.path={local_sol}",
                        f"output.dir={local_sel}"]) == 0
    for v in VARIANTS:
        for s in ("train", "validation"):
            assert tables.read_rows(f"{sel}/{v}/{s}") == tables.read_rows(os.path.join(local_sel, v, s))
            assert storage.read_text(f"{sel}/{v}/{s}.jsonl") == storage.read_text(os.path.join(local_sel, v, f"{s}.jsonl"))
    assert read_manifest(sel)["counts"] == read_manifest(local_sel)["counts"]
    assert sum(len(tables.read_rows(f"{sel}/decomposer_all/{s}")) for s in ("train", "validation")) > 0


@pytest.mark.slow
def test_train_checkpoints_on_ftp_and_resumes_from_them(ray_session, ftp):
    """Ray Train gets the FTP filesystem (RunConfig storage_filesystem): it writes its checkpoints there, the
    model is exported there, and a rerun with one more epoch resumes from the saved step."""
    from ray_jobs.train import main
    from tests.test_training import make_rows

    base = f"{ftp.url}/train-{uuid.uuid4().hex[:8]}"
    tables.write_rows(f"{base}/sft/train/part-0.parquet", make_rows(16, seed=0))
    tables.write_rows(f"{base}/sft/val/part-0.parquet", make_rows(4, seed=1))
    args = {
        "ray.num_cpus": 2, "data.train_path": f"{base}/sft/train", "data.validation_path": f"{base}/sft/val",
        "data.max_length": 96,
        "model.build_tiny": "true",
        "model.tiny": "{vocab_size: 300, hidden_size: 32, num_layers: 1, num_heads: 2, max_positions: 128}",
        "deepspeed.zero_stage": 1, "deepspeed.micro_batch_size": 4, "deepspeed.precision": "fp32",
        "optim.lr": 3.0e-3, "optim.warmup_steps": 1, "optim.scheduler": "constant",
        "schedule.epochs": 1, "schedule.log_every_steps": 1, "scaling.num_workers": 1,
        "output.dir": f"{base}/model", "output.checkpoint_dir": f"{base}/checkpoints", "output.run_name": "run",
    }
    assert main([f"{k}={v}" for k, v in args.items()]) == 0
    first = storage.read_json(f"{base}/model/manifest.json")
    assert first["counts"]["steps"] == 4
    assert any("checkpoint_00000004" in p for p in storage.list_files(f"{base}/checkpoints/run"))
    assert storage.exists(f"{base}/model/model.safetensors")

    assert main([f"{k}={v}" for k, v in {**args, "schedule.epochs": 2}.items()]) == 0
    second = storage.read_json(f"{base}/model/manifest.json")
    assert second["counts"]["steps"] == 8
    assert second["history"][-1]["start_step"] == 4  # resumed from the checkpoint on FTP, not from step 0


def test_threads_localizing_one_url_at_once_each_get_the_whole_folder(s3_bucket, tmp_path):
    """``localize`` downloads beside the cache folder and renames into place, so threads that localize the same
    URL together (the quickstart's teacher and students' base share a tokenizer) never read a half copy."""
    from concurrent.futures import ThreadPoolExecutor

    src = f"{s3_bucket}/tokenizer"
    files = {f"f{i:02d}.txt": f"{i} " * 2000 for i in range(40)}
    for name, text in files.items():
        storage.write_text(storage.join(src, name), text)
    cache = str(tmp_path / "cache")

    def read_all(_):
        folder = storage.localize(src, cache_root=cache)
        return folder, {name: open(os.path.join(folder, name)).read() for name in files}

    with ThreadPoolExecutor(4) as pool:
        seen = list(pool.map(read_all, range(4)))
    assert len({folder for folder, _ in seen}) == 1 and all(got == files for _, got in seen)
    assert sorted(os.listdir(cache)) == [os.path.basename(seen[0][0])]  # no partial copy left behind
