"""λ sweeps on a real local Ray cluster against a real `mlflow server` on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import experiment_config

pytestmark = pytest.mark.ray


def _sweep_config(storage, tracking_uri, experiment, **sweep):
    return experiment_config(
        storage,
        train={"max_steps": 6, "log_every": 2, "micro_batch_size": 8},
        eval={"max_rows": 20},
        masking={"mode": "l2t"},
        tracking={"uri": tracking_uri, "experiment": experiment},
        sweep={"max_concurrent_trials": 1, **sweep},
    )


def _children(tracking_uri, experiment):
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    parents = [r for r in runs if r.data.tags.get("l2t.kind") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    return parents, children


def test_interrupted_sweep_resumes_only_missing_trials_and_compares(ray_cluster, mlflow_server, tmp_path):
    from orchestrator.compare import compare
    from orchestrator.sweep import TRIALS_DIR, run_sweep, sweep_name

    cfg = _sweep_config(tmp_path / "store", mlflow_server, "sweep-resume", lambda_instruction=[0.0, 1.0])
    config_file = tmp_path / "sweep.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    trials_dir = Path(tmp_path / "store" / "sweeps" / sweep_name(cfg) / TRIALS_DIR)

    # The driver runs in its own process (and its own Ray cluster) and is killed once one trial has finished.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "sweep", str(config_file)],
        stdout=open(tmp_path / "driver.log", "w"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    deadline = time.time() + 420
    while not (trials_dir.exists() and any(trials_dir.glob("*.json"))):
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        assert time.time() < deadline, "no trial finished in time"
        time.sleep(2)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    (finished,) = list(trials_dir.glob("*.json"))
    finished_mtime = finished.stat().st_mtime_ns

    result = run_sweep(cfg)
    assert finished.stat().st_mtime_ns == finished_mtime, "the finished trial did not run again"
    assert len(list(trials_dir.glob("*.json"))) == 2
    assert sorted(t["point"]["masking.lambda_instruction"] for t in result.trials) == [0.0, 1.0]
    assert all(t["status"] == "completed" for t in result.trials)

    parents, children = _children(mlflow_server, "sweep-resume")
    assert len(parents) == 1 and parents[0].info.run_id == result.parent_run_id
    assert len(children) == 2, "one child per trial, none logged twice"
    import mlflow

    client = mlflow.tracking.MlflowClient()
    for child in children:
        params = child.data.params
        assert params["masking.mode"] == "l2t" and params["masking.lambda_instruction"] in ("0.0", "1.0")
        assert (
            params["prepared.key"]
            and params["sweep.name"] == result.name
            and params["train.lr"]
            and params["git.commit"]
        )
        assert "eval/accuracy" in child.data.metrics and "eval/vc_mean" in child.data.metrics
        assert [m.step for m in client.get_metric_history(child.info.run_id, "train/loss_response")] == [2, 4, 6]
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"config.json", "task_templates", "eval"} <= artifacts

    comparison = compare(result.name, tmp_path / "compare", experiment="sweep-resume")
    names = {Path(f).name for f in comparison.files}
    assert {"comparison.csv", "heatmap_eval_accuracy.png", "training_curves.png"} <= names
    assert comparison.best["eval/accuracy"] in {r["run"] for r in comparison.runs}
    logged = {a.path for a in client.list_artifacts(result.parent_run_id, "compare")}
    assert "compare/heatmap_eval_accuracy.png" in logged


def test_asha_stops_a_clearly_worse_trial(ray_cluster, mlflow_server, tmp_path):
    from orchestrator.sweep import run_sweep

    cfg = _sweep_config(
        tmp_path / "store",
        mlflow_server,
        "sweep-asha",
        search="points",
        points=[{"train.lr": 3e-3}, {"train.lr": 1e-9}],
        asha={"enabled": True, "metric": "loss_response", "grace_period": 2, "reduction_factor": 2},
    )
    result = run_sweep(cfg)
    by_lr = {t["point"]["train.lr"]: t for t in result.trials}
    assert by_lr[3e-3]["status"] == "completed"
    assert by_lr[1e-9]["status"] == "stopped_early"
    _, children = _children(mlflow_server, "sweep-asha")
    assert {c.data.tags["l2t.trial_status"] for c in children} == {"completed", "stopped_early"}


def test_asha_rungs_rank_by_a_held_out_metric(ray_cluster, mlflow_server, tmp_path):
    """`sweep.asha.metric: eval/accuracy`: each trial answers the same questions at the rung steps (2, 4), reported
    though `log_every` is 5; ASHA's decision follows those values (the later trial is cut iff it is below the
    earlier one at a rung)."""
    from orchestrator import layout
    from orchestrator.sweep import run_sweep
    from orchestrator.train import read_history

    cfg = _sweep_config(
        tmp_path / "store",
        mlflow_server,
        "sweep-asha-eval",
        search="points",
        points=[{"train.lr": 3e-3}, {"train.lr": 1e-9}],
        asha={"enabled": True, "metric": "eval/accuracy", "mode": "max", "grace_period": 2, "eval_rows": 8},
    )
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"log_every": 5})})
    result = run_sweep(cfg)
    runs = []
    for trial in result.trials:
        metrics_file = Path(layout.run_dir(cfg.storage.path, trial["run_name"])) / layout.RUN_METRICS
        history = read_history(str(metrics_file))
        at = {int(row["step"]): row.get("eval/accuracy") for row in history}
        assert {2, 4} <= set(at) or trial["status"] == "stopped_early", at
        assert 0.0 <= at[2] <= 1.0, "a real value at the first rung"
        if 5 in at:
            assert at[5] == at[4], "reports between rungs carry the last value"
        runs.append((metrics_file.stat().st_mtime, trial, at))
    first, second = (r[1:] for r in sorted(runs, key=lambda r: r[0]))  # one trial at a time: the first ended first
    (_, a), (trial_b, b) = first, second
    cut = b[2] < a[2] or (4 in b and b[4] < a[4])
    assert (trial_b["status"] == "stopped_early") == cut, (a, b, trial_b["status"])
    assert first[0]["status"] == "completed"


def test_seeds_cross_every_point_and_compare_reports_paired_intervals(ray_cluster, mlflow_server, tmp_path):
    """2 modes x 2 seeds: one child per point x seed with its seed and point tag; compare --baseline
    writes a report with a Δ interval per arm, logged to the parent run."""
    import mlflow

    from orchestrator.compare import arms_table, compare
    from orchestrator.sweep import run_sweep

    cfg = _sweep_config(
        tmp_path / "store",
        mlflow_server,
        "sweep-seeds",
        parameters={"masking.mode": ["response", "l2t"]},
        seeds=[0, 1],
        max_concurrent_trials=2,
    )
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 4})})
    result = run_sweep(cfg)
    assert len(result.trials) == 4 and all(t["status"] == "completed" for t in result.trials)
    assert sorted((t["point"]["masking.mode"], t["point"]["train.seed"]) for t in result.trials) == [
        ("l2t", 0), ("l2t", 1), ("response", 0), ("response", 1)
    ]  # fmt: skip
    _, children = _children(mlflow_server, "sweep-seeds")
    assert len(children) == 4
    assert sorted(c.data.params["seed"] for c in children) == ["0", "0", "1", "1"]
    assert len({c.data.tags["l2t.point"] for c in children}) == 2
    # Seeds give the tiny preset its initial weights: the two seeds of one mode train different models.
    by_mode = {}
    for child in children:
        by_mode.setdefault(child.data.params["masking.mode"], []).append(child.data.metrics["train/loss"])
    assert all(len(set(losses)) == 2 for losses in by_mode.values())

    comparison = compare(result.name, tmp_path / "compare", experiment="sweep-seeds", baseline="mode=response",
                         replicates=200)  # fmt: skip
    assert comparison.baseline is not None and comparison.baseline.name == "mode=response"
    (l2t,) = [a for a in comparison.arms if a is not comparison.baseline]
    assert l2t.seeds == [0, 1]
    diff = l2t.versus_baseline["eval/accuracy"]
    assert diff.seeds == 2 and diff.questions == 20 and diff.low <= diff.difference <= diff.high
    assert arms_table(comparison) is not None
    report = (tmp_path / "compare" / "report.md").read_text()
    assert "mode=response" in report and "Δ" in report and "95%" in report
    page = (tmp_path / "compare" / "report.html").read_text()
    assert page.startswith("<!doctype html>") and "data:image/png;base64," in page
    client = mlflow.tracking.MlflowClient()
    logged = {a.path for a in client.list_artifacts(result.parent_run_id, "compare")}
    assert {"compare/report.md", "compare/report.html"} <= logged
