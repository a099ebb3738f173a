"""lmms-eval as a backend: task names, result collection, the missing-extra error, and (when lmms-eval is
installed) a local lmms-eval task run on Ray with the tiny model, answered exactly as l2t's own suite."""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
from pathlib import Path

import pytest

from orchestrator.config import EvalConfig
from orchestrator.lmms_eval import (
    INSTALL_HINT,
    LmmsEvalUnavailable,
    flatten_results,
    merged_metrics,
    parse_tasks,
    require_lmms_eval,
    task_dir,
)

HAS_LMMS = importlib.util.find_spec("lmms_eval") is not None


def _cli():
    from orchestrator.cli import app

    return app


def test_task_names_are_comma_separated_and_repeatable():
    assert parse_tasks(["mme,pope", "textvqa_val", " pope "]) == ["mme", "pope", "textvqa_val"]
    assert parse_tasks("scienceqa_img") == ["scienceqa_img"] and parse_tasks(None) == []
    assert EvalConfig(lmms_eval_tasks=["mme"]).lmms_eval_tasks == ["mme"]
    assert task_dir("/out", "a/b") == "/out/lmms_eval/a_b"


def test_results_become_mlflow_metric_names():
    results = {
        "results": {
            "local_vqa": {
                "alias": "local_vqa",
                "exact_match,none": 0.25,
                "exact_match_stderr,none": "N/A",
                "anls,flexible": 0.5,
                "submission,none": None,
            },
            "mme_cognition": {"mme_cognition_score,none": 310.5, "broken,none": float("nan")},
        }
    }
    metrics = flatten_results("local_vqa", results)
    assert metrics == {
        "lmms/local_vqa/exact_match": 0.25,
        "lmms/local_vqa/anls_flexible": 0.5,
        "lmms/mme_cognition/mme_cognition_score": 310.5,
    }
    assert merged_metrics({"local_vqa": metrics, "x": {"lmms/x/y": 1.0}})["lmms/x/y"] == 1.0
    with pytest.raises(ValueError, match="no numeric metric"):
        flatten_results("empty", {"results": {"empty": {"alias": "empty"}}})


def test_a_missing_extra_is_a_clear_error(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # what `import lmms_eval` sees without the extra
    monkeypatch.setitem(sys.modules, "lmms_eval.evaluator", None)
    with pytest.raises(LmmsEvalUnavailable, match=r"pip install 'l2t-orchestrator\[lmms\]'"):
        require_lmms_eval()
    result = CliRunner().invoke(
        _cli(), ["eval", str(tmp_path / "model"), "--lmms-eval", "mme", "--output", str(tmp_path / "out")]
    )
    assert result.exit_code == 2 and "lmms-eval is not installed" in result.output, result.output
    assert not (tmp_path / "out").exists()  # refused before any suite ran
    assert INSTALL_HINT.startswith("lmms-eval is not installed")


def _local_task(folder: Path, questions: list[dict], image_root: str) -> None:
    """An offline lmms-eval task: a JSON-lines data file, a YAML and its utils.py, all in `folder`."""
    rows = [{"id": q["question_id"], "image": str(Path(image_root, q["image"])), "question": q["text"],
             "answer": q["answer"]} for q in questions]  # fmt: skip
    (folder / "l2t_local.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "utils.py").write_text(
        textwrap.dedent(
            """
            from PIL import Image


            def doc_to_visual(doc):
                return [Image.open(doc["image"]).convert("RGB")]


            def doc_to_text(doc, lmms_eval_specific_kwargs=None):
                return doc["question"]


            def process_results(doc, results):
                return {"match": float(results[0].strip().lower() == doc["answer"].strip().lower())}
            """
        )
    )
    (folder / "l2t_local.yaml").write_text(
        textwrap.dedent(
            f"""
            task: l2t_local
            dataset_path: json
            dataset_kwargs:
              data_files:
                test: {folder / "l2t_local.jsonl"}
            test_split: test
            output_type: generate_until
            doc_to_visual: !function utils.doc_to_visual
            doc_to_text: !function utils.doc_to_text
            doc_to_target: answer
            generation_kwargs:
              max_new_tokens: 5
              until: ["<never>"]
            process_results: !function utils.process_results
            metric_list:
              - metric: match
                aggregation: mean
                higher_is_better: true
            metadata:
              version: 0.0
            """
        )
    )


@pytest.mark.ray
@pytest.mark.skipif(not HAS_LMMS, reason="lmms-eval (the lmms extra) is not installed")
def test_l2t_eval_runs_a_local_lmms_eval_task_on_ray(
    ray_cluster, tiny_model_dir, synthetic_data, tmp_path, monkeypatch
):
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here: the task's data is local
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    lines = Path(synthetic_data.eval_file).read_text().splitlines()[:6]
    suite = tmp_path / "questions.jsonl"
    suite.write_text("".join(line + "\n" for line in lines))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _local_task(tasks, [json.loads(line) for line in lines], str(synthetic_data.image_root))
    out = tmp_path / "out"
    args = ["eval", tiny_model_dir, "--suite", str(suite), "--image-root", str(synthetic_data.image_root)]
    args += ["--lmms-eval", "l2t_local", "--lmms-include-path", str(tasks), "--output", str(out), "--cpu"]
    args += ["--chat-template", "vicuna_v1", "--max-new-tokens", "5", "--batch-size", "1"]
    result = CliRunner().invoke(_cli(), args, terminal_width=200)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "lmms match" in result.output

    lmms_rows = [
        json.loads(line) for line in (out / "lmms_eval" / "l2t_local" / "samples.jsonl").read_text().splitlines()
    ]
    l2t_rows = [json.loads(line) for line in (out / "questions" / "samples.jsonl").read_text().splitlines()]
    assert len(lmms_rows) == len(l2t_rows) == 6
    # The same prompts through the same model: lmms-eval's answers are l2t's.
    by_doc = {r["doc_id"]: r for r in lmms_rows}
    assert [by_doc[i]["prediction"] for i in range(6)] == [r["prediction"] for r in l2t_rows]
    results = json.loads((out / "lmms_eval" / "l2t_local" / "results.json").read_text())
    match = results["l2t_metrics"]["lmms/l2t_local/match"]
    expected = sum(r["prediction"].strip().lower() == r["answer"].strip().lower() for r in l2t_rows) / 6
    assert match == pytest.approx(expected)
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["suites"]["lmms:l2t_local"] == {"match": match} and "questions" in summary["suites"]

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("l2t-eval").experiment_id])
    assert run.data.metrics["lmms/l2t_local/match"] == pytest.approx(match)
    assert "questions/eval_samples" in run.data.metrics and run.data.tags["l2t.kind"] == "eval"


def _prepared(folder: Path):
    """A prepared-data folder as training leaves it, as far as evaluation reads it."""
    from orchestrator.prepare import PreparedData
    from workloads.task_templates import TaskTemplateList

    TaskTemplateList.from_sentences(["Answer the question using a single word or phrase."]).save(
        folder / "task_templates.json"
    )
    manifest = {"encode_spec": {"template": "vicuna_v1", "num_image_tokens": 17, "max_length": 128}}
    return PreparedData(path=str(folder), manifest=manifest)


def test_an_experiment_config_names_lmms_eval_tasks_for_each_trial(tmp_path, monkeypatch):
    from conftest import experiment_config

    from orchestrator.evaluate import evaluate_model

    cfg = experiment_config(tmp_path, eval={"lmms_eval_tasks": ["mme", "pope"], "lmms_eval_limit": 8})
    assert cfg.eval.lmms_eval_tasks == ["mme", "pope"] and cfg.flat()["eval.lmms_eval_limit"] == 8
    monkeypatch.setitem(sys.modules, "lmms_eval", None)
    monkeypatch.setitem(sys.modules, "lmms_eval.evaluator", None)
    with pytest.raises(LmmsEvalUnavailable):  # before the held-out evaluation starts
        evaluate_model(cfg, str(tmp_path / "model"), _prepared(tmp_path), str(tmp_path / "run" / "eval.jsonl"))


@pytest.mark.ray
@pytest.mark.skipif(not HAS_LMMS, reason="lmms-eval (the lmms extra) is not installed")
def test_evaluate_model_adds_lmms_metrics(ray_cluster, tiny_model_dir, synthetic_data, tmp_path):
    from conftest import experiment_config

    from orchestrator.evaluate import evaluate_model

    lines = Path(synthetic_data.eval_file).read_text().splitlines()[:4]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _local_task(tasks, [json.loads(line) for line in lines], str(synthetic_data.image_root))
    data = {"synthetic": None, "sources": [str(synthetic_data.train_file)], "eval_file": str(synthetic_data.eval_file)}
    data["image_root"] = str(synthetic_data.image_root)
    lmms = {"lmms_eval_tasks": ["l2t_local"], "lmms_eval_include_path": str(tasks), "use_gpu": False}
    cfg = experiment_config(tmp_path, data=data, eval={"max_rows": 4, "batch_size": 4, "max_new_tokens": 4, **lmms})
    metrics = evaluate_model(cfg, tiny_model_dir, _prepared(tmp_path), str(tmp_path / "run" / "eval.jsonl"))
    assert metrics["eval_samples"] == 4 and 0.0 <= metrics["lmms/l2t_local/match"] <= 1.0
    assert (tmp_path / "run" / "lmms_eval" / "l2t_local" / "results.json").exists()
