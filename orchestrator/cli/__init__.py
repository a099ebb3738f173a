"""The `l2t` command line. Every command that takes a config accepts trailing `key=value` overrides.

Each module holds one family of commands; this one puts them together:
`config_commands` (config validate, schema), `data_commands` (data prepare,
stats, inspect), `model_commands` (model compose), `run_commands`
(quickstart, train, sweep, compare), `eval_command` (eval) and
`submit_command` (submit). `common` has what they share.
"""

from __future__ import annotations

import typer

from orchestrator.cli import config_commands, data_commands, model_commands, run_commands
from orchestrator.cli.eval_command import eval_command
from orchestrator.cli.submit_command import command as submit_command

app = typer.Typer(
    help="l2t: visual instruction tuning with the L2T loss on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.command()(run_commands.quickstart)
app.command()(run_commands.train)
app.command()(run_commands.sweep)
app.command("submit")(submit_command)
app.command("eval")(eval_command)
app.command()(run_commands.compare)
app.add_typer(config_commands.app, name="config")
app.add_typer(data_commands.app, name="data")
app.add_typer(model_commands.app, name="model")

__all__ = ["app"]
