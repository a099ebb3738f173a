"""The step layer: each stage of the chain is a step whose output is keyed by its inputs.

A step (synthetic data, the tiny model, prepared data, a training run, an
evaluation) hashes everything that determines its output into a key; the key
names its folder (`orchestrator.layout`), and a finished step leaves a marker
there. Running a finished step again is a no-op, so re-running any command is
safe and a sweep's trials share what they have in common (the idea of Marin's
executor, kept small).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from orchestrator import storage

COMPLETE_MARKER = ".complete"


def stable_hash(value: Any, length: int = 16) -> str:
    """A short hash of a JSON-able value, the same on every machine and run (keys sorted)."""
    blob = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def is_complete(out: str, marker: str = COMPLETE_MARKER) -> bool:
    """Whether the step writing into `out` finished (its marker exists)."""
    return storage.exists(storage.join(out, marker))


def run_once(out: str, build: Callable[[str], None], *, marker: str = COMPLETE_MARKER) -> str:
    """Run `build(out)` unless `out` holds a finished step; mark it finished; return `out`.

    An unfinished folder (a step that died midway) is cleared and built again.
    """
    if is_complete(out, marker):
        return out
    storage.delete_dir(out)
    build(out)
    storage.write_text(storage.join(out, marker), "ok")
    return out
