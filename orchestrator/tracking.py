"""MLflow: one run per training, parent runs for groups (quickstart, sweeps).

`l2t train` and the quickstart open the run when training starts
(`start_training_run`); Ray Train's controller logs each report to it as it
comes (`LiveMetrics`, wall-clock timestamps), and the driver adds evaluation
and artifacts and ends it FINISHED, or FAILED / KILLED (`end_training_run`).
Workers never talk to MLflow. Sweep trials are logged by the driver after
they finish (a SQLite store takes one writer at a time), as children of the
sweep's parent run, named by their point and with only the params that differ.
Params are the resolved config flattened, with credentials redacted, and the
prepared data's row counts. Experiments are created as classic ML experiments
(`EXPERIMENT_KIND`), their artifacts beside a local store (`ensure_experiment`).

Credentials: MLflow reads MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD
(on Kubernetes, from a Secret). A `user:password@` in `tracking.uri` is moved
into those variables of this process and the URI used without it
(`tracking_uri`); neither is ever printed (`storage.redact`).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from orchestrator import layout, storage
from orchestrator.config import REPO_ROOT, ExperimentConfig


class TrackingError(RuntimeError):
    """The tracking server can't be used."""


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """(the URI without `user:password@`, user, password), percent-escapes decoded; (uri, None, None) without."""
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri, None, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, has_password, password = userinfo.partition(":")
    clean = urllib.parse.urlunsplit(parts._replace(netloc=host))
    return clean, urllib.parse.unquote(user), urllib.parse.unquote(password) if has_password else None


def use_credentials(uri: str) -> str:
    """`uri` without its credentials, which go to MLFLOW_TRACKING_USERNAME / _PASSWORD of this process."""
    clean, user, password = split_credentials(uri)
    if user is not None:
        os.environ["MLFLOW_TRACKING_USERNAME"] = user
        if password is not None:
            os.environ["MLFLOW_TRACKING_PASSWORD"] = password
    return clean


def tracking_uri(cfg: ExperimentConfig) -> str:
    """The MLflow tracking URI of `cfg`, credentials moved into the environment (`use_credentials`)."""
    if cfg.tracking.uri:
        return use_credentials(cfg.tracking.uri)
    root = layout.root(cfg.storage.path)
    if storage.is_s3(root):
        root = str(Path.home() / ".l2t")
    Path(root).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{layout.mlflow_db(root)}"


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Fail before any training starts when an HTTP tracking server does not answer within `timeout_s`.

    Name resolution included (the check runs on a thread that is given up after `timeout_s`);
    credentials in the URI or in MLFLOW_TRACKING_USERNAME / _PASSWORD are sent as basic auth.
    """
    if not uri.startswith(("http://", "https://")):
        return
    shown = storage.redact(uri)
    clean, user, password = split_credentials(uri)
    user = user if user is not None else os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = password if password is not None else os.environ.get("MLFLOW_TRACKING_PASSWORD")
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            request = urllib.request.Request(clean.rstrip("/") + "/health")
            if user:
                token = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
                request.add_header("Authorization", f"Basic {token}")
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                outcome.append(None if response.status == 200 else f"answered {response.status} on /health")
        except Exception as error:  # noqa: BLE001 - OSError, http.client.InvalidURL (a bad port), ValueError
            outcome.append(f"is unreachable: {storage.redact(str(error))}")

    thread = threading.Thread(target=probe, name="l2t-tracking-check", daemon=True)
    thread.start()
    thread.join(timeout_s + 0.5)
    problem = outcome[0] if outcome else f"did not answer within {timeout_s:g} s"
    if problem:
        raise TrackingError(f"MLflow server {shown} {problem}")


def git_commit(cwd: str | Path = REPO_ROOT) -> str:
    """HEAD of the git checkout at `cwd` (this repository by default); installed from a wheel (no checkout
    around the package), `l2t-orchestrator <version>`; "unknown" when neither is known."""
    if Path(cwd) == REPO_ROOT and not (REPO_ROOT / "pyproject.toml").is_file():
        return _package_version()
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return _package_version()


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"l2t-orchestrator {version('l2t-orchestrator')}"
    except PackageNotFoundError:
        return "unknown"


EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
"""MLflow 3 opens an experiment without this tag in its GenAI (traces) view; this one shows runs and charts."""


def ensure_experiment(cfg: ExperimentConfig) -> str:
    """The id of `cfg.tracking.experiment`, created as a classic ML experiment when missing. With the local
    SQLite store its artifacts go beside the store (`<storage>/mlruns`), never into ./mlruns of the cwd."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        location = None
        if uri.startswith("sqlite:///"):
            location = Path(uri.removeprefix("sqlite:///")).parent.joinpath("mlruns").resolve().as_uri()
        try:
            experiment_id = client.create_experiment(
                cfg.tracking.experiment, artifact_location=location, tags=EXPERIMENT_KIND
            )
        except Exception:  # noqa: BLE001 - created meanwhile by another process
            experiment_id = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    else:
        experiment_id = experiment.experiment_id
        if "mlflow.experimentKind" not in experiment.tags:
            client.set_experiment_tag(experiment_id, *next(iter(EXPERIMENT_KIND.items())))
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def _mlflow(cfg: ExperimentConfig):
    import mlflow

    ensure_experiment(cfg)
    return mlflow


def start_training_run(
    cfg: ExperimentConfig,
    run_name: str,
    *,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    config_params: dict[str, Any] | None = None,
) -> str:
    """Open (status RUNNING) the MLflow run of one training as it starts; params: the resolved config
    flattened (or `config_params`) and the git commit."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    experiment_id = ensure_experiment(cfg)
    commit = git_commit()
    tags = {"l2t.kind": "trial", "mlflow.source.git.commit": commit, "mlflow.runName": run_name, **(tags or {})}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    client = MlflowClient(tracking_uri(cfg))
    run_id = client.create_run(experiment_id, tags=tags, run_name=run_name).info.run_id
    flat = storage.redact({**(cfg.flat() if config_params is None else config_params), "git.commit": commit})
    params = [Param(k, str(v)[:500]) for k, v in flat.items()]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])
    return run_id


def end_training_run(uri: str, run_id: str, status: str) -> None:
    """Mark the run FINISHED, FAILED or KILLED; never raises (it runs while an error is on its way out)."""
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(uri).set_terminated(run_id, status=status)
    except Exception as error:  # noqa: BLE001
        print(f"warning: could not mark MLflow run {run_id} {status}: {storage.redact(str(error))}", flush=True)


def curve_metrics(row: dict[str, Any], timestamp_ms: int) -> list:
    """One metrics.jsonl row as `train/<key>` MLflow metrics at its step."""
    from mlflow.entities import Metric

    step = int(row.get("step", 0))
    return [
        Metric(key=f"train/{k}", value=float(v), timestamp=timestamp_ms, step=step)
        for k, v in row.items()
        if k not in ("step", "final") and isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
    ]


class LiveMetrics:
    """Logs each training report to an open MLflow run as it happens (from Ray Train's controller callback)."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id, self.warned = uri, run_id, False

    def __call__(self, row: dict[str, Any]) -> None:
        from mlflow.tracking import MlflowClient

        try:
            MlflowClient(self.uri).log_batch(self.run_id, metrics=curve_metrics(row, int(time.time() * 1000)))
        except Exception as error:  # noqa: BLE001 - tracking trouble never stops a training run
            if not self.warned:
                self.warned = True
                print(f"warning: live MLflow logging failed: {storage.redact(str(error))}", flush=True)


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
    run_id: str | None = None,
    config_params: dict[str, Any] | None = None,
) -> str:
    """Log one trained model: params, the training curve, evaluation, artifacts; the run ends FINISHED.

    `run_id`: the run `start_training_run` opened (its live curve is kept; steps it lacks are added);
    without it a run is created now. `config_params`: the config params of a new run (default: all of `cfg`).
    Returns the run id."""
    mlflow = _mlflow(cfg)
    from mlflow.tracking import MlflowClient

    if run_id is None:
        run_id = start_training_run(cfg, run_name, parent_run_id=parent_run_id, tags=tags, config_params=config_params)
    client = MlflowClient()
    with mlflow.start_run(run_id=run_id):
        mlflow.log_params({k: str(v)[:500] for k, v in storage.redact({**manifest_params(params), **params}).items()})
        logged = {m.step for m in client.get_metric_history(run_id, "train/loss")}
        now = int(time.time() * 1000)
        curve = [m for row in history if int(row.get("step", 0)) not in logged for m in curve_metrics(row, now)]
        for i in range(0, len(curve), 1000):
            client.log_batch(run_id, metrics=curve[i : i + 1000])
        mlflow.log_metrics({f"eval/{k}": float(v) for k, v in eval_metrics.items()})
        with tempfile.TemporaryDirectory() as tmp:
            config_path = Path(tmp, "config.json")
            config_path.write_text(json.dumps(storage.redact(cfg.model_dump(mode="json")), indent=2))
            mlflow.log_artifact(str(config_path))
        log_artifacts(artifacts)
    return run_id


MANIFEST_PARAMS = ("rows_in", "rows_written", "rows_quarantined", "truncated_rows")


def manifest_params(params: dict[str, Any]) -> dict[str, Any]:
    """`prepared.<count>` params from the manifest of the prepared data at `params["prepared.path"]`: rows in,
    written, quarantined (and by reason), duplicate ids; {} when there is none."""
    path = params.get("prepared.path")
    manifest_uri = storage.join(str(path), "manifest.json") if path else None
    if not manifest_uri or not storage.exists(manifest_uri):
        return {}
    manifest = json.loads(storage.read_text(manifest_uri))
    out = {f"prepared.{key}": manifest[key] for key in MANIFEST_PARAMS if key in manifest}
    out.update({f"prepared.quarantined.{k}": v for k, v in manifest.get("quarantined_by_reason", {}).items()})
    duplicates = manifest.get("duplicate_ids") or {}
    if duplicates:
        out["prepared.duplicate_ids"] = duplicates.get("ids")
    return out


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
