"""ASHA's rungs ranked by a held-out metric: the rung steps Ray uses, the check inside the real training loop
(plain process, DeepSpeed ZeRO-2, no Ray), and the refusals."""

import math

import pytest
from test_train_loop import _train, micro_rows  # noqa: F401  (the fixture)

from orchestrator.config import ConfigError
from orchestrator.early_stopping import rung_steps, training_eval_for
from workloads.training_eval import TrainingEval


@pytest.mark.parametrize(
    "grace, factor, max_t", [(20, 2.0, 301), (2, 2.0, 7), (3, 3.0, 100), (10, 1.5, 61), (50, 2.0, 51), (1, 4.0, 65)]
)
def test_rung_steps_are_the_milestones_of_rays_asha(grace, factor, max_t):
    from ray.tune.schedulers import ASHAScheduler

    scheduler = ASHAScheduler(
        metric="m", mode="max", time_attr="step", grace_period=grace, reduction_factor=factor, max_t=max_t
    )
    (bracket,) = scheduler._brackets
    milestones = sorted(m for m, _ in bracket._rungs)
    # ASHA records a trial at its first report at or past a milestone: the first integer step >= it
    want = sorted({math.ceil(m) for m in milestones if math.ceil(m) < max_t})
    assert rung_steps(grace, factor, max_t) == want


def _questions(synthetic_data, rows):
    from orchestrator.eval_inputs import load_question_file
    from orchestrator.evaluate import score_questions
    from workloads.config import EvalConfig

    questions = load_question_file(str(synthetic_data.eval_file), limit=rows)
    return score_questions(questions, EvalConfig(), str(synthetic_data.eval_file), synthetic=True)


def _check(synthetic_data, tiny_model_dir, steps, metric="eval/accuracy"):
    import dataclasses

    from transformers import AutoConfig

    from workloads.model import num_image_tokens
    from workloads.segments import EncodeSpec

    spec = EncodeSpec("vicuna_v1", num_image_tokens(AutoConfig.from_pretrained(tiny_model_dir)), 128)
    return TrainingEval(
        metric=metric,
        steps=steps,
        questions=_questions(synthetic_data, 16),
        spec_kwargs=dataclasses.asdict(spec),
        image_root=str(synthetic_data.image_root),
        batch_size=8,
    )


def test_rung_evaluation_inside_the_training_loop(synthetic_data, tiny_model_dir, micro_rows, tmp_path):  # noqa: F811
    """Reports at the rung steps even off `log_every`, the value carried to later reports, and the value at the
    last step equal to the standalone evaluation of the exported model on the same questions."""
    from workloads.evaluator import evaluate
    from workloads.segments import EncodeSpec
    from workloads.train_loop import MODEL_SUBDIR

    check = TrainingEval.from_config(_check(synthetic_data, tiny_model_dir, [2, 3]).to_config())
    reports = _train(tiny_model_dir, micro_rows, tmp_path, [], total_steps=3, log_every=5, lr=3e-3, training_eval=check)
    assert [int(m["step"]) for m, _ in reports] == [2, 3], "the rung step 2 is reported though log_every is 5"
    values = [m["eval/accuracy"] for m, _ in reports]
    assert all(0.0 <= v <= 1.0 for v in values)

    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    model_dir = reports[-1][1] / MODEL_SUBDIR
    metrics, _ = evaluate(
        AutoModelForImageTextToText.from_pretrained(model_dir),
        AutoTokenizer.from_pretrained(model_dir),
        AutoImageProcessor.from_pretrained(model_dir),
        check.questions,
        synthetic_data.image_root,
        EncodeSpec(**check.spec_kwargs),
        max_new_tokens=check.max_new_tokens,
        batch_size=8,
    )
    assert values[-1] == pytest.approx(metrics["accuracy"])


def test_an_unknown_held_out_metric_names_the_ones_there_are(synthetic_data, tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    check = _check(synthetic_data, tiny_model_dir, [1], metric="eval/acuracy")
    check.questions = check.questions[:4]
    with pytest.raises(ValueError, match=r"sweep.asha.metric='eval/acuracy'.*eval/accuracy"):
        check(AutoModelForImageTextToText.from_pretrained(tiny_model_dir), tiny_model_dir)


def _sweep_cfg(tmp_path, **overrides):
    from conftest import experiment_config

    cfg = experiment_config(
        tmp_path / "store",
        sweep={"asha": {"enabled": True, "metric": "eval/accuracy"}},
    )
    from orchestrator.config import with_overrides

    return with_overrides(cfg, overrides)


def test_held_out_rungs_are_refused_without_questions_or_with_zero3(tmp_path):
    cfg = _sweep_cfg(tmp_path, **{"data.eval_file": None})
    with pytest.raises(ConfigError, match="data.eval_file"):
        training_eval_for(cfg, None)
    cfg = _sweep_cfg(tmp_path, **{"data.eval_file": "eval.jsonl", "train.deepspeed": "configs/deepspeed/zero3.json"})
    with pytest.raises(ConfigError, match="ZeRO-3"):
        training_eval_for(cfg, None)
    assert training_eval_for(_sweep_cfg(tmp_path, **{"sweep.asha.metric": "loss_response"}), None) is None


def test_a_grace_period_past_the_last_step_is_refused_with_its_key(tmp_path):
    from orchestrator.early_stopping import asha_scheduler

    class Prepared:
        manifest = {"rows_written": 64}

    cfg = _sweep_cfg(tmp_path, **{"train.max_steps": 10, "sweep.asha.grace_period": 20})
    with pytest.raises(ConfigError, match=r"sweep.asha.grace_period=20 .* 10 optimizer steps"):
        asha_scheduler(cfg, Prepared())
