"""Batch inference on Ray Data: a pool of model actors, per-sample files, the same numbers as in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import experiment_config

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def question_file(synthetic_data, tmp_path_factory):
    """A LLaVA-style question file mixing the formats real suites use, over the synthetic images."""
    rows = [json.loads(line) for line in Path(synthetic_data.eval_file).read_text().splitlines()[:20]]
    image = rows[0]["image"]
    rows += [
        {
            "question_id": "vqav2",
            "image": image,
            "text": "What color is the shape?\nAnswer the question using a single word or phrase.",
            "answers": [{"answer": a} for a in ["red"] * 6 + ["orange"] * 4],
        },
        {
            "question_id": "pope",
            "image": image,
            "text": "Is there a red circle in the image?",
            "label": "yes",
            "category": "random",
        },
        {
            "question_id": "mc",
            "image": image,
            "text": "What shape is it?\nA. circle\nB. square\n"
            "Answer with the option's letter from the given choices directly.",
            "choices": ["circle", "square"],
            "answer": "A",
        },
        {"question_id": "unanswered", "image": image, "text": "What color is the shape?"},
    ]
    path = tmp_path_factory.mktemp("questions") / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cli():
    from orchestrator.cli import app

    return app


def test_l2t_eval_on_ray_data_matches_the_in_process_evaluator(
    ray_cluster, tiny_model_dir, synthetic_data, question_file, tmp_path
):
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer
    from typer.testing import CliRunner

    from orchestrator.evaluate import load_question_file
    from workloads.evaluator import evaluate
    from workloads.segments import EncodeSpec

    out = tmp_path / "out"
    result = CliRunner().invoke(
        _cli(),
        [
            "eval",
            tiny_model_dir,
            "--suite",
            str(question_file),
            "--suite",
            "synthetic",
            "--output",
            str(out),
            "--image-root",
            str(synthetic_data.image_root),
            "--chat-template",
            "vicuna_v1",
            "--synthetic-rows",
            "12",
            "--batch-size",
            "6",
            "--concurrency",
            "2",
            "--max-new-tokens",
            "5",
        ],
        terminal_width=200,
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "VC / token" in result.output and "mixed" in result.output and "synthetic" in result.output
    questions = load_question_file(str(question_file))
    lines = [json.loads(line) for line in (out / "mixed" / "samples.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in lines] == [q["question_id"] for q in questions], (
        "one row per question, in file order"
    )
    table = pq.read_table(out / "mixed" / "samples.parquet").to_pylist()
    assert [r["question_id"] for r in table] == [r["question_id"] for r in lines]
    assert [r["vc_sum"] for r in table] == [r["vc_sum"] for r in lines]
    by_id = {r["question_id"]: r for r in lines}
    assert len(by_id["vqav2"]["references"]) == 10 and by_id["vqav2"]["answer"] == "red"
    assert by_id["pope"]["kind"] == "pope" and by_id["pope"]["category"] == "random"
    assert by_id["mc"]["kind"] == "multiple_choice" and by_id["mc"]["choices"] == ["circle", "square"]
    assert by_id["unanswered"]["vc_sum"] is None and by_id["unanswered"]["correct"] is None
    mixed = json.loads((out / "mixed" / "metrics.json").read_text())["metrics"]
    assert mixed["eval_samples"] == len(questions)
    assert {"accuracy", "accuracy_multiple_choice", "pope_f1", "vc_mean", "caption_cider", "caption_bleu4"} <= set(
        mixed
    )

    missing = CliRunner().invoke(
        _cli(), ["eval", tiny_model_dir, "--suite", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "x")]
    )
    assert missing.exit_code == 2 and "neither 'synthetic' nor an existing question file" in missing.output

    summary = json.loads((out / "metrics.json").read_text())
    assert set(summary["suites"]) == {"mixed", "synthetic"}
    synthetic = json.loads((out / "synthetic" / "metrics.json").read_text())
    assert synthetic["questions"] == 12 and synthetic["spec"]["template"] == "vicuna_v1"
    assert synthetic["metrics"]["eval_samples"] == 12 and "vc_mean" in synthetic["metrics"]
    synthetic_rows = [json.loads(line) for line in (out / "synthetic" / "samples.jsonl").read_text().splitlines()]
    if any(r["kind"] == "caption" for r in synthetic_rows):
        assert {"chair_i", "chair_i_shape", "caption_cider"} <= set(synthetic["metrics"])

    # The same questions in one process, in one batch: the same teacher-forced numbers.
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    spec = EncodeSpec("vicuna_v1", 17, 128)
    _, samples = evaluate(
        model,
        AutoTokenizer.from_pretrained(tiny_model_dir),
        AutoImageProcessor.from_pretrained(tiny_model_dir),
        questions,
        synthetic_data.image_root,
        spec,
        batch_size=len(questions),
        max_new_tokens=5,
    )
    for sample, row in zip(samples, lines):
        assert sample.question_id == row["question_id"]
        if sample.vc_sum is None:
            assert row["vc_sum"] is None
        else:
            assert row["vc_sum"] == pytest.approx(sample.vc_sum, abs=1e-4)
            assert row["logp_with_image"] == pytest.approx(sample.logp_with_image, abs=1e-4)


def test_evaluate_model_is_a_drop_in_for_the_pipeline(ray_cluster, tiny_model_dir, synthetic_data, tmp_path):
    from orchestrator.evaluate import evaluate_model
    from orchestrator.prepare import PreparedData
    from workloads.task_templates import TaskTemplateList

    prepared_dir = tmp_path / "prepared"
    prepared_dir.mkdir()
    TaskTemplateList.from_sentences(["Answer the question using a single word or phrase."]).save(
        prepared_dir / "task_templates.json"
    )
    manifest = {"encode_spec": {"template": "vicuna_v1", "num_image_tokens": 17, "max_length": 128}}
    prepared = PreparedData(path=str(prepared_dir), manifest=manifest)
    cfg = experiment_config(
        tmp_path,
        data={
            "synthetic": None,
            "sources": [str(synthetic_data.train_file)],
            "image_root": str(synthetic_data.image_root),
            "eval_file": str(synthetic_data.eval_file),
        },
        eval={"max_rows": 16, "batch_size": 8, "max_new_tokens": 4},
    )
    out_file = str(tmp_path / "run" / "eval_samples.jsonl")
    metrics = evaluate_model(cfg, tiny_model_dir, prepared, out_file)
    assert metrics["eval_samples"] == 16 and {"accuracy", "vc_mean", "vc_sum"} <= set(metrics)
    samples = [json.loads(line) for line in Path(out_file).read_text().splitlines()]
    assert len(samples) == 16 and {"prediction", "vc_sum", "correct"} <= set(samples[0])
    assert pq.read_table(tmp_path / "run" / "eval_samples.parquet").num_rows == 16
    assert json.loads((tmp_path / "run" / "eval_samples.metrics.json").read_text())["metrics"] == metrics
