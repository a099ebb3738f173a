"""λ schedules: the value at given optimizer steps, and the weight table each step trains with."""

import math

import numpy as np
import pytest

from workloads.masking_config import LambdaSchedule, MaskingConfig
from workloads.schedules import lambda_at, masking_weight_table, scheduled_lambdas
from workloads.segment_codes import Segment, segment_weight_table


def _values(schedule, start, total, steps=None):
    return [lambda_at(schedule, start, k, total) for k in (range(total) if steps is None else steps)]


def test_constant_is_the_start_value_whatever_end_says():
    assert _values(LambdaSchedule(), 0.7, 4) == [0.7] * 4
    assert _values(LambdaSchedule(kind="constant", end=0.0), 0.7, 4) == [0.7] * 4


def test_warmup_ramps_from_zero_then_the_schedule_starts():
    # warm-up: start * (k + 1) / warmup_steps for k < warmup_steps, whatever the kind
    assert _values(LambdaSchedule(warmup_steps=4), 2.0, 6) == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    # linear after a 2-step warm-up over 6 steps: p = (k - 2) / (6 - 2 - 1) = 0, 1/3, 2/3, 1
    linear = LambdaSchedule(kind="linear", end=0.0, warmup_steps=2)
    assert _values(linear, 3.0, 6) == pytest.approx([1.5, 3.0, 3.0, 2.0, 1.0, 0.0])


def test_linear_reaches_end_at_the_last_step_and_stays():
    schedule = LambdaSchedule(kind="linear", end=0.0)
    # p = k / (5 - 1): 1, 0.75, 0.5, 0.25, 0 at the last step; clipped past it
    assert _values(schedule, 1.0, 5, steps=[0, 1, 2, 3, 4, 9]) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0, 0.0])
    rising = LambdaSchedule(kind="linear", end=2.0)
    assert _values(rising, 0.5, 4) == pytest.approx([0.5, 1.0, 1.5, 2.0])


def test_cosine():
    schedule = LambdaSchedule(kind="cosine", end=0.0)
    want = [1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2, 0.0]
    assert _values(schedule, 1.0, 5) == pytest.approx(want)
    # end + (start - end) * (1 + cos(pi p)) / 2 with start 0.2, end 1.0 over 3 steps: p = 0, 0.5, 1
    assert _values(LambdaSchedule(kind="cosine", end=1.0), 0.2, 3) == pytest.approx([0.2, 0.6, 1.0])


def test_unset_end_means_no_change_and_one_step_runs_start():
    for kind in ("linear", "cosine"):
        assert _values(LambdaSchedule(kind=kind), 0.3, 5) == [0.3] * 5
        assert _values(LambdaSchedule(kind=kind, end=0.0), 0.3, 1) == [0.3]


def test_the_step_table_applies_both_schedules_then_the_overrides():
    masking = MaskingConfig.model_validate(
        {
            "mode": "l2t_full",
            "lambda_instruction": 1.0,
            "lambda_response": 2.0,
            "weights": {"system": 0.25},
            "schedule": {
                "lambda_instruction": {"kind": "linear", "end": 0.0},
                "lambda_response": {"warmup_steps": 2},
            },
        }
    )
    assert [scheduled_lambdas(masking, k, 3) for k in range(3)] == [(1.0, 1.0), (0.5, 2.0), (0.0, 2.0)]
    last = masking_weight_table(masking, 2, 3)
    assert last[Segment.SYSTEM] == np.float32(0.25)  # absolute, not scheduled
    assert last[Segment.ROLE] == last[Segment.INSTRUCTION] == last[Segment.TASK_TEMPLATE] == 0.0
    assert last[Segment.RESPONSE] == last[Segment.END_OF_TURN] == 2.0
    assert last[Segment.IMAGE] == last[Segment.PAD] == 0.0
    first = masking_weight_table(masking, 0, 3)
    want = segment_weight_table("l2t_full", 1.0, 1.0, {"system": 0.25})
    assert np.array_equal(first, want)
    # defaults: the configured λ at every step
    plain = MaskingConfig(lambda_instruction=0.5, lambda_response=1.5)
    for k in (0, 7, 99):
        assert np.array_equal(masking_weight_table(plain, k, 100), segment_weight_table("l2t", 0.5, 1.5))
