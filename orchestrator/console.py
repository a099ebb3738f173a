"""Progress lines for people: one logger for every stage.

They go to stderr, so stdout stays clean for piped output (`l2t config
schema > file`, `l2t data inspect --format json`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

Progress = Callable[[str], None]
"""Where a stage sends its progress lines (None where a caller wants silence)."""


def log(message: str) -> None:
    """One progress line on stderr, flushed at once."""
    print(message, file=sys.stderr, flush=True)
