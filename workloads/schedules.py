"""λ schedules over optimizer steps, and the weight table of one step.

A λ (`masking.lambda_instruction`, `masking.lambda_response`) is the start value
of its schedule (`masking.schedule.<λ>`). At optimizer step k (0-based: the steps
already taken) of `total` steps:

- warm-up, k < warmup_steps: λ = start · (k + 1) / warmup_steps;
- after it, with progress p = (k − warmup_steps) / max(1, total − warmup_steps − 1) clipped to [0, 1]:
  `constant`: start; `linear`: start + (end − start) · p; `cosine`: end + (start − end) · (1 + cos πp) / 2,
  so the last step has λ = end (`end` unset: start).

The training loop builds each step's table from here (8 entries, cheap); the mask
displays show step 0.
"""

from __future__ import annotations

import math

import numpy as np

from workloads.masking_config import LambdaSchedule, MaskingConfig
from workloads.segment_codes import segment_weight_table


def lambda_at(schedule: LambdaSchedule, start: float, step: int, total_steps: int) -> float:
    """The scheduled λ at optimizer step `step` (0-based) of `total_steps` (see the module docstring)."""
    if step < schedule.warmup_steps:
        return start * (step + 1) / schedule.warmup_steps
    end = start if schedule.end is None else schedule.end
    if schedule.kind == "constant" or end == start:
        return start
    progress = (step - schedule.warmup_steps) / max(1, total_steps - schedule.warmup_steps - 1)
    progress = min(max(progress, 0.0), 1.0)
    if schedule.kind == "linear":
        return start + (end - start) * progress
    if schedule.kind == "cosine":
        return end + (start - end) * (1.0 + math.cos(math.pi * progress)) / 2.0
    raise ValueError(f"unknown λ schedule kind {schedule.kind!r}")


def scheduled_lambdas(masking: MaskingConfig, step: int, total_steps: int) -> tuple[float, float]:
    """(λ_I, λ_A) at optimizer step `step` of `total_steps`."""
    return (
        lambda_at(masking.schedule.lambda_instruction, masking.lambda_instruction, step, total_steps),
        lambda_at(masking.schedule.lambda_response, masking.lambda_response, step, total_steps),
    )


def masking_weight_table(masking: MaskingConfig, step: int = 0, total_steps: int = 1) -> np.ndarray:
    """`table[segment_code] -> weight` at one step: the mode's table with the scheduled λ, then the overrides."""
    lambda_instruction, lambda_response = scheduled_lambdas(masking, step, total_steps)
    return segment_weight_table(masking.mode, lambda_instruction, lambda_response, masking.weights.model_dump())
