"""Local paths and s3:// URIs behind one small interface (pyarrow's filesystems).

Ray Data and Ray Train already speak pyarrow filesystems, so every file l2t
writes itself (manifests, template lists, metric logs) goes the same way.
Credentials come only from the standard AWS chain (environment, profile,
instance role); `AWS_ENDPOINT_URL` points at an S3-compatible endpoint. A
filesystem object made here carries the endpoint and region to the Ray
workers it is pickled to, never the keys: each process takes those from its
own AWS chain.
"""

from __future__ import annotations

import os
import posixpath
import re
from pathlib import Path

import pyarrow.fs as pafs

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class StorageError(ValueError):
    """A location that is neither a local path nor an s3:// URI."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def url_scheme(uri: str) -> str | None:
    """The scheme of a `scheme://...` location (lower case), None for a plain path."""
    match = _SCHEME.match(uri)
    return match.group(1).lower() if match else None


def check_location(uri: str, key: str = "location") -> None:
    """StorageError unless `uri` is a local path or an s3:// URI (an `http://` path is not a local folder)."""
    scheme = url_scheme(uri)
    if scheme is not None and not is_s3(uri):
        raise StorageError(f"{key}={redact(uri)!r}: {scheme}:// is not supported; use a local path or an s3:// URI")


def absolute(uri: str) -> str:
    """An absolute local path, or the URI unchanged."""
    return uri if is_s3(uri) else str(Path(uri).expanduser().resolve())


def join(uri: str, *parts: str) -> str:
    if is_s3(uri):
        return posixpath.join(uri, *parts)
    return str(Path(uri, *parts))


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an s3:// URI.

    The S3 filesystem is configured from this process's environment
    (`AWS_ENDPOINT_URL[_S3]`, `AWS_REGION`) and carries that when pickled:
    Ray workers that get it (Ray Data reads and writes, validation tasks)
    reach the same endpoint. Keys are never put into it (Ray Tune writes the
    pickled filesystem to the storage path); every process takes them from
    the standard AWS chain (environment, profile, instance role), so on a
    cluster they must reach the workers the same way (runtime_env env_vars,
    instance roles, IRSA on KubeRay).
    """
    if is_s3(uri):
        bucket_and_key = uri[len("s3://") :]
        return pafs.S3FileSystem(**_s3_options()), bucket_and_key.rstrip("/")
    check_location(uri)
    return pafs.LocalFileSystem(), absolute(uri)


def _s3_options() -> dict:
    kwargs: dict = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs = {"endpoint_override": host.rstrip("/") or scheme, "scheme": scheme if host else "https"}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    # No keys here: a filesystem built with explicit keys pickles them, and Ray Tune writes its
    # filesystem into tuner.pkl on the storage path. Every process takes them from the AWS chain.
    return kwargs


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_text(uri: str) -> str:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as stream:
        return stream.read().decode()


def write_text(uri: str, text: str) -> None:
    fs, path = filesystem(uri)
    fs.create_dir(posixpath.dirname(path) if is_s3(uri) else str(Path(path).parent), recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(text.encode())


def append_text(uri: str, text: str) -> None:
    """Append to a file (local: in place; S3: read and rewrite, fine for small logs)."""
    if not is_s3(uri):
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        with open(uri, "a") as handle:
            handle.write(text)
        return
    write_text(uri, (read_text(uri) if exists(uri) else "") + text)


def delete_dir(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def list_files(uri: str) -> list[str]:
    """Files under a folder (recursively), as URIs/paths of the same kind."""
    fs, path = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    prefix = "s3://" if is_s3(uri) else ""
    return sorted(prefix + info.path for info in infos if info.type == pafs.FileType.File)


def file_fingerprint(uri: str) -> str:
    """Identity of a file's content without reading it: path, size and modification time."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(uri)
    mtime = info.mtime_ns if info.mtime_ns is not None else ""
    return f"{uri}|{info.size}|{mtime}"


_SECRET_KEYS = re.compile(r"(secret|token|password|passwd|access_key|api_key|credential|session_key)", re.I)
URL_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
"""`user:password@` (or a token) in a URL."""


def redact(value):
    """A copy with credentials removed: secret-looking keys of dicts (nested in lists too) and
    user:password@ in URLs, in a single string or anywhere inside."""
    if isinstance(value, dict):
        return {k: ("***" if _SECRET_KEYS.search(str(k)) else redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return URL_USERINFO.sub("***@", value)
    return value
