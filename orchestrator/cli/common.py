"""What every command shares: the consoles, the error exit, config loading, the overrides argument."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape

from orchestrator.config import ConfigError, ExperimentConfig, load_config

console = Console()
err = Console(stderr=True)

Overrides = Annotated[
    Optional[list[str]], typer.Argument(help="Dotted overrides, e.g. train.lr=1e-4", show_default=False)
]


def fail(message: str, code: int = 2) -> NoReturn:
    """Print `error: message` on stderr and exit with `code` (2: bad input, 1: the work failed)."""
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def load(path: Path, overrides: list[str] | None) -> ExperimentConfig:
    """The config at `path` with `overrides`, or exit with the error naming the bad key."""
    try:
        return load_config(path, overrides or [])
    except ConfigError as error:
        fail(str(error))
