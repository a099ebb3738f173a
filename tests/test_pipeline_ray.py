"""The chain on a real local Ray cluster: Ray Data preparation, Ray Train + DeepSpeed, evaluation, MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import experiment_config
from typer.testing import CliRunner

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def dirty_source(synthetic_data, tmp_path_factory):
    """The synthetic training rows plus one bad row of each kind."""
    out = tmp_path_factory.mktemp("dirty")
    good = Path(synthetic_data.train_file).read_text().splitlines()[:200]
    image_root = Path(synthetic_data.image_root)
    (image_root / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")

    def row(row_id, image, turns):
        return json.dumps({"id": row_id, "image": image, "conversations": [{"from": f, "value": v} for f, v in turns]})

    ok_image = json.loads(good[0])["image"]
    question = ("human", "<image>\nWhat color is the shape?")
    bad = [
        '{"id": "malformed", "conversations": [',
        row("missing", "images/does-not-exist.png", [question, ("gpt", "Red")]),
        row("escape", "../../etc/passwd", [question, ("gpt", "Red")]),
        row("absolute", "/etc/passwd", [question, ("gpt", "Red")]),
        row("corrupt", "images/corrupt.png", [question, ("gpt", "Red")]),
        row("order", ok_image, [("gpt", "Red"), question]),
        row("empty", ok_image, []),
        row("too-long", ok_image, [("human", "<image>\n" + "Tell me about the shape. " * 80), ("gpt", "Red")]),
    ]
    path = out / "train.jsonl"
    path.write_text("\n".join(good[:100] + bad + good[100:]) + "\n")
    return path, image_root


def _dirty_config(storage, dirty_source, **data):
    path, image_root = dirty_source
    cfg = experiment_config(
        storage,
        data={
            "sources": [str(path)],
            "image_root": str(image_root),
            "synthetic": None,
            "max_bad_fraction": 0.1,
            **data,
        },
    )
    return cfg


def test_prepare_quarantines_each_bad_row_and_keeps_every_good_one(ray_cluster, dirty_source, tiny_model_dir, tmp_path):
    from orchestrator.prepare import PrepareError, prepare

    cfg = _dirty_config(tmp_path, dirty_source)
    prepared = prepare(cfg, tiny_model_dir)
    m = prepared.manifest
    assert m["rows_in"] == 208
    assert m["rows_written"] == 200
    assert m["rows_quarantined"] == 8
    assert m["rows_in"] == m["rows_written"] + m["rows_quarantined"]
    assert m["quarantined_by_reason"] == {
        "corrupt_image": 1,
        "empty_conversation": 1,
        "image_outside_root": 2,
        "malformed_json": 1,
        "missing_image": 1,
        "no_trained_tokens": 1,
        "wrong_role_order": 1,
    }
    quarantine = pq.read_table(prepared.quarantine).to_pylist()
    assert {r["id"] for r in quarantine} >= {"missing", "escape", "absolute", "corrupt", "order", "empty", "too-long"}
    assert all(r["reason"] and r["message"] and r["raw"] for r in quarantine)
    shards = pq.read_table(prepared.shards)
    assert shards.num_rows == 200
    assert set(shards.column_names) >= {"id", "input_ids", "segments", "images", "length"}
    assert m["tokens_by_segment"]["response"] > 0 and m["tokens_by_segment"]["image"] == 200 * m["num_image_tokens"]
    assert m["task_templates"] >= 1
    templates = json.loads(Path(prepared.task_templates_file).read_text())
    assert templates["entries"][0]["sentence"] == "Answer the question using a single word or phrase."

    # Same inputs: a no-op that returns the same folder untouched.
    manifest_file = Path(prepared.path, "manifest.json")
    before = manifest_file.stat().st_mtime_ns
    again = prepare(cfg, tiny_model_dir)
    assert again.path == prepared.path and manifest_file.stat().st_mtime_ns == before

    # Above the bad-row limit the run fails, naming the counts and the quarantine.
    strict = _dirty_config(tmp_path, dirty_source, max_bad_fraction=0.01)
    with pytest.raises(PrepareError) as error:
        prepare(strict, tiny_model_dir)
    assert "8 of 208 rows" in str(error.value) and "quarantine" in str(error.value)

    result = CliRunner().invoke(__import__("orchestrator.cli", fromlist=["app"]).app, ["data", "stats", prepared.path])
    assert result.exit_code == 0 and "rows_quarantined" in result.output


@pytest.fixture(scope="module")
def trained(ray_cluster, tmp_path_factory):
    """One real fit for the module: Ray Data -> Ray Train (2 workers, DeepSpeed ZeRO-2) -> eval -> MLflow."""
    from orchestrator.experiment import run_experiment

    storage = tmp_path_factory.mktemp("e2e")
    cfg = experiment_config(
        storage, train={"max_steps": 12, "log_every": 4}, masking={"mode": "l2t", "lambda_instruction": 0.5}
    )
    return cfg, run_experiment(cfg, run_name="e2e-l2t")


def test_end_to_end_run_trains_evaluates_and_tracks(trained):
    import mlflow
    from transformers import AutoModelForImageTextToText

    from orchestrator.tracking import tracking_uri

    cfg, result = trained
    steps = [row["step"] for row in result.train.history]
    assert steps == [4, 8, 12], "the curve holds every reported step, the final one included"
    assert result.train.history[-1]["loss"] < result.train.history[0]["loss"] * 1.5
    assert result.eval_metrics["eval_samples"] == 40
    assert {"accuracy", "vc_mean", "vc_sum", "accuracy_color"} <= set(result.eval_metrics)
    AutoModelForImageTextToText.from_pretrained(result.train.model_dir)

    mlflow.set_tracking_uri(tracking_uri(cfg))
    (run,) = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list")
    assert run.data.params["masking.mode"] == "l2t"
    assert run.data.params["masking.lambda_instruction"] == "0.5"
    assert run.data.params["prepared.key"] == result.prepared.manifest["key"]
    assert "eval/accuracy" in run.data.metrics and "eval/vc_mean" in run.data.metrics
    history = mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [4, 8, 12]
    samples = [json.loads(line) for line in Path(result.eval_samples_file).read_text().splitlines()]
    assert len(samples) == 40 and {"prediction", "vc_sum", "correct"} <= set(samples[0])


def test_unreachable_tracking_server_fails_before_training(ray_cluster, tmp_path):
    from orchestrator.experiment import run_experiment
    from orchestrator.tracking import TrackingError

    cfg = experiment_config(tmp_path, tracking={"uri": "http://127.0.0.1:9"})
    with pytest.raises(TrackingError, match="unreachable"):
        run_experiment(cfg)
    assert not (tmp_path / "runs").exists()
