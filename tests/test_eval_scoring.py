"""Which rule scores each question (named per suite, chosen by the file or the config), and CHAIR's names."""

from __future__ import annotations

import json

import pytest

from orchestrator.config import EvalConfig
from orchestrator.eval_inputs import load_question_file
from orchestrator.evaluate import _with_rules, score_questions
from workloads.eval_questions import normalize_question
from workloads.eval_summary import SampleResult, resolve_scoring, score_prediction, scoring_rules, summarize

MC = normalize_question(
    {
        "question_id": "mc",
        "image": "a.png",
        "text": "Which color?\nA. red\nB. green\nC. blue",
        "choices": ["red", "green", "blue"],
        "answer": "B",
    }
)
SHORT = normalize_question({"question_id": "q", "image": "a.png", "text": "What is it?", "answer": "table"})


def test_published_defaults_per_suite_kind():
    vqa, mc = resolve_scoring([SHORT, MC], suite="/data/llava_vqav2_mscoco_test-dev2015.jsonl")
    assert (vqa["answer_rule"], mc["choice_parser"]) == ("vqa", "llava")
    (gqa,) = resolve_scoring([SHORT], suite="s3://bucket/llava_gqa_testdev_balanced.jsonl")
    assert gqa["answer_rule"] == "gqa"
    (by_kind,) = resolve_scoring([{**SHORT, "kind": "gqa"}], suite="questions.jsonl")
    assert by_kind["answer_rule"] == "gqa"
    # l2t's own synthetic suite keeps the lenient parser.
    assert resolve_scoring([MC], suite="synthetic", synthetic=True)[0]["choice_parser"] == "lenient"


def test_rule_precedence_config_then_row_then_file_then_default():
    row = {**SHORT, "answer_rule": "exact"}
    assert resolve_scoring([row])[0]["answer_rule"] == "exact"
    assert resolve_scoring([SHORT], file_settings={"answer_rule": "gqa"})[0]["answer_rule"] == "gqa"
    assert resolve_scoring([row], file_settings={"answer_rule": "gqa"})[0]["answer_rule"] == "exact"
    assert resolve_scoring([row], answer_rule="vqa")[0]["answer_rule"] == "vqa"
    assert resolve_scoring([MC], choice_parser="lenient")[0]["choice_parser"] == "lenient"
    with pytest.raises(ValueError, match="answer_rule"):
        resolve_scoring([{**SHORT, "answer_rule": "fuzzy"}])


def test_the_row_rule_decides_the_score():
    llava, lenient = resolve_scoring([MC]), resolve_scoring([MC], choice_parser="lenient")
    assert score_prediction(llava[0], "B") == score_prediction(lenient[0], "B") == 1.0
    assert score_prediction(llava[0], "B.") == 0.0 and score_prediction(lenient[0], "B.") == 1.0
    assert score_prediction(llava[0], "Green.") == 0.0 and score_prediction(lenient[0], "Green.") == 1.0
    gqa = resolve_scoring([SHORT], answer_rule="gqa")[0]
    assert score_prediction(gqa, "The table.") == 0.0 and score_prediction(SHORT, "The table.") == 1.0
    assert scoring_rules(llava + [gqa]) == {"multiple_choice": "llava", "vqa": "gqa"}


def test_question_files_name_their_rules(tmp_path):
    rows = [
        {"question_id": 1, "text": "What?", "answer": "x", "rule": "exact"},
        {"question_id": 2, "text": "What?", "answer": "x", "answer_rule": "gqa"},
        {"question_id": 3, "text": "Which?", "choices": ["a", "b"], "answer": "A", "choice_parser": "lenient"},
        {"question_id": 4, "text": "What?", "answer": "x"},
    ]
    jsonl = tmp_path / "mixed.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    questions = score_questions(load_question_file(str(jsonl)), EvalConfig(), str(jsonl))
    assert [q["answer_rule"] for q in questions] == ["exact", "gqa", "vqa", "vqa"]
    assert questions[2]["choice_parser"] == "lenient"
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps({"answer_rule": "gqa", "choice_parser": "lenient", "questions": rows[3:]}))
    (q,) = score_questions(load_question_file(str(suite)), EvalConfig(), str(suite))
    assert (q["answer_rule"], q["choice_parser"]) == ("gqa", "lenient")
    (q,) = score_questions(load_question_file(str(suite)), EvalConfig(answer_rule="exact"), str(suite))
    assert q["answer_rule"] == "exact"  # the config wins
    assert load_question_file(str(jsonl), limit=2)[1]["answer_rule"] == "gqa"
    rows_out = _with_rules([{"correct": 1.0}, {"correct": None}], [questions[0], questions[1]])
    assert [r["rule"] for r in rows_out] == ["exact", None]


def _caption(prediction, objects, references):
    return SampleResult(
        question_id=prediction,
        kind="caption",
        question="Describe the image.",
        answer=references[0],
        prediction=prediction,
        correct=None,
        logp_with_image=None,
        logp_null_image=None,
        vc_sum=None,
        vc_mean=None,
        response_tokens=0,
        references=references,
        objects=objects,
    )


def test_caption_suites_get_cocos_chair_and_synthetic_ones_their_own():
    coco = [
        _caption("Two men eat hot dogs next to a teddy bear.", ["person", "hot dog"], ["Men eating hot dogs."]),
        _caption("A cat on a sofa.", ["cat", "couch"], ["A cat sleeping on a couch."]),
    ]
    metrics = summarize(coco)
    # 5 mentions (person, hot dog, teddy bear, cat, couch), 1 hallucinated; 1 of 2 captions.
    assert metrics["chair_coco_i"] == pytest.approx(1 / 5) and metrics["chair_coco_s"] == 0.5
    assert metrics["chair_i"] == metrics["chair_coco_i"] and metrics["chair_s"] == metrics["chair_coco_s"]
    assert metrics["caption_mentions_coco"] == 2.5
    assert "chair_coco_i" not in summarize(coco, coco_chair=False)
    synthetic = [_caption("A red circle and a blue square.", ["red circle"], ["A red circle."])]
    metrics = summarize(synthetic)
    assert metrics["chair_i"] == 0.5 and "chair_coco_i" not in metrics  # the synthetic vocabulary
    both = summarize(synthetic, coco_chair=True)
    assert both["chair_i"] == 0.5 and both["chair_coco_i"] == 0.0  # no COCO object is mentioned


def test_eval_flags_choose_the_rules():
    from orchestrator.cli.eval_command import resolve_options
    from orchestrator.config import ConfigError

    options = resolve_options(None, answer_rule="gqa", choice_parser="lenient", lmms_eval_tasks=["mme"])
    assert (options.answer_rule, options.choice_parser, options.lmms_eval_tasks) == ("gqa", "lenient", ["mme"])
    assert resolve_options(None).answer_rule == "auto"
    with pytest.raises(ConfigError, match="--answer-rule"):
        resolve_options(None, answer_rule="fuzzy")
    with pytest.raises(ConfigError, match="--lmms-limit"):
        resolve_options(None, lmms_eval_limit=0)
