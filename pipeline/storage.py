"""Local-or-S3 storage helpers built on ``pyarrow.fs``.

Every path a job reads or writes may be a local path or an ``s3://`` URI. The S3
endpoint comes from the standard ``AWS_ENDPOINT_URL`` environment variable (set it to
use MinIO, moto or any S3-compatible store); credentials come from the usual AWS
environment / instance profile chain and are never written anywhere by divconq.
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import Any, Iterator

import pyarrow.fs as pafs


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def _s3_filesystem() -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        scheme, _, rest = endpoint.partition("://")
        kwargs["endpoint_override"] = rest or scheme
        kwargs["scheme"] = scheme if rest else "https"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=int(os.environ.get("DIVCONQ_S3_MAX_ATTEMPTS", "10")))
    return pafs.S3FileSystem(**kwargs)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path_inside_it)`` for a local path or ``s3://`` URI."""
    uri = str(uri)
    if is_s3(uri):
        return _s3_filesystem(), uri[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    uri = str(uri)
    if is_s3(uri):
        return "s3://" + posixpath.join(uri[len("s3://"):].rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object; local writes are atomic (temp file + rename)."""
    fs, path = filesystem(uri)
    parent = posixpath.dirname(path) if is_s3(uri) else os.path.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    if is_s3(uri):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def read_json(uri: str) -> Any:
    return json.loads(read_text(uri))


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def delete_partial_writes(uri: str) -> None:
    """Remove the temp files that writes of ``uri`` killed before their rename left (local disk only:
    an S3 object appears whole or not at all)."""
    if is_s3(uri):
        return
    import glob

    for tmp in glob.glob(glob.escape(filesystem(uri)[1]) + ".tmp-*"):
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass


def list_files(uri: str, suffix: str = "", recursive: bool = True) -> list[str]:
    """Files under a directory URI (sorted, returned as URIs of the same kind)."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type == pafs.FileType.File:
        return [uri]
    selector = pafs.FileSelector(path, recursive=recursive)
    out = []
    for f in fs.get_file_info(selector):
        if f.type != pafs.FileType.File or not f.path.endswith(suffix):
            continue
        base = posixpath.basename(f.path)
        if base.startswith((".", "_")):
            continue
        out.append(("s3://" + f.path) if is_s3(uri) else f.path)
    return sorted(out)


def delete(uri: str) -> None:
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def copy_dir(src: str, dst: str) -> None:
    """Recursively copy a directory between any two of local / S3."""
    src_fs, src_path = filesystem(src)
    dst_fs, dst_path = filesystem(dst)
    dst_fs.create_dir(dst_path, recursive=True)
    pafs.copy_files(src_path, dst_path, source_filesystem=src_fs, destination_filesystem=dst_fs)


def iter_lines(uri: str) -> Iterator[str]:
    """Stream text lines of a (possibly gzipped) local or S3 file."""
    fs, path = filesystem(uri)
    compression = "gzip" if path.endswith(".gz") else None
    import io

    with fs.open_input_stream(path, compression=compression) as raw:
        for line in io.TextIOWrapper(raw, encoding="utf-8"):
            yield line.rstrip("\n")


def localize(uri: str, cache_root: str | None = None) -> str:
    """Return a local directory holding ``uri`` (downloaded once if it is on S3)."""
    if not is_s3(uri):
        return os.path.abspath(os.path.expanduser(uri))
    import hashlib
    import tempfile

    root = cache_root or os.path.join(tempfile.gettempdir(), "divconq-cache")
    local = os.path.join(root, hashlib.sha256(uri.encode()).hexdigest()[:16])
    marker = os.path.join(local, ".complete")
    if not os.path.exists(marker):
        copy_dir(uri, local)
        open(marker, "w").close()
    return local
