"""Progress lines for people: one logger for every stage, and where everything else goes.

Progress lines go to stderr, so stdout stays clean for piped output (`l2t config
schema > file`, `l2t data inspect --format json`). The libraries' own logs (Ray,
Ray Data, Ray Train, DeepSpeed, transformers, torch, warnings) go to a log file
under the run's storage (`quiet_logs`: `<storage>/logs/<command>-<time>.log`)
unless the command is verbose (`-v`); the workers' output then stays in Ray's
session logs, whose folder the command prints too.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

Progress = Callable[[str], None]
"""Where a stage sends its progress lines (None where a caller wants silence)."""

QUIETED = ("ray", "ray.data", "ray.train", "ray.tune", "deepspeed", "transformers", "torch", "py.warnings", "mlflow")
"""Loggers whose records go to the log file instead of the console."""

QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "PYTHONWARNINGS": "ignore",
}
"""Set (if unset) before the libraries are imported and a local Ray cluster starts (its workers inherit them)."""

_log_file: Path | None = None


def log(message: str) -> None:
    """One progress line on stderr, flushed at once."""
    print(message, file=sys.stderr, flush=True)


def log_folder(storage_path: str) -> Path:
    """`<storage>/logs` for a local storage path; `~/.l2t/logs` for s3://."""
    from orchestrator import layout, storage

    root = layout.root(storage_path)
    return Path.home() / ".l2t" / "logs" if storage.is_s3(root) else Path(root) / "logs"


def quiet_logs(storage_path: str, command: str, verbose: bool = False) -> Path | None:
    """Send the libraries' logs to `<storage>/logs/<command>-<time>.log` (returned); None (all live) if `verbose`.

    Call before Ray starts: Ray Data reads its logging config when imported, local Ray workers inherit QUIET_ENV.
    """
    global _log_file
    if verbose:
        return None
    folder = log_folder(storage_path)
    folder.mkdir(parents=True, exist_ok=True)
    _log_file = folder / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    data_config = folder / "ray-data-logging.yaml"
    data_config.write_text(
        "version: 1\ndisable_existing_loggers: false\n"
        "formatters: {plain: {format: '%(asctime)s %(levelname)s %(name)s: %(message)s'}}\n"
        f"handlers: {{file: {{class: logging.FileHandler, formatter: plain, filename: '{_log_file}'}}}}\n"
        "loggers: {ray.data: {level: INFO, handlers: [file], propagate: false}}\n"
    )
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    previous = os.environ.get("RAY_DATA_LOGGING_CONFIG")
    os.environ["RAY_DATA_LOGGING_CONFIG"] = str(data_config)
    try:
        import ray.data  # noqa: F401 - configures the ray.data logger from the file above, on this process only
    finally:
        if previous is None:
            os.environ.pop("RAY_DATA_LOGGING_CONFIG", None)
        else:
            os.environ["RAY_DATA_LOGGING_CONFIG"] = previous
    if "transformers" in sys.modules:  # imported already: its progress bars were switched on at import
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    redirect_loggers()
    return _log_file


def redirect_loggers() -> None:
    """Point the QUIETED loggers at the log file (again: `ray.init` adds its own console handler)."""
    if _log_file is None:
        return
    handler = logging.FileHandler(_log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in QUIETED:
        logger = logging.getLogger(name)
        for old in logger.handlers[:]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.propagate = False
    logging.captureWarnings(True)


def log_file() -> Path | None:
    """This process's log file (`quiet_logs`), or None when logs are live."""
    return _log_file
