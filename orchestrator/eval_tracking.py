"""MLflow for `l2t eval`: one run per evaluation, l2t's suites and lmms-eval's tasks side by side.

The run goes to the experiment config's tracking server and experiment when
`l2t eval` has `--config`, else to ``MLFLOW_TRACKING_URI`` or a SQLite store
beside the outputs (``<output>/mlflow.db``; ``~/.l2t/mlflow.db`` for an s3://
output), experiment ``l2t-eval``. Metrics are ``<suite>/<metric>`` for l2t's
suites and ``lmms/<task>/<metric>`` for lmms-eval's; params name the model, the
suites and the rule each suite kind was scored by; the summary
``metrics.json`` is the run's artifact.
"""

from __future__ import annotations

import os
import posixpath
import re
from pathlib import Path

from orchestrator import storage

EVAL_EXPERIMENT = "l2t-eval"


def eval_tracking(output: str, config=None) -> tuple[str, str]:
    """(tracking URI, experiment) of an `l2t eval` run."""
    if config is not None:
        from orchestrator.tracking import tracking_uri

        return tracking_uri(config), config.tracking.experiment
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], EVAL_EXPERIMENT
    root = Path.home() / ".l2t" if storage.is_s3(output) else Path(output)
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root.resolve() / 'mlflow.db'}", EVAL_EXPERIMENT


def _key(text: str) -> str:
    return re.sub(r"[^\w\-. /]", "_", text)


def eval_run_metrics(results: dict) -> dict[str, float]:
    """MLflow metrics of `run_eval`'s results: ``<suite>/<metric>``, ``lmms/<task>/<metric>``."""
    out: dict[str, float] = {}
    for name, result in results.items():
        prefix = f"lmms/{name.split(':', 1)[1]}" if name.startswith("lmms:") else name
        for metric, value in result.metrics.items():
            if isinstance(value, (int, float)) and value == value:
                out[_key(f"{prefix}/{metric}")] = float(value)
    return out


def log_eval_run(model_dir: str, output: str, results: dict, config=None, run_name: str | None = None) -> str:
    """Log an `l2t eval` (its `run_eval` results) as one MLflow run; returns the run id."""
    import mlflow

    uri, experiment = eval_tracking(output, config)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    name = run_name or f"eval-{posixpath.basename(str(model_dir).rstrip('/')) or 'model'}"
    params = {"model_dir": str(model_dir), "output": str(output), "suites": ",".join(results)}
    for suite, result in results.items():
        params.update({_key(f"scoring.{suite}.{kind}"): rule for kind, rule in (result.scoring or {}).items()})
    with mlflow.start_run(run_name=name, tags={"l2t.kind": "eval"}) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in storage.redact(params).items()})
        mlflow.log_metrics(eval_run_metrics(results))
        summary = storage.join(output, "metrics.json")
        if not storage.is_s3(summary) and Path(summary).exists():
            mlflow.log_artifact(summary)
        return run.info.run_id
