"""ASHA for `l2t sweep`: rungs in optimizer steps, ranked by a training metric or a held-out one.

Rungs are optimizer steps, not Tune reports: checkpoint reports and replays
after a restart add reports. `max_t` is one past the last step, so the final
and evaluation reports are never cut. With `sweep.asha.metric: eval/<metric>`
every trial answers the same first `sweep.asha.eval_rows` questions of
`data.eval_file` at exactly the rung steps (`workloads/training_eval.py`):
`rung_steps` mirrors the milestones of Ray's `_Bracket`
(grace_period x reduction_factor^k) so the check runs where ASHA reads it.
"""

from __future__ import annotations

import dataclasses
import math

from orchestrator.config import ConfigError, ExperimentConfig
from orchestrator.prepare import PreparedData
from orchestrator.train import load_deepspeed_config, total_steps
from workloads.training_eval import EVAL_PREFIX, TrainingEval


def asha_max_t(cfg: ExperimentConfig, prepared: PreparedData) -> int:
    """ASHA's `max_t`: one past a trial's last optimizer step."""
    return total_steps(cfg, prepared) + 1


def rung_steps(grace_period: int, reduction_factor: float, max_t: int) -> list[int]:
    """The optimizer steps at which ASHA compares trials: the first integer step at or past each milestone
    grace_period x reduction_factor^k that a trial reaches (steps below `max_t`)."""
    rungs = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1)
    milestones = (grace_period * reduction_factor**k for k in range(max(rungs, 0)))
    return sorted({math.ceil(m) for m in milestones if math.ceil(m) < max_t})


def asha_scheduler(cfg: ExperimentConfig, prepared: PreparedData):
    """Tune's scheduler of the sweep: ASHA over `sweep.asha`, else FIFO."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    asha = cfg.sweep.asha
    if not asha.enabled:
        return FIFOScheduler()
    max_t = asha_max_t(cfg, prepared)
    if asha.grace_period >= max_t:
        raise ConfigError(
            f"sweep.asha.grace_period={asha.grace_period} is past the trials' {max_t - 1} optimizer steps: "
            "lower it, or train longer"
        )
    return ASHAScheduler(
        metric=asha.metric,
        mode=asha.mode,
        time_attr="step",
        grace_period=asha.grace_period,
        reduction_factor=asha.reduction_factor,
        max_t=max_t,
    )


def training_eval_for(cfg: ExperimentConfig, prepared: PreparedData) -> TrainingEval | None:
    """The held-out check each trial runs at the rungs, or None when ASHA is off or ranks by a training metric.

    Refused with the key to change: no `data.eval_file`, or ZeRO-3 (rank 0 can't generate alone)."""
    from orchestrator.eval_inputs import load_question_file
    from orchestrator.evaluate import options_from_config, score_questions

    asha = cfg.sweep.asha
    if not (asha.enabled and asha.metric.startswith(EVAL_PREFIX)):
        return None
    if not cfg.data.eval_file:
        raise ConfigError(f"sweep.asha.metric={asha.metric!r} needs held-out questions: set data.eval_file")
    stage = int(load_deepspeed_config(cfg.train.deepspeed).get("zero_optimization", {}).get("stage", 0))
    if stage == 3:
        raise ConfigError(
            f"sweep.asha.metric={asha.metric!r}: rank 0 answers the rung questions alone, which ZeRO-3's partitioned "
            f"parameters don't allow ({cfg.train.deepspeed}); use a ZeRO-0/1/2 train.deepspeed or a training metric"
        )
    options = options_from_config(cfg)
    questions = load_question_file(cfg.data.eval_file, limit=asha.eval_rows)
    questions = score_questions(questions, options, cfg.data.eval_file, cfg.data.synthetic is not None)
    return TrainingEval(
        metric=asha.metric,
        steps=rung_steps(asha.grace_period, asha.reduction_factor, asha_max_t(cfg, prepared)),
        questions=questions,
        spec_kwargs=dataclasses.asdict(prepared.encode_spec()),
        image_root=cfg.data.image_root,
        null_image=options.null_image,
        max_new_tokens=options.max_new_tokens,
        batch_size=options.batch_size,
        seed=options.seed,
    )
