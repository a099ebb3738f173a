"""MLflow: one run per training, parent runs for groups (quickstart, sweeps).

The driver logs everything after a fit (the curve from the run's metrics
log, evaluation results, artifacts), so workers never talk to MLflow and a
run restarted by Ray Train does not log twice. Params are the resolved config
flattened, with credentials redacted.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from orchestrator import layout, storage
from orchestrator.config import REPO_ROOT, ExperimentConfig


class TrackingError(RuntimeError):
    """The tracking server can't be used."""


def tracking_uri(cfg: ExperimentConfig) -> str:
    if cfg.tracking.uri:
        return cfg.tracking.uri
    root = layout.root(cfg.storage.path)
    if storage.is_s3(root):
        root = str(Path.home() / ".l2t")
    Path(root).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{layout.mlflow_db(root)}"


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Fail before any training starts when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            if response.status != 200:
                raise TrackingError(f"MLflow server {storage.redact(uri)} answered {response.status} on /health")
    except OSError as error:
        raise TrackingError(f"MLflow server {storage.redact(uri)} is unreachable: {error}") from None


def git_commit(cwd: str | Path = REPO_ROOT) -> str:
    """HEAD of the git checkout at `cwd` (this repository by default), or "unknown"."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _mlflow(cfg: ExperimentConfig):
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    mlflow.set_experiment(cfg.tracking.experiment)
    return mlflow


def start_parent_run(cfg: ExperimentConfig, name: str, tags: dict[str, str] | None = None) -> str:
    mlflow = _mlflow(cfg)
    with mlflow.start_run(run_name=name, tags={"l2t.kind": "parent", **(tags or {})}) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in storage.redact(cfg.flat()).items()})
        return run.info.run_id


def log_training_run(
    cfg: ExperimentConfig,
    *,
    run_name: str,
    history: list[dict[str, Any]],
    eval_metrics: dict[str, float],
    params: dict[str, Any],
    artifacts: dict[str, str],
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """Log one trained model: params, the training curve, evaluation, artifacts. Returns the run id."""
    mlflow = _mlflow(cfg)
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    commit = git_commit()
    tags = {"l2t.kind": "trial", "mlflow.source.git.commit": commit, **(tags or {})}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    with mlflow.start_run(run_name=run_name, tags=tags) as run:
        flat = storage.redact({**cfg.flat(), "git.commit": commit, **params})
        mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})
        curve = [
            Metric(key=f"train/{k}", value=float(v), timestamp=0, step=int(row["step"]))
            for row in history
            for k, v in row.items()
            if k not in ("step", "final") and isinstance(v, (int, float)) and v == v
        ]
        client = MlflowClient()
        for i in range(0, len(curve), 1000):
            client.log_batch(run.info.run_id, metrics=curve[i : i + 1000])
        mlflow.log_metrics({f"eval/{k}": float(v) for k, v in eval_metrics.items()})
        with tempfile.TemporaryDirectory() as tmp:
            config_path = Path(tmp, "config.json")
            config_path.write_text(json.dumps(storage.redact(cfg.model_dump(mode="json")), indent=2))
            mlflow.log_artifact(str(config_path))
        log_artifacts(artifacts)
        return run.info.run_id


def log_artifacts(artifacts: dict[str, str]) -> None:
    """Log local files (or s3:// objects, copied through a temporary folder) into the active run."""
    import mlflow

    for name, uri in artifacts.items():
        if not uri or not storage.exists(uri):
            continue
        if storage.is_s3(uri):
            with tempfile.TemporaryDirectory() as tmp:
                local = Path(tmp, uri.rsplit("/", 1)[-1])
                local.write_text(storage.read_text(uri))
                mlflow.log_artifact(str(local), artifact_path=name)
        else:
            mlflow.log_artifact(uri, artifact_path=name)
