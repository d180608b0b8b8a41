"""Storage for every input and output path, on fsspec.

A path is a local path, a ``file://`` URL or any fsspec URL: ``s3://`` (s3fs), ``gs://`` (gcsfs),
``az://`` / ``abfs://`` (adlfs), ``hf://`` (huggingface_hub), ``memory://`` (one process only),
``ftp://``, ``sftp://``... Jobs use the helpers here; pyarrow, Ray Data and Ray Train get the same
filesystem as a pyarrow ``FileSystem`` from :func:`arrow_filesystem`.

Settings come from the environment of each process that touches storage (the driver, actors, Ray Train
workers): the S3 endpoint from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (MinIO, moto or any
S3-compatible store), its region from ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, its attempts per request
from ``DIVCONQ_S3_MAX_ATTEMPTS`` (default 10, botocore's standard retry mode); credentials from each
library's usual chain (AWS environment / profile / instance role, ``GOOGLE_APPLICATION_CREDENTIALS``,
``AZURE_STORAGE_*``, ``HF_TOKEN``) or fsspec's ``FSSPEC_<PROTOCOL>_<OPTION>`` variables. divconq never
writes a credential anywhere: a filesystem handed to Ray pickles as its URL and is re-created from the
URL and the environment in the process that unpickles it.

Every failure is an ``OSError`` naming the path (``FileNotFoundError`` for a missing one), so that a job
stops with one line.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath
import shutil
import tempfile
import threading
import time
from typing import Any, Callable, Iterator, Optional

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import s3fs
from fsspec.asyn import AsyncFileSystem
from fsspec.implementations.local import LocalFileSystem

__all__ = [
    "StorageError", "OPTIONAL_PACKAGES", "protocol_of", "is_local", "is_s3", "filesystem", "inner_path", "arrow_filesystem",
    "join", "exists", "is_dir", "makedirs", "open_input", "read_bytes", "read_text", "read_json", "write_bytes",
    "write_text", "write_json", "delete_partial_writes", "list_files", "delete", "copy_dir", "iter_lines",
    "localize",
]

# The pip package behind each optional protocol; fsspec imports it on the first URL that needs it.
OPTIONAL_PACKAGES = {"gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs",
                     "adl": "adlfs", "hf": "huggingface_hub"}

# Stores that put an object whole or not at all and have no real directories: a write is one PUT there;
# elsewhere (local disk, FTP, SFTP...) it goes to a temp file renamed into place, and parents are created.
_OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "hf", "memory"})

# Filesystems that cache directory listings, with the cache turned off: a listing must see what other processes
# (actors, a killed run) wrote since; pyarrow.fs, which this module replaced, never cached. (adlfs breaks without
# its cache, which it reads right after filling it: it is invalidated before each look instead, see _fresh.)
_LISTING_CACHES = frozenset({"s3", "s3a", "gs", "gcs", "hf", "ftp", "http", "https"})

_LOCAL = LocalFileSystem()

# s3fs runs each call (botocore's attempts included) up to this many times; twice covers a response body
# cut mid-read, which botocore does not retry. Its default of 5 would multiply the attempts by 5.
_S3FS_TRIES = 2


class StorageError(OSError):
    """A storage backend failed (after its own retries) or cannot be used; the message names the path."""


# ---------------------------------------------------------------- URLs
def protocol_of(uri: str) -> str:
    """``file`` for a local path or ``file://`` URL, else the URL's scheme (the outer one of a chained URL)."""
    protocol = fsspec.utils.get_protocol(str(uri))
    return "file" if protocol in ("file", "local") else protocol


def is_local(uri: str) -> bool:
    return protocol_of(uri) == "file"


def is_s3(uri: str) -> bool:
    return protocol_of(uri) in ("s3", "s3a")


def _local_path(uri: str) -> str:
    uri = str(uri)
    for prefix in ("file://", "local://"):
        if uri.startswith(prefix):
            uri = uri[len(prefix):]
    return os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    uri = str(uri)
    if "://" not in uri:
        return os.path.join(uri, *parts)
    scheme, _, rest = uri.partition("://")
    return f"{scheme}://" + posixpath.join(rest.rstrip("/"), *parts)


# ---------------------------------------------------------------- filesystems
def _s3_options() -> dict[str, Any]:
    attempts = int(os.environ.get("DIVCONQ_S3_MAX_ATTEMPTS", "10"))
    options: dict[str, Any] = {
        # botocore's standard mode retries each request (connection errors, throttling, 5xx) up to `attempts`
        # times with backoff (see _S3FS_TRIES for s3fs's own loop around it)
        "config_kwargs": {"retries": {"mode": "standard", "max_attempts": attempts}},
        "use_listings_cache": False,
    }
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["endpoint_url"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["client_kwargs"] = {"region_name": region}
    return options


def _options(protocol: str) -> dict[str, Any]:
    """Constructor options of the filesystem for ``protocol`` (read from the environment on every call, so
    the instance fsspec caches changes when the environment does)."""
    if protocol in ("s3", "s3a"):
        return _s3_options()
    if protocol in _LISTING_CACHES:
        return {"use_listings_cache": False}
    return {}


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(fsspec filesystem, path inside it)`` for a local path or any fsspec URL.

    Instances come from fsspec's cache (one per protocol and options, per process; per thread for
    synchronous filesystems), so a call per operation is cheap."""
    uri = str(uri)
    protocol = protocol_of(uri)
    if protocol == "file":
        return _LOCAL, _local_path(uri)
    chain = [p.split("://")[0] for p in uri.split("::")[:-1]] + [protocol_of(uri.split("::")[-1])]
    options = _options(protocol) if len(chain) == 1 else {p: o for p in chain if (o := _options(p))}
    with _errors("connect to", uri):  # creating a filesystem may log in (FTP, SFTP)
        try:
            fs, path = fsspec.core.url_to_fs(uri, **options)
        except ImportError as e:
            missing = next((OPTIONAL_PACKAGES[p] for p in chain if p in OPTIONAL_PACKAGES), None)
            hint = f"pip install {missing}" if missing else str(e)
            raise StorageError(f"{uri}: {protocol}:// needs a package that is not installed: {hint}") from e
        except ValueError as e:  # fsspec: "Protocol not known"
            raise StorageError(f"{uri}: no filesystem for {protocol}:// ({e})") from e
    if isinstance(fs, s3fs.S3FileSystem):
        fs.retries = _S3FS_TRIES  # a class attribute in s3fs, not a constructor option
    return fs, path.rstrip("/") or path


def inner_path(uri: str) -> str:
    """``filesystem(uri)[1]`` without creating the filesystem (which for FTP or SFTP means logging in)."""
    uri = str(uri)
    protocol = protocol_of(uri)
    if protocol == "file":
        return _local_path(uri)
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError):
        cls = None
    if cls is None or "::" in uri:
        return filesystem(uri)[1]  # a chained URL; or the one-line error naming the missing package
    path = cls._strip_protocol(uri)
    return path.rstrip("/") or path


def arrow_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(pyarrow FileSystem, path inside it)`` for pyarrow datasets, Ray Data (``filesystem=``) and Ray
    Train (``RunConfig(storage_filesystem=...)``): pyarrow's own LocalFileSystem for local paths (the same
    disk without a Python call per operation), else the fsspec filesystem of :func:`filesystem` wrapped for
    pyarrow (see :class:`_ArrowHandler`)."""
    uri = str(uri)
    if is_local(uri):
        return pafs.LocalFileSystem(), _local_path(uri)
    _, path = filesystem(uri)  # fails here, in the caller, on a bad URL or a missing package
    return pafs.PyFileSystem(_ArrowHandler(uri)), path


def _url_prefix(uri: str) -> str:
    """What comes before the path inside the filesystem in ``uri``: ``s3://``, ``ftp://host:21/``..."""
    protocol = protocol_of(uri)
    try:
        inner = fsspec.get_filesystem_class(protocol)._strip_protocol(uri).strip("/")
    except (ImportError, ValueError):
        inner = ""
    bare = uri.rstrip("/")
    if inner and bare.endswith(inner):
        return bare[: len(bare) - len(inner)]
    return f"{protocol}://"


def _whole_objects(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return any(p in _OBJECT_STORES for p in protocols)


# ---------------------------------------------------------------- errors
def _with_where(e: OSError, action: str, where: str) -> OSError:
    """``e`` (same type) with ``where`` in its message, unless it names it already."""
    if where in str(e):
        return e
    try:
        if isinstance(e, FileNotFoundError):
            return FileNotFoundError(f"cannot {action} {where}: no such file or directory")
        if e.errno is not None and e.strerror:
            return type(e)(e.errno, e.strerror, where)
        return type(e)(f"cannot {action} {where}: {e}")
    except TypeError:  # an OSError subclass with another constructor
        return StorageError(f"cannot {action} {where}: {type(e).__name__}: {e}")


@contextlib.contextmanager
def _errors(action: str, where: str) -> Iterator[None]:
    """Raise what a backend raises as an OSError naming ``where``. Backends raise their own types too
    (botocore, aiohttp, ftplib...); a job stops with one line on an OSError, and row-level handlers must
    not mistake a storage failure for a bad row."""
    try:
        yield
    except OSError as e:
        new = _with_where(e, action, where)
        if new is e:
            raise
        raise new from e
    except (TypeError, NameError, AssertionError):  # a bug (ours or a library's), not a storage failure
        raise
    except Exception as e:  # only storage calls run in this block: whatever else they raise is a storage failure
        raise StorageError(f"cannot {action} {where}: {type(e).__name__}: {e}") from e


class _File:
    """A file of a filesystem whose errors are OSError naming its path (see :func:`_errors`)."""

    def __init__(self, f: Any, where: str):
        self._f, self._where = f, where

    def __getattr__(self, name: str) -> Any:  # everything that is not I/O: closed, mode, readable()...
        return getattr(self._f, name)

    def _call(self, action: str, fn: Callable[..., Any], *args: Any) -> Any:
        with _errors(action, self._where):
            return fn(*args)

    def read(self, *args: Any) -> bytes:
        return self._call("read", self._f.read, *args)

    def read1(self, *args: Any) -> bytes:
        return self._call("read", getattr(self._f, "read1", self._f.read), *args)

    def readinto(self, b: Any) -> int:
        return self._call("read", self._f.readinto, b)

    def seek(self, *args: Any) -> int:
        return self._call("seek", self._f.seek, *args)

    def write(self, data: Any) -> int:
        return self._call("write", self._f.write, data)

    def flush(self) -> None:
        self._call("write", self._f.flush)

    def close(self) -> None:
        self._call("close", self._f.close)

    def __enter__(self) -> "_File":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")


class _ArrowHandler(pafs.FSSpecHandler):
    """pyarrow's ``FSSpecHandler`` over the fsspec filesystem of ``uri``, which

    - pickles as ``uri`` alone (Ray ships it to actors and Train workers): each process re-creates the
      filesystem from the URL and its own environment, so no credential travels in a task's arguments;
    - gives each thread its own instance, and each opened file its own where a filesystem is one
      connection (FTP, SFTP: not thread-safe, and pyarrow reads from its I/O threads);
    - raises every failure as an OSError naming the path.
    """

    def __init__(self, uri: str):  # FSSpecHandler.__init__ would pin one instance for all threads
        self.uri = uri
        self._local = threading.local()

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_ArrowHandler, (self.uri,))

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        fs = getattr(self._local, "fs", None)
        if fs is None:
            fs = self._local.fs = filesystem(self.uri)[0]
        return fs

    def _where(self, path: str) -> str:
        """``path`` (inside the filesystem) as a URL, for error messages."""
        prefix = getattr(self, "_prefix", None)
        if prefix is None:
            prefix = self._prefix = _url_prefix(self.uri)
        return prefix + str(path).lstrip("/")

    def _file_fs(self) -> fsspec.AbstractFileSystem:
        """The instance to open a file with: a new one (connection) each where instances are not cached."""
        return self.fs if type(self.fs).cachable else filesystem(self.uri)[0]

    def get_file_info(self, paths: list[str]) -> list[Any]:
        with _errors("stat", self._where(", ".join(paths))):
            for path in paths:
                _fresh(self.fs, path)
            return super().get_file_info(paths)

    def get_file_info_selector(self, selector: Any) -> list[Any]:
        with _errors("list", self._where(selector.base_dir)):
            _fresh(self.fs, selector.base_dir)
            return super().get_file_info_selector(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        with _errors("create dir", self._where(path)):
            if not self.fs.isdir(path):  # FTP answers an existing one with a bare error_perm, not FileExistsError
                self.fs.mkdir(path, create_parents=recursive)

    def copy_file(self, src: str, dest: str) -> None:
        with _errors("copy", f"{self._where(src)} -> {self._where(dest)}"):
            _copy_file(self.fs, src, dest, self._file_fs)

    def _open(self, path: str, mode: str) -> Any:
        fs = self._file_fs()
        with _errors("open", self._where(path)):
            if "r" in mode and fs.info(path)["type"] != "file":
                raise FileNotFoundError(f"not a file: {path}")
            f = fs.open(path, mode=mode)
        return pa.PythonFile(_File(f, self._where(path)), mode="r" if "r" in mode else "w")

    def open_input_stream(self, path: str) -> Any:
        return self._open(path, "rb")

    def open_input_file(self, path: str) -> Any:
        return self._open(path, "rb")

    def open_output_stream(self, path: str, metadata: Any) -> Any:
        return self._open(path, "wb")

    def open_append_stream(self, path: str, metadata: Any) -> Any:
        return self._open(path, "ab")


def _translated(name: str) -> Callable[..., Any]:
    method = getattr(pafs.FSSpecHandler, name)

    def call(self: _ArrowHandler, *args: Any) -> Any:
        with _errors(name.replace("_", " "), self._where(args[0] if args else "/")):
            return method(self, *args)

    call.__name__ = name
    return call


for _name in ("delete_dir", "delete_dir_contents", "delete_root_dir_contents", "delete_file", "move"):
    setattr(_ArrowHandler, _name, _translated(_name))


# ---------------------------------------------------------------- operations
def _fresh(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Forget the listings of ``path`` and its parent that a filesystem keeps despite _LISTING_CACHES."""
    if fs is not _LOCAL:
        fs.invalidate_cache(path)
        fs.invalidate_cache(fs._parent(path))


def _info(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> Optional[dict[str, Any]]:
    """``fs.info(path)``, or None when nothing is there. (fsspec's ``exists`` / ``isdir`` answer False on
    *any* error; a storage outage must not look like a missing file.)"""
    _fresh(fs, path)
    with _errors("stat", uri):
        try:
            return fs.info(path)
        except (FileNotFoundError, NotADirectoryError):  # the latter: a file where a parent directory would be
            return None


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return _info(fs, path, uri) is not None


def wait_for(uri: str, timeout_s: float, waiter: str) -> None:
    """Return once ``uri`` exists (an upstream job's completion marker), polling every half second; a
    ``TimeoutError`` naming ``waiter`` and the path after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not exists(uri):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{waiter}: {uri} did not appear within {timeout_s:g} s (the job that writes it did not finish)")
        time.sleep(0.5)  # polling: storage (local or object store) has no change notification we could await


def is_dir(uri: str) -> bool:
    fs, path = filesystem(uri)
    info = _info(fs, path, uri)
    return info is not None and info["type"] == "directory"


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    if not _whole_objects(fs):
        with _errors("create", uri):
            fs.makedirs(path, exist_ok=True)


# Remote files are read in ranges of this size (not s3fs's 50 MiB blocks): a stream of any size takes little
# memory, and a file that goes away mid-read fails at the next range rather than after a big prefetch.
READ_BLOCK = 256 * 1024
COPY_CHUNK = 16 * 2**20


def open_input(uri: str) -> _File:
    """A binary file open for reading (random access); errors are OSError naming ``uri``."""
    fs, path = filesystem(uri)
    with _errors("open", uri):
        return _File(fs.open(path, "rb", block_size=READ_BLOCK), uri)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with _errors("read", uri):
        if fs is _LOCAL:  # a third of cat_file's time: shard commits read many small files
            with open(path, "rb") as f:
                return f.read()
        return fs.cat_file(path)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def read_json(uri: str) -> Any:
    return json.loads(read_text(uri))


def _parent(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return os.path.dirname(path) if fs is _LOCAL else fs._parent(path)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file atomically: one PUT on object stores, else a temp file renamed into place."""
    fs, path = filesystem(uri)
    with _errors("write", uri):
        if _whole_objects(fs):
            fs.pipe_file(path, data)
            return
        tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
        if fs is _LOCAL:  # os.replace: atomic, and replaces an existing file on every OS
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            return
        fs.makedirs(fs._parent(path), exist_ok=True)
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def delete_partial_writes(uri: str) -> None:
    """Remove the temp files that writes of ``uri`` killed before their rename left (none on object
    stores: an object appears whole or not at all)."""
    fs, path = filesystem(uri)
    if _whole_objects(fs):
        return
    prefix = posixpath.basename(path) + ".tmp-"
    with _errors("list", uri):
        try:
            siblings = fs.ls(_parent(fs, path), detail=False)
        except FileNotFoundError:
            return
        for tmp in siblings:
            if posixpath.basename(tmp).startswith(prefix):
                try:
                    fs.rm_file(tmp)
                except FileNotFoundError:
                    pass


def _find(fs: fsspec.AbstractFileSystem, path: str, uri: str, recursive: bool = True) -> list[str]:
    """Paths of the files under directory ``path``; a listing that fails raises."""
    _fresh(fs, path)
    with _errors("list", uri):
        if fs is _LOCAL:  # os.scandir/os.walk: ~10x faster than fsspec's walk, which stats every entry in Python
            if not recursive:
                return [e.path for e in os.scandir(path) if e.is_file()]
            return [os.path.join(d, n) for d, _, names in os.walk(path, onerror=_raise) for n in names
                    if os.path.isfile(os.path.join(d, n))]
        if not recursive:
            return [e["name"] for e in fs.ls(path, detail=True) if e["type"] == "file"]
        if _walks(fs):  # fsspec's own find skips a directory it cannot list, unless told otherwise
            return fs.find(path, withdirs=False, on_error="raise")
        return fs.find(path, withdirs=False)  # s3fs, gcsfs, adlfs: one flat listing, which raises


def _raise(e: OSError) -> None:
    raise e


def _walks(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs.find`` is fsspec's generic walk (it is not where a store lists a prefix flat)."""
    if isinstance(fs, AsyncFileSystem):
        return type(fs)._find is AsyncFileSystem._find
    return type(fs).find is fsspec.AbstractFileSystem.find


def _relative(found: str, base: str) -> str:
    return found.strip("/")[len(base.strip("/")):].lstrip("/")


def list_files(uri: str, suffix: str = "", recursive: bool = True) -> list[str]:
    """Files under a directory URI (sorted, returned as URIs of the same kind; names starting with ``.`` or
    ``_`` are left out)."""
    uri = str(uri)
    fs, path = filesystem(uri)
    info = _info(fs, path, uri)
    if info is None:
        return []
    if info["type"] != "directory":
        return [uri]
    out = []
    for found in _find(fs, path, uri, recursive):
        base = posixpath.basename(found)
        if not found.endswith(suffix) or base.startswith((".", "_")):
            continue
        rel = _relative(found, path)
        out.append(os.path.join(path, rel) if fs is _LOCAL and "://" not in uri else join(uri, rel))
    return sorted(out)


def delete(uri: str) -> None:
    fs, path = filesystem(uri)
    info = _info(fs, path, uri)
    if info is None:
        return
    with _errors("delete", uri):
        if info["type"] == "directory":
            fs.rm(path, recursive=True)
        else:
            fs.rm_file(path)


def copy_dir(src: str, dst: str) -> None:
    """Recursively copy a directory between any two filesystems (server-side within one)."""
    src_fs, src_path = filesystem(src)
    dst_fs, dst_path = filesystem(dst)
    if not is_dir(src):
        raise FileNotFoundError(f"cannot copy {src}: no such directory")
    dst_join = os.path.join if dst_fs is _LOCAL else posixpath.join
    for found in _find(src_fs, src_path, src):
        rel = _relative(found, src_path)
        target = dst_join(dst_path, rel)
        with _errors("copy", f"{join(src, rel)} -> {join(dst, rel)}"):
            if not _whole_objects(dst_fs):
                dst_fs.makedirs(_parent(dst_fs, target), exist_ok=True)
            if src_fs is dst_fs:
                _copy_file(src_fs, found, target, lambda: filesystem(dst)[0])
                continue
            with src_fs.open(found, "rb") as r, dst_fs.open(target, "wb") as w:
                shutil.copyfileobj(r, w, COPY_CHUNK)


def _copy_file(fs: fsspec.AbstractFileSystem, src: str, dest: str, file_fs: Callable[[], fsspec.AbstractFileSystem]) -> None:
    """Copy within one filesystem: server-side where it can, else streamed through this process (FTP has no
    copy; ``file_fs`` gives the instances to open both files with, two connections where that matters)."""
    try:
        fs.copy(src, dest)
    except NotImplementedError:
        with file_fs().open(src, "rb") as r, file_fs().open(dest, "wb") as w:
            shutil.copyfileobj(r, w, COPY_CHUNK)


def iter_lines(uri: str) -> Iterator[str]:
    """Stream text lines of a (possibly gzipped) file."""
    fs, path = filesystem(uri)
    with _errors("open", uri):
        raw = fs.open(path, "rb", compression="gzip" if path.endswith(".gz") else None)
    with _File(raw, uri) as f:
        for line in io.TextIOWrapper(f, encoding="utf-8"):  # type: ignore[arg-type]
            yield line.rstrip("\n")


def localize(uri: str, cache_root: Optional[str] = None) -> str:
    """A local directory holding ``uri``: the path itself when local, else a copy downloaded once."""
    if is_local(uri):
        return _local_path(uri)
    root = cache_root or os.path.join(tempfile.gettempdir(), "divconq-cache")
    local = os.path.join(root, hashlib.sha256(str(uri).encode()).hexdigest()[:16])
    marker = os.path.join(local, ".complete")
    if not os.path.exists(marker):
        # downloaded beside it and renamed into place: two threads or processes localizing the same uri at once
        # (the quickstart's teacher and students' base share a tokenizer) never read a half-copied folder
        os.makedirs(root, exist_ok=True)
        partial = tempfile.mkdtemp(prefix=".partial-", dir=root)
        try:
            copy_dir(uri, partial)
            open(os.path.join(partial, ".complete"), "w").close()
            if os.path.isdir(local) and not os.path.exists(marker):
                shutil.rmtree(local, ignore_errors=True)  # an interrupted copy left by an earlier version
            try:
                os.rename(partial, local)
            except OSError:
                pass  # another thread or process renamed its whole copy into place first
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return local
