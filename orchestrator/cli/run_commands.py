"""Commands that run experiments on the Ray cluster this process joins: `l2t quickstart`, `l2t train`,
`l2t sweep`; and `l2t compare`, their runs side by side from MLflow."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Optional

import typer

from orchestrator import storage
from orchestrator.cli.common import Overrides, console, err, fail, load
from orchestrator.config import CONFIG_DIR, ConfigError, ExperimentConfig

Verbose = Annotated[
    bool, typer.Option("--verbose", "-v", help="Show Ray, Ray Data, DeepSpeed and torch logs live (else: a log file).")
]


def checked(cfg: ExperimentConfig, training: bool = True) -> ExperimentConfig:
    """`cfg` after `orchestrator.preflight` (before Ray starts), or exit 2 with one line per bad setting."""
    from orchestrator.preflight import PreflightError, preflight

    try:
        for warning in preflight(cfg, training=training):
            err.print(f"[yellow]warning:[/yellow] {warning}", highlight=False, soft_wrap=True)
    except PreflightError as error:
        fail(str(error))
    return cfg


def quickstart(
    output: Annotated[Path, typer.Option(help="Folder for data, models, runs and the MLflow store.")] = Path(
        "l2t_quickstart"
    ),
    overrides: Overrides = None,
    verbose: Verbose = False,
) -> None:
    """Synthetic data -> Ray Data -> VIT and L2T runs on Ray Train + DeepSpeed -> evaluation -> MLflow."""
    # the config run_quickstart loads (orchestrator.quickstart.QUICKSTART_CONFIG), checked before its imports
    cfg = checked(load(CONFIG_DIR / "quickstart.yaml", [f"storage.path={output.resolve()}", *(overrides or [])]))
    from orchestrator.console import quiet_logs

    log_file = quiet_logs(cfg.storage.path, "quickstart", verbose)  # before the libraries are imported
    from orchestrator.cluster import connect
    from orchestrator.prepare import PrepareError
    from orchestrator.quickstart import run_quickstart

    _sigterm_as_interrupt()
    try:
        connect(verbose=verbose)
        run_quickstart(output, overrides, console)
    except (ConfigError, PrepareError) as error:
        fail(str(error), code=1)
    if log_file:
        console.print(f"logs: {log_file}", soft_wrap=True, highlight=False)


def train(
    config: Path,
    overrides: Overrides = None,
    name: Annotated[
        Optional[str],
        typer.Option(
            "--name",
            help="A stable run name: running the same command again resumes this run from its last checkpoint.",
        ),
    ] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="With --name: start over instead of resuming.")] = False,
    verbose: Verbose = False,
) -> None:
    """Prepare (or reuse) the data, train with Ray Train, evaluate, log to MLflow (live, while it trains)."""
    if name is not None and not _RUN_NAME.fullmatch(name):
        fail(f"--name {name!r}: use letters, digits, '.', '_' and '-'")
    cfg = checked(load(config, overrides))
    from orchestrator.console import quiet_logs

    log_file = quiet_logs(cfg.storage.path, "train", verbose)  # before the libraries are imported
    from orchestrator.cluster import connect
    from orchestrator.experiment import run_experiment
    from orchestrator.prepare import PrepareError
    from orchestrator.quickstart import comparison_table
    from orchestrator.tracking import TrackingError, tracking_uri

    _sigterm_as_interrupt()
    try:
        connect(verbose=verbose)
        result = run_experiment(cfg, run_name=name, fresh=fresh)
    except (TrackingError, PrepareError) as error:
        fail(str(error))
    console.print(comparison_table([result], title=result.run_name))
    console.print(f"model: {result.train.model_dir}", soft_wrap=True, highlight=False)
    uri = storage.redact(tracking_uri(cfg))
    console.print(f"MLflow run {result.mlflow_run_id} in {uri}", soft_wrap=True, highlight=False)
    if log_file:
        console.print(f"logs: {log_file}", soft_wrap=True, highlight=False)


_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _sigterm_as_interrupt() -> None:
    """SIGTERM (a scheduler stopping the job) unwinds like Ctrl-C, so the MLflow run is marked KILLED."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread
        pass


def sweep(config: Path, overrides: Overrides = None) -> None:
    """Ray Tune over λ_I, λ_A and other keys; one MLflow parent run, one child per trial. Re-run to resume."""
    cfg = checked(load(config, overrides))
    import mlflow

    from orchestrator.cluster import connect
    from orchestrator.compare import DEFAULT_METRICS, table
    from orchestrator.compare import compare as build_comparison
    from orchestrator.prepare import PrepareError
    from orchestrator.sweep import run_sweep
    from orchestrator.tracking import TrackingError, tracking_uri

    try:
        connect()
        result = run_sweep(cfg)
    except (TrackingError, PrepareError, ConfigError) as error:
        fail(str(error), code=1)
    mlflow.set_tracking_uri(tracking_uri(cfg))
    comparison = build_comparison(
        result.name,
        Path(result.path) if not result.path.startswith("s3://") else Path("l2t_compare") / result.name,
        metrics=[cfg.sweep.metric, *DEFAULT_METRICS],
        experiment=cfg.tracking.experiment,
    )
    console.print(table(comparison))
    console.print(
        f"sweep {result.name}: {len(result.trials)} trials; "
        f"MLflow parent run {result.parent_run_id} in {storage.redact(tracking_uri(cfg))}"
    )


def _existing_store(cfg: ExperimentConfig) -> str:
    """The config's tracking URI; for the local SQLite store only if it exists (compare never creates one)."""
    from orchestrator import layout
    from orchestrator.tracking import tracking_uri

    if cfg.tracking.uri:
        return tracking_uri(cfg)
    root = layout.root(cfg.storage.path)
    db = None if storage.is_s3(root) else Path(layout.mlflow_db(root))
    if db is not None and not db.exists():
        fail(f"no MLflow store at {db} (storage.path={cfg.storage.path}): run l2t train or l2t sweep first")
    return tracking_uri(cfg)


def compare(
    name: Annotated[
        str,
        typer.Argument(help="A sweep name or its start (lambda-grid: lambda-grid-sweep-<hash>), or an experiment."),
    ],
    config: Annotated[
        Optional[Path], typer.Option("--config", help="Take the tracking URI and experiment from this config.")
    ] = None,
    tracking_uri: Annotated[
        Optional[str], typer.Option(help="MLflow tracking URI (else the config's, else MLFLOW_TRACKING_URI).")
    ] = None,
    metric: Annotated[Optional[list[str]], typer.Option(help="Metrics to compare (repeatable).")] = None,
    output: Annotated[Path, typer.Option(help="Folder for the table (CSV) and the plots (PNG).")] = Path("l2t_compare"),
    baseline: Annotated[
        Optional[str],
        typer.Option(help="key=value picking the baseline arm (e.g. mode=response): paired Δ with 95% intervals."),
    ] = None,
    overrides: Overrides = None,
) -> None:
    """Trials side by side: a table (best highlighted), λ_I x λ_A heatmaps and training curves."""
    import mlflow

    from orchestrator.compare import arms_table, table
    from orchestrator.compare import compare as build_comparison

    experiment = None
    if config is not None:
        cfg = load(config, overrides)
        tracking_uri = tracking_uri or _existing_store(cfg)
        experiment = cfg.tracking.experiment
    elif overrides:
        fail("key=value overrides need --config")
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        fail("give --tracking-uri or --config (or set MLFLOW_TRACKING_URI)")
    from orchestrator.tracking import use_credentials

    mlflow.set_tracking_uri(use_credentials(tracking_uri))  # a user:password@ goes to MLFLOW_TRACKING_*
    try:
        result = build_comparison(name, output / name, metrics=metric or None, experiment=experiment, baseline=baseline)
    except (LookupError, ValueError) as error:
        fail(str(error), code=1)
    console.print(table(result))
    arms = arms_table(result)
    if arms is not None:
        console.print(arms)
    for path in result.files:
        console.print(f"wrote {path}")
