"""The masking section of the experiment schema: the ladder of modes, λ, per-segment weights,
normalization, λ schedules, task-template selection and the visual weighting of `l2t_visual`; and the
relevance scoring at preparation that `l2t_visual` needs (`data.relevance`) (re-exported by `workloads.config`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from workloads.segment_codes import MASKING_MODES, RENAMED_MODES

NORMALIZATIONS = ("tokens", "weight", "per_part")
"""How a step's weighted token losses are divided (see `MaskingConfig.normalize`)."""
SCHEDULE_KINDS = ("constant", "linear", "cosine")
"""Shapes of a λ schedule over training steps."""
MaskingMode = Literal[MASKING_MODES]
RELEVANCE_TRANSFORMS = ("clip", "sigmoid", "rank")
"""How `l2t_visual` turns a token's visual relevance r into its weight factor g (see `VisualWeighting`)."""


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


class VisualWeighting(_Strict):
    """`masking.mode=l2t_visual`: each instruction token's weight is λ_I · max(floor, g(r)), r its visual relevance
    (log p(x | V, prefix) - log p(x | V=∅, prefix) under `data.relevance.reference_model`, stored at preparation).
    Applied at training time, so one prepared set serves every transform, temperature and floor."""

    transform: Literal[RELEVANCE_TRANSFORMS] = "clip"
    """g: `clip` = clip(r/τ, 0, 1) (tokens the image does not help predict get 0); `sigmoid` = sigmoid(r/τ)
    (0.5 at r = 0); `rank` = the token's rank by r among its row's instruction tokens, scaled to [0, 1] (ties
    share their mean rank, a lone token gets 1; τ unused)."""
    temperature: float = Field(1.0, gt=0.0)
    """τ, in nats of relevance: `clip` reaches full weight at r = τ; `sigmoid` has slope 1/(4τ) at 0."""
    floor: float = Field(0.0, ge=0.0, le=1.0)
    """The least factor an instruction token keeps: weight = λ_I · max(floor, g(r)); 1 is plain `l2t`."""


class RelevanceConfig(_Strict):
    """`data.relevance`: score every instruction-side token of every prepared row with a reference model (two
    teacher-forced passes, with the image and with V=∅ = `eval.null_image` seeded by `eval.seed`, evaluation's
    choice) on a Ray Data actor pool, stored as the shards' float16 `relevance` column. The prepared folder's key
    includes the reference model's identity, so one scoring serves a sweep and preparing again is a no-op."""

    reference_model: str
    """A local `save_pretrained` folder (e.g. the VIT baseline's exported model) or a hub id; it must share the
    trained model's tokenizer and image token count. A folder is identified by a hash of its files' contents."""
    batch_size: int = Field(16, ge=1)
    """Rows per scoring forward pass."""
    use_gpu: bool | None = None
    """One GPU per scoring actor; unset: as `train.use_gpu`."""
    concurrency: int | None = Field(None, ge=1)
    """Scoring actors; unset: one per GPU, or one per 4 CPUs (at least 1) on CPU (as evaluation's pool)."""
    cpus_per_actor: float | None = Field(None, gt=0)
    """Logical CPUs per actor (its torch threads on CPU); unset: 0.5 on CPU, 1 beside a GPU."""


class MaskingConfig(_Strict):
    """Which tokens carry loss, and with which weight."""

    mode: MaskingMode = "l2t"
    """The paper's ladder: `response` (answers only, VIT); `l2t_full` (every instruction-side token: system
    prompt, role markers, task templates, instruction); `l2t_no_system` (minus system prompt and role markers);
    `l2t` (the paper's method: minus the system template and the task templates); `l2t_visual` (`l2t` with each
    instruction token weighted by its visual relevance: `masking.visual`, scored at preparation by
    `data.relevance`)."""
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
    visual: VisualWeighting = Field(default_factory=VisualWeighting)
    """How `l2t_visual` turns each instruction token's visual relevance into its weight."""

    @field_validator("mode", mode="before")
    @classmethod
    def _renamed_mode(cls, value):
        if value in RENAMED_MODES:
            raise ValueError(
                f"masking.mode={value!r} was renamed: use {RENAMED_MODES[value]!r} (the paper's method: instruction "
                f"loss minus the system template and the task templates); the ladder is {', '.join(MASKING_MODES)}"
            )
        return value
