"""The masking section of the experiment schema: the ladder of modes, λ, per-segment weights,
normalization, λ schedules and task-template selection (re-exported by `workloads.config`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from workloads.segment_codes import MASKING_MODES, RENAMED_MODES

NORMALIZATIONS = ("tokens", "weight", "per_part")
"""How a step's weighted token losses are divided (see `MaskingConfig.normalize`)."""
SCHEDULE_KINDS = ("constant", "linear", "cosine")
"""Shapes of a λ schedule over training steps."""
MaskingMode = Literal[MASKING_MODES]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


class TaskTemplateConfig(_Strict):
    """How frequent instruction sentences (task templates) are chosen."""

    top_k: int | None = Field(20, ge=0)
    """Keep at most this many of the most frequent sentences."""
    min_share: float | None = Field(0.01, ge=0.0, le=1.0)
    """Keep only sentences found in at least this share of user turns."""
    file: str | None = None
    """Use a saved task-template list (JSON) instead of computing one."""


class SegmentWeights(_Strict):
    """Per-segment loss weights that replace the mode's table entry for that segment (unset: the mode's)."""

    system: float | None = Field(None, ge=0.0)
    """System prompt and BOS."""
    role: float | None = Field(None, ge=0.0)
    """Role markers, separators and formatting whitespace."""
    instruction: float | None = Field(None, ge=0.0)
    """The human's words."""
    task_template: float | None = Field(None, ge=0.0)
    """Frequent instruction sentences."""
    response: float | None = Field(None, ge=0.0)
    """The assistant's words."""
    end_of_turn: float | None = Field(None, ge=0.0)
    """EOS / end-of-turn marker after a response."""


class LambdaSchedule(_Strict):
    """How one λ moves over training: warm-up from 0, then from its configured value to `end`."""

    kind: Literal[SCHEDULE_KINDS] = "constant"
    """`constant`: the configured λ throughout; `linear` / `cosine`: from the configured λ to `end`."""
    end: float | None = Field(None, ge=0.0)
    """λ at the last step (unset: the configured λ, i.e. no change)."""
    warmup_steps: int = Field(0, ge=0)
    """Steps over which λ ramps linearly from 0 to its configured value before the schedule starts."""


class LambdaSchedules(_Strict):
    """Schedules of λ_I and λ_A over optimizer steps (constant by default)."""

    lambda_instruction: LambdaSchedule = Field(default_factory=LambdaSchedule)
    """λ_I's schedule."""
    lambda_response: LambdaSchedule = Field(default_factory=LambdaSchedule)
    """λ_A's schedule."""


class MaskingConfig(_Strict):
    """Which tokens carry loss, and with which weight."""

    mode: MaskingMode = "l2t"
    """The paper's ladder: `response` (answers only, VIT); `l2t_full` (every instruction-side token: system
    prompt, role markers, task templates, instruction); `l2t_no_system` (minus system prompt and role markers);
    `l2t` (the paper's method: minus the system template and the task templates)."""
    lambda_instruction: float = Field(1.0, ge=0.0)
    """λ_I, the weight of instruction tokens (the start value when scheduled)."""
    lambda_response: float = Field(1.0, ge=0.0)
    """λ_A, the weight of response tokens (the start value when scheduled)."""
    weights: SegmentWeights = Field(default_factory=SegmentWeights)
    """Per-segment weights that override the mode's table; each sweepable as `masking.weights.<segment>`."""
    normalize: Literal[NORMALIZATIONS] = "tokens"
    """`tokens`: Σ w·nll / N, N the trained tokens of the whole optimizer step (LLaVA's and Hugging Face's rule);
    `weight`: Σ w·nll / Σ w; `per_part`: λ_I·mean_I + λ_A·mean_A, each mean over its own trained tokens of the
    step, so that λ means the same whatever the instruction/response token ratio."""
    schedule: LambdaSchedules = Field(default_factory=LambdaSchedules)
    """λ schedules over training steps."""
    task_templates: TaskTemplateConfig = Field(default_factory=TaskTemplateConfig)
    """Task-template selection."""

    @field_validator("mode", mode="before")
    @classmethod
    def _renamed_mode(cls, value):
        if value in RENAMED_MODES:
            raise ValueError(
                f"masking.mode={value!r} was renamed: use {RENAMED_MODES[value]!r} (the paper's method: instruction "
                f"loss minus the system template and the task templates); the ladder is {', '.join(MASKING_MODES)}"
            )
        return value
