"""Commands that run experiments on the Ray cluster this process joins: `l2t quickstart`, `l2t train`,
`l2t sweep`; and `l2t compare`, their runs side by side from MLflow."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from orchestrator import storage
from orchestrator.cli.common import Overrides, console, fail, load
from orchestrator.config import ConfigError


def quickstart(
    output: Annotated[Path, typer.Option(help="Folder for data, models, runs and the MLflow store.")] = Path(
        "l2t_quickstart"
    ),
    overrides: Overrides = None,
) -> None:
    """Synthetic data -> Ray Data -> VIT and L2T runs on Ray Train + DeepSpeed -> evaluation -> MLflow."""
    from orchestrator.prepare import PrepareError
    from orchestrator.quickstart import run_quickstart

    try:
        run_quickstart(output, overrides, console)
    except (ConfigError, PrepareError) as error:
        fail(str(error), code=1)


def train(config: Path, overrides: Overrides = None) -> None:
    """Prepare (or reuse) the data, train with Ray Train, evaluate, log to MLflow."""
    from orchestrator.cluster import connect
    from orchestrator.experiment import run_experiment
    from orchestrator.prepare import PrepareError
    from orchestrator.quickstart import comparison_table
    from orchestrator.tracking import TrackingError, tracking_uri

    cfg = load(config, overrides)
    try:
        connect()
        result = run_experiment(cfg)
    except (TrackingError, PrepareError) as error:
        fail(str(error))
    console.print(comparison_table([result], title=result.run_name))
    console.print(f"model: {result.train.model_dir}")
    console.print(f"MLflow run {result.mlflow_run_id} in {storage.redact(tracking_uri(cfg))}")


def sweep(config: Path, overrides: Overrides = None) -> None:
    """Ray Tune over λ_I, λ_A and other keys; one MLflow parent run, one child per trial. Re-run to resume."""
    import mlflow

    from orchestrator.cluster import connect
    from orchestrator.compare import DEFAULT_METRICS, table
    from orchestrator.compare import compare as build_comparison
    from orchestrator.prepare import PrepareError
    from orchestrator.sweep import run_sweep
    from orchestrator.tracking import TrackingError, tracking_uri

    cfg = load(config, overrides)
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


def compare(
    name: Annotated[str, typer.Argument(help="A sweep name (its MLflow parent run) or an MLflow experiment name.")],
    config: Annotated[
        Optional[Path], typer.Option("--config", help="Take the tracking URI and experiment from this config.")
    ] = None,
    tracking_uri: Annotated[
        Optional[str], typer.Option(help="MLflow tracking URI (else the config's, else MLFLOW_TRACKING_URI).")
    ] = None,
    metric: Annotated[Optional[list[str]], typer.Option(help="Metrics to compare (repeatable).")] = None,
    output: Annotated[Path, typer.Option(help="Folder for the table (CSV) and the plots (PNG).")] = Path("l2t_compare"),
) -> None:
    """Trials side by side: a table (best highlighted), λ_I x λ_A heatmaps and training curves."""
    import mlflow

    from orchestrator.compare import compare as build_comparison
    from orchestrator.compare import table

    experiment = None
    if config is not None:
        from orchestrator.tracking import tracking_uri as config_uri

        cfg = load(config, [])
        tracking_uri = tracking_uri or config_uri(cfg)
        experiment = cfg.tracking.experiment
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        fail("give --tracking-uri or --config (or set MLFLOW_TRACKING_URI)")
    mlflow.set_tracking_uri(tracking_uri)
    try:
        result = build_comparison(name, output / name, metrics=metric or None, experiment=experiment)
    except LookupError as error:
        fail(str(error), code=1)
    console.print(table(result))
    for path in result.files:
        console.print(f"wrote {path}")
