"""The experiment's schema: one pydantic model per YAML section, the one source of truth.

Every model rejects unknown keys, so a misspelled key fails loudly with its
dotted path instead of silently falling back to a default. Each field's
docstring is its documentation (it shows up in `l2t config schema`). Values
derived from the settings (global batch, steps per epoch, total and warm-up
steps) are methods of the sections, so the driver and every worker compute
them the same way; the sections travel to Ray workers as `model_dump()` and
come back with `model_validate`.

The module is plain pydantic (no Ray, no torch): workers, tests and the CLI
import it alike. Reading YAML files and dotted overrides is
`orchestrator.config`'s job.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from workloads.chat_templates import TEMPLATES
from workloads.segment_codes import MASKING_MODES

TINY_LANGUAGE_MODELS = ("llama", "qwen2")
"""Language-model families of the tiny preset."""
TOKENIZER_FAMILIES = ("byte_bpe", "sentencepiece_bpe")
"""Tokenizers the tiny preset can train: byte-level BPE (GPT-2/Qwen2) or SentencePiece-style BPE (Llama)."""
FREEZE_POLICIES = ("connector_only", "vision_tower", "none")
"""Which parts of the model stay frozen."""

ChatTemplate = Literal[TEMPLATES]
MaskingMode = Literal[MASKING_MODES]
TinyLanguageModel = Literal[TINY_LANGUAGE_MODELS]
TokenizerFamily = Literal[TOKENIZER_FAMILIES]
FreezePolicy = Literal[FREEZE_POLICIES]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


class SyntheticConfig(_Strict):
    """Generate the project's synthetic visual instruction set instead of reading files."""

    train_rows: int = Field(2000, ge=1)
    """Training conversations to generate."""
    eval_rows: int = Field(200, ge=0)
    """Held-out evaluation questions to generate (disjoint scenes)."""
    seed: int = 0
    """Seed: the same seed gives the same records and images."""
    max_objects: int = Field(1, ge=1, le=6)
    """Most shapes per scene."""
    image_size: int = Field(32, ge=16)
    """Image side in pixels."""
    kinds: list[str] | None = None
    """Conversation kinds to generate (caption, color, shape, count, exists, multi_turn); all when unset."""


class DataConfig(_Strict):
    """Where conversations come from and how they are rendered and tokenized."""

    sources: list[str] = Field(default_factory=list)
    """Training files: LLaVA JSON/JSONL, OpenAI/ShareGPT messages JSONL, or Parquet; local paths, globs, s3:// URIs."""
    format: Literal["auto", "llava", "messages"] = "auto"
    """Conversation format of the sources; `auto` detects it per row."""
    image_root: str | None = None
    """Folder (or s3:// prefix) that image paths in the data are relative to; images must resolve inside it."""
    eval_file: str | None = None
    """LLaVA-style evaluation question file (JSONL with question_id, image, text, answer)."""
    synthetic: SyntheticConfig | None = None
    """Generate the synthetic data set (used by the quickstart) instead of reading `sources`."""
    chat_template: ChatTemplate = "vicuna_v1"
    """Chat template used to render conversations."""
    system_prompt: str | None = None
    """Override the template's default system prompt."""
    max_length: int = Field(512, ge=8)
    """Maximum tokens per row (image tokens included); longer rows are truncated, never through an image."""
    max_bad_fraction: float = Field(0.01, ge=0.0, le=1.0)
    """Largest share of quarantined rows before preparation fails."""
    check_images: bool = True
    """Open every referenced image during validation (catches missing and corrupt files)."""

    @model_validator(mode="after")
    def _has_a_source(self) -> "DataConfig":
        if not self.sources and self.synthetic is None:
            raise ValueError("set data.sources or data.synthetic")
        return self


class TinyModelConfig(_Strict):
    """Shape of the tiny LLaVA built locally when `model.name_or_path` is `tiny`."""

    image_size: int = 32
    """Input image side in pixels."""
    patch_size: int = 8
    """Vision patch size."""
    vision_hidden: int = 64
    """Vision tower width."""
    vision_layers: int = 2
    """Vision tower depth."""
    text_hidden: int = 128
    """Language model width."""
    text_layers: int = 2
    """Language model depth."""
    vision_heads: int = 4
    """Vision tower attention heads."""
    text_heads: int = 4
    """Language model attention heads."""
    text_intermediate: int = 256
    """Language model MLP width."""
    lm: TinyLanguageModel = "llama"
    """Language model family."""
    vocab_size: int = 2000
    """Tokenizer vocabulary size (trained on the training text)."""
    tokenizer_family: TokenizerFamily = "byte_bpe"
    """Tokenizer kind: byte-level BPE (GPT-2/Qwen2) or SentencePiece-style BPE (Llama)."""


class ModelConfig(_Strict):
    """Which model is trained and which parts of it learn."""

    name_or_path: str = "tiny"
    """Hugging Face id (e.g. llava-hf/llava-1.5-7b-hf), a local folder, or `tiny` for the locally built preset."""
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)
    """Shape of the `tiny` preset."""
    freeze: FreezePolicy = "vision_tower"
    """`connector_only`: train only the projector (pre-training); `vision_tower`: freeze the vision tower
    (the paper's fine-tuning); `none`: train everything."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Training precision: `auto` is bf16 on GPU and float32 on CPU."""
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = "auto"
    """Attention kernel; `auto` is SDPA."""


class TaskTemplateConfig(_Strict):
    """How frequent instruction sentences (task templates) are chosen."""

    top_k: int | None = Field(20, ge=0)
    """Keep at most this many of the most frequent sentences."""
    min_share: float | None = Field(0.01, ge=0.0, le=1.0)
    """Keep only sentences found in at least this share of user turns."""
    file: str | None = None
    """Use a saved task-template list (JSON) instead of computing one."""


class MaskingConfig(_Strict):
    """Which tokens carry loss, and with which weight."""

    mode: MaskingMode = "l2t"
    """`response`: answers only (VIT); `l2t`: instructions too; `l2t_no_template`: instructions minus system,
    role and task-template tokens."""
    lambda_instruction: float = Field(1.0, ge=0.0)
    """λ_I, the weight of instruction tokens."""
    lambda_response: float = Field(1.0, ge=0.0)
    """λ_A, the weight of response tokens."""
    task_templates: TaskTemplateConfig = Field(default_factory=TaskTemplateConfig)
    """Task-template selection."""


class TrainConfig(_Strict):
    """Optimization and the Ray Train / DeepSpeed layout."""

    max_steps: int | None = Field(None, ge=1)
    """Optimizer steps; overrides `epochs` when set."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the training data."""
    lr: float = Field(2e-5, gt=0)
    """Peak learning rate."""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up."""
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    """Share of steps spent warming up linearly."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW weight decay."""
    grad_clip: float = Field(1.0, ge=0.0)
    """Gradient norm clipping (0 disables)."""
    micro_batch_size: int = Field(4, ge=1)
    """Rows per worker per forward pass."""
    gradient_accumulation: int = Field(1, ge=1)
    """Micro-batches per optimizer step on each worker."""
    seed: int = 0
    """Seed for weights init, data order and dropout."""
    num_workers: int = Field(2, ge=1)
    """Ray Train workers (data-parallel ranks)."""
    use_gpu: bool = False
    """One GPU per worker (NCCL, bf16) instead of CPU (gloo)."""
    cpus_per_worker: float | None = Field(None, gt=0)
    """Logical CPUs per worker; derived from the cluster when unset."""
    deepspeed: str = "configs/deepspeed/zero2.json"
    """DeepSpeed JSON config; `auto` values are filled from this section."""
    checkpoint_every: int = Field(0, ge=0)
    """Save a resumable checkpoint every N steps (0: only the final model)."""
    max_failures: int = Field(0, ge=-1)
    """Worker-group restarts allowed (-1: unlimited); restarts resume from the last checkpoint."""
    log_every: int = Field(10, ge=1)
    """Report metrics every N steps."""
    torch_threads: int | None = Field(None, ge=1)
    """torch intra-op threads per worker (unset: torch's default); 1 is steadier on a shared machine."""
    ingest: Literal["auto", "stream", "materialize"] = "auto"
    """`stream`: Ray Data loads images while training runs; `materialize`: load them all before the fit starts;
    `auto`: stream when the cluster has a CPU to spare beside the workers."""

    @property
    def global_batch(self) -> int:
        """Rows per optimizer step over all workers: micro batch x accumulation x workers."""
        return self.micro_batch_size * self.gradient_accumulation * self.num_workers

    def steps_per_epoch(self, rows: int) -> int:
        """Whole optimizer steps in one pass over `rows` prepared rows (the remainder is not trained)."""
        return rows // self.global_batch

    def total_steps(self, rows: int) -> int:
        """Optimizer steps of the run: `max_steps`, else `epochs` passes over `rows` rows."""
        steps_per_epoch = self.steps_per_epoch(rows)
        if steps_per_epoch < 1:
            raise ValueError(
                f"{rows} rows are too few for one step of {self.num_workers} workers x micro batch "
                f"{self.micro_batch_size} x accumulation {self.gradient_accumulation}"
            )
        return self.max_steps or max(1, math.ceil(self.epochs * steps_per_epoch))

    def warmup_steps(self, total_steps: int) -> int:
        """Linear warm-up steps: `warmup_ratio` of the run."""
        return int(round(self.warmup_ratio * total_steps))


class AshaConfig(_Strict):
    """Asynchronous successive halving: stop trials that are clearly worse early."""

    enabled: bool = False
    """Use ASHA; otherwise every trial runs to the end."""
    metric: str = "loss_response"
    """Training metric compared across trials (`loss_response` does not scale with λ, unlike `loss`)."""
    mode: Literal["min", "max"] = "min"
    """Whether lower or higher `metric` is better."""
    grace_period: int = Field(20, ge=1)
    """Optimizer steps a trial runs before it can be stopped (the first rung; later rungs at
    grace_period x reduction_factor^k steps)."""
    reduction_factor: float = Field(2.0, gt=1.0)
    """Keep 1/reduction_factor of the trials at each rung."""


class SweepConfig(_Strict):
    """What `l2t sweep` varies, and how trials run."""

    search: Literal["grid", "random", "points"] = "grid"
    """`grid`: every combination; `random`: `num_samples` draws from the listed values; `points`: exactly `points`."""
    lambda_instruction: list[float] = Field(default_factory=list)
    """λ_I values (`masking.lambda_instruction`)."""
    lambda_response: list[float] = Field(default_factory=list)
    """λ_A values (`masking.lambda_response`)."""
    parameters: dict[str, list[Any]] = Field(default_factory=dict)
    """Other swept keys by dotted path, e.g. `masking.mode: [response, l2t]` or `train.lr: [1e-4, 3e-4]`."""
    points: list[dict[str, Any]] = Field(default_factory=list)
    """Explicit trials for `search: points`, each `{dotted.key: value}`."""
    num_samples: int = Field(4, ge=1)
    """Trials drawn for `search: random`."""
    seed: int = 0
    """Seed of the random search."""
    max_concurrent_trials: int | None = Field(None, ge=1)
    """Trials running at once; derived from the cluster when unset."""
    max_failures: int = Field(1, ge=0)
    """Retries of a failed trial."""
    metric: str = "eval/accuracy"
    """Metric that picks the best trial in `l2t compare`."""
    metric_mode: Literal["min", "max"] = "max"
    """Whether lower or higher `metric` is better."""
    asha: AshaConfig = Field(default_factory=AshaConfig)
    """Early stopping."""


class EvalConfig(_Strict):
    """Held-out evaluation after training."""

    max_rows: int = Field(200, ge=1)
    """Evaluate at most this many questions."""
    batch_size: int = Field(32, ge=1)
    """Questions per batch."""
    max_new_tokens: int = Field(8, ge=1)
    """Generation budget per answer."""
    null_image: Literal["noise", "blank", "none"] = "noise"
    """V=∅ for visual contribution: random noise (the paper), a blank image, or no image."""
    seed: int = 0
    """Seed of the noise images."""
    num_beams: int = Field(1, ge=1)
    """Beam search width (1: greedy)."""
    use_gpu: bool | None = None
    """One GPU per model actor; unset: as `train.use_gpu`."""
    concurrency: int | None = Field(None, ge=1)
    """Model actors; unset: one per GPU, or one per 4 CPUs (at least 1) on CPU."""
    cpus_per_actor: float | None = Field(None, gt=0)
    """Logical CPUs per actor; unset: 0.5 on CPU, 1 beside a GPU."""
    torch_threads: int | None = Field(None, ge=1)
    """torch threads per CPU actor; unset: its logical CPUs, at least 1. More threads than the actor
    holds backfire on a busy machine: 2 threads on 2 loaded cores ran the tiny model 30x slower than 1."""


class TrackingConfig(_Strict):
    """MLflow."""

    uri: str | None = None
    """Tracking URI (e.g. http://host:5000); a local SQLite store under `storage.path` when unset."""
    experiment: str = "l2t"
    """MLflow experiment name."""


class StorageConfig(_Strict):
    """Where prepared data, models, checkpoints and results go."""

    path: str = "./l2t_runs"
    """A local folder or an s3:// URI."""


class ExperimentConfig(_Strict):
    """One l2t experiment: data, model, masking, training, sweep, evaluation, tracking, storage."""

    name: str = "l2t"
    """Experiment name, used in run names and output paths."""
    data: DataConfig
    """Training data."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """Model."""
    masking: MaskingConfig = Field(default_factory=MaskingConfig)
    """L2T masking and λ weights."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Training."""
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    """λ sweep."""
    eval: EvalConfig = Field(default_factory=EvalConfig)
    """Evaluation."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """Experiment tracking."""
    storage: StorageConfig = Field(default_factory=StorageConfig)
    """Output storage."""

    def flat(self) -> dict[str, Any]:
        """The resolved config as `{dotted.key: value}`."""
        return flatten(self.model_dump(mode="json"))

    def fingerprint(self, *sections: str) -> str:
        """A short, stable hash of the named sections (all when none are named)."""
        dumped = self.model_dump(mode="json")
        chosen = {k: dumped[k] for k in sections} if sections else dumped
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:16]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out
