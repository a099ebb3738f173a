"""Checks before Ray starts: every setting that names a file, folder, model, URI or store.

`l2t train`, `l2t sweep`, `l2t data prepare` and `l2t quickstart` call
`preflight` before `connect()`, so a misspelled path fails in a second, with
one line naming the key and its value, instead of after a Ray start-up, a
validation pass or a preparation, as a traceback. Nothing here contacts S3
(s3:// locations are left to the stage that reads them) and the one network
check, an HTTP tracking server, is bounded by a short timeout. Values are
shown through `storage.redact`, so credentials in a URI are never printed.

What counts as a model: `tiny`, a local folder that exists, or something
shaped like a Hugging Face hub id (`org/name`). A path that is explicitly
one (`./x`, `../x`, `/x`, `~/x`) or that does not exist and is not
`org/name`-shaped is "not found"; it never becomes a hub id.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from orchestrator import storage
from orchestrator.config import ExperimentConfig, resolve_repo_path

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
"""A Hugging Face hub repository id: `org/name` (one slash, no `..`)."""
TRACKING_TIMEOUT_S = 3.0
"""How long an HTTP tracking server gets to answer /health during the checks."""
DATABASE_SCHEMES = ("postgresql", "mysql", "mssql", "databricks")
"""MLflow tracking URI schemes accepted without a check here (MLflow connects to them itself)."""


class PreflightError(ValueError):
    """Settings that can't work; one line per problem, each naming the key and the value."""


def _shown(value: str) -> str:
    return repr(storage.redact(value))


def _local_file(key: str, value: str, kind: str = "file") -> str | None:
    """A problem line when the local `value` is not an existing file (`kind` "file") or folder ("folder")."""
    path = Path(value).expanduser()
    if not path.exists():
        return f"{key}={_shown(value)}: not found" + ("" if path.is_absolute() else f" (relative to {os.getcwd()})")
    if kind == "file" and not path.is_file():
        return f"{key}={_shown(value)}: is a folder, not a file"
    if kind == "folder" and not path.is_dir():
        return f"{key}={_shown(value)}: is a file, not a folder"
    return None


def _location(key: str, value: str, kind: str = "file") -> str | None:
    """Local paths must exist; s3:// is left to the stage that reads it; other URL schemes are refused."""
    try:
        storage.check_location(value, key)
    except storage.StorageError as error:
        return str(error)
    return None if storage.is_s3(value) else _local_file(key, value, kind)


def _json_file(key: str, path: Path, value: str) -> str | None:
    try:
        parsed = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        return f"{key}={_shown(value)}: not a readable JSON file ({type(error).__name__}: {error})"
    return None if isinstance(parsed, dict) else f"{key}={_shown(value)}: the JSON file does not hold an object"


def model_reference(name: str) -> tuple[str, str]:
    """("tiny" | "local" | "hub", what to load) for `model.name_or_path`; PreflightError when it is none.

    A local folder that exists wins; a name that is explicitly a path never becomes a hub id.
    """
    key = "model.name_or_path"
    if name == "tiny":
        return "tiny", name
    if not name.strip():
        raise PreflightError(f"{key}={name!r}: empty; use a local model folder, a hub id (org/name) or tiny")
    if storage.url_scheme(name):
        raise PreflightError(f"{key}={_shown(name)}: a URL; use a local model folder, a hub id (org/name) or tiny")
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise PreflightError(f"{key}={_shown(name)}: is a file, not a model folder")
        return "local", str(path.resolve())
    explicit = name.startswith(("./", "../", ".\\", "..\\", "/", "~")) or name in (".", "..") or path.is_absolute()
    if not explicit and HUB_ID.match(name) and ".." not in name:
        return "hub", name
    where = "" if path.is_absolute() else f" relative to {os.getcwd()}"
    raise PreflightError(
        f"{key}={_shown(name)}: not found (no such folder{where}, and not a hub id of the form org/name)"
    )


def _model(cfg: ExperimentConfig) -> str | None:
    try:
        model_reference(cfg.model.name_or_path)
    except PreflightError as error:
        return str(error)
    return None


def _sources(cfg: ExperimentConfig) -> list[str]:
    from orchestrator.readers import PrepareError, list_source_files

    if cfg.data.synthetic is not None:
        return []
    problems = []
    for i, source in enumerate(cfg.data.sources):
        key = f"data.sources[{i}]"
        try:
            storage.check_location(source, key)
            if not storage.is_s3(source):
                list_source_files([source])
        except storage.StorageError as error:
            problems.append(str(error))
        except PrepareError:
            exists = Path(source).expanduser().exists()
            what = "holds no .json, .jsonl or .parquet file" if exists else "not found"
            where = "" if os.path.isabs(source) else f" (relative to {os.getcwd()})"
            problems.append(f"{key}={_shown(source)}: {what}{where}")
    return problems


def _data(cfg: ExperimentConfig, training: bool) -> list[str]:
    data = cfg.data
    problems = _sources(cfg)
    if data.image_root and data.synthetic is None:
        problems.append(_location("data.image_root", data.image_root, "folder"))
    if training and data.eval_file and data.synthetic is None:
        problems.append(_location("data.eval_file", data.eval_file))
    if data.synthetic is not None and storage.is_s3(cfg.storage.path):
        problems.append(
            f"data.synthetic needs a local storage.path (storage.path={_shown(cfg.storage.path)}): "
            "generate once locally, upload, and set data.sources"
        )
    return problems


def _task_templates(cfg: ExperimentConfig) -> str | None:
    value = cfg.masking.task_templates.file
    if not value:
        return None
    key = "masking.task_templates.file"
    return _location(key, value) or (None if storage.is_s3(value) else _json_file(key, Path(value).expanduser(), value))


def _deepspeed(cfg: ExperimentConfig) -> str | None:
    value = cfg.train.deepspeed
    path = resolve_repo_path(value)
    if not path.is_file():
        return f"train.deepspeed={_shown(value)}: not found (looked in {os.getcwd()} and the repository's folder)"
    return _json_file("train.deepspeed", path, value)


def _storage(cfg: ExperimentConfig) -> str | None:
    value = cfg.storage.path
    try:
        storage.check_location(value, "storage.path")
    except storage.StorageError as error:
        return str(error)
    if storage.is_s3(value):
        return None if value[len("s3://") :].strip("/") else "storage.path='s3://': name a bucket (s3://BUCKET/PREFIX)"
    path = Path(value).expanduser().absolute()
    if path.exists() and not path.is_dir():
        return f"storage.path={_shown(value)}: is a file, not a folder"
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        return f"storage.path={_shown(value)}: can't be created ({existing} is not a writable folder)"
    return None


def _tracking(cfg: ExperimentConfig, timeout_s: float) -> str | None:
    from orchestrator.tracking import TrackingError, check_reachable

    value = cfg.tracking.uri
    if not value:
        return None
    key = "tracking.uri"
    scheme = storage.url_scheme(value) or ("sqlite" if value.startswith("sqlite:") else None)
    if scheme in ("http", "https"):
        try:
            check_reachable(value, timeout_s=timeout_s)
        except TrackingError as error:
            return f"{key}={_shown(value)}: {error}"
        return None
    if scheme == "sqlite":
        database = value[len("sqlite:///") :] if value.startswith("sqlite:///") else ""
        parent = Path(database).expanduser().parent if database else None
        if parent is None or not parent.is_dir():
            return f"{key}={_shown(value)}: the folder of the SQLite file does not exist ({parent or 'no path given'})"
        return None
    if scheme in DATABASE_SCHEMES:
        return None
    if scheme == "file" or scheme is None:
        folder = Path(value[len("file://") :] if scheme else value).expanduser()
        return None if folder.parent.is_dir() else f"{key}={_shown(value)}: {folder.parent} does not exist"
    accepted = ", ".join(("http(s)://", "sqlite:///", *(f"{s}://" for s in DATABASE_SCHEMES), "file://"))
    return f"{key}={_shown(value)}: {scheme}:// is not a tracking store MLflow knows here; use one of {accepted}"


def preflight(cfg: ExperimentConfig, *, training: bool = True, timeout_s: float = TRACKING_TIMEOUT_S) -> list[str]:
    """Check `cfg`'s files, folders, model, URIs and stores; raise `PreflightError` listing every problem.

    `training`: also what training reads (train.deepspeed, data.eval_file, tracking.uri); `l2t data
    prepare` checks only what preparation reads. Returns warnings (e.g. credentials written into a URI).
    """
    checks: list[Callable[[], str | list[str] | None]] = [
        lambda: _storage(cfg),
        lambda: _data(cfg, training),
        lambda: _model(cfg),
        lambda: _task_templates(cfg),
    ]
    if training:
        checks += [lambda: _deepspeed(cfg), lambda: _tracking(cfg, timeout_s)]
    problems: list[str] = []
    for check in checks:
        found = check()
        problems.extend(p for p in (found if isinstance(found, list) else [found]) if p)
    if problems:
        raise PreflightError("\n".join(problems))
    warnings = []
    if cfg.tracking.uri and storage.URL_USERINFO.search(cfg.tracking.uri):
        warnings.append(
            "tracking.uri carries credentials: they are used from MLFLOW_TRACKING_USERNAME / "
            "MLFLOW_TRACKING_PASSWORD of this process; set those instead (on Kubernetes, from a Secret)"
        )
    return warnings
