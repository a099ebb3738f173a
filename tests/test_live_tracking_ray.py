"""MLflow while a run trains: the curve is live (real timestamps), a failed run is marked FAILED, and a run
with a stable `--name` resumes from its last checkpoint when the same command runs again."""

from __future__ import annotations

import threading
import time

import pytest
import yaml
from conftest import experiment_config
from typer.testing import CliRunner

pytestmark = pytest.mark.ray

STEPS = 30


def _poll(uri: str, experiment: str, seen: list, stop: threading.Event) -> None:
    """Record (status, steps of train/loss) of the experiment's runs every half second."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    while not stop.wait(0.5):
        found = client.get_experiment_by_name(experiment)
        if found is None:
            continue
        for run in client.search_runs([found.experiment_id]):
            history = client.get_metric_history(run.info.run_id, "train/loss")
            seen.append((run.info.status, [m.step for m in history], [m.timestamp for m in history]))


def test_live_curve_failed_run_and_resume_by_name(ray_cluster, mlflow_server, inject_failure, tmp_path):
    from mlflow.tracking import MlflowClient

    from orchestrator.cli import app
    from orchestrator.experiment import run_experiment

    experiment = "live-test"
    cfg = experiment_config(
        tmp_path,
        train={"max_steps": STEPS, "checkpoint_every": 5, "max_failures": 0, "log_every": 1},
        tracking={"uri": mlflow_server, "experiment": experiment},
    )
    seen: list = []
    stop = threading.Event()
    poller = threading.Thread(target=_poll, args=(mlflow_server, experiment, seen, stop), daemon=True)
    poller.start()
    started_ms = time.time() * 1000
    with pytest.raises(Exception):
        run_experiment(cfg, run_name="named-run", wrap_report=inject_failure(12, str(tmp_path / "failed-once")))
    stop.set()
    poller.join(5)
    live = [steps for status, steps, _ in seen if status == "RUNNING" and steps]
    assert live, f"no metrics seen while the run was RUNNING: {seen[-3:]}"
    assert all(t >= started_ms - 60_000 for _, _, stamps in seen for t in stamps), "timestamps are wall-clock"

    client = MlflowClient(mlflow_server)
    found = client.get_experiment_by_name(experiment)
    assert found.tags.get("mlflow.experimentKind") == "custom_model_development"
    (failed,) = client.search_runs([found.experiment_id])
    assert failed.info.status == "FAILED" and failed.info.run_name == "named-run"
    assert max(m.step for m in client.get_metric_history(failed.info.run_id, "train/loss")) >= 10

    config_file = tmp_path / "experiment.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    result = CliRunner().invoke(app, ["train", str(config_file), "--name", "named-run", "-v"])
    assert result.exit_code == 0, result.output
    assert "resuming the unfinished run" in result.output
    assert f"step {STEPS}/{STEPS}" in result.output
    runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"])
    assert runs[0].info.status == "FINISHED" and runs[0].info.run_name == "named-run"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert max(steps) == STEPS and "eval/accuracy" in runs[0].data.metrics
    assert (tmp_path / "models" / "named-run" / "model" / "l2t_experiment.json").is_file()
