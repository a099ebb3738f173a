"""`l2t config validate` and `l2t config schema`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from orchestrator.cli.common import Overrides, console, load
from orchestrator.config import json_schema

app = typer.Typer(help="Validate configs and print their schema.", no_args_is_help=True)


@app.command("validate")
def config_validate(file: Path, overrides: Overrides = None) -> None:
    """Check a config file (and overrides); prints the resolved config."""
    cfg = load(file, overrides)
    console.print(f"[green]ok[/green] {file}")
    console.print_json(json.dumps(cfg.model_dump(mode="json")))


@app.command("schema")
def config_schema() -> None:
    """JSON Schema of experiment configs, for editors."""
    print(json.dumps(json_schema(), indent=2))
