"""Typed experiment configuration: one pydantic model per YAML section.

Every model rejects unknown keys, so a misspelled key fails loudly with its
dotted path instead of silently falling back to a default. Each field's
docstring is its documentation (it shows up in `l2t config schema`).
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"


class ConfigError(ValueError):
    """A config that can't be used; the message names the offending key."""


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
    """Training files: LLaVA JSON/JSONL, OpenAI/ShareGPT messages JSONL, or Parquet; local paths, globs or s3:// URIs."""
    format: Literal["auto", "llava", "messages"] = "auto"
    """Conversation format of the sources; `auto` detects it per row."""
    image_root: str | None = None
    """Folder (or s3:// prefix) that image paths in the data are relative to; images must resolve inside it."""
    eval_file: str | None = None
    """LLaVA-style evaluation question file (JSONL with question_id, image, text, answer)."""
    synthetic: SyntheticConfig | None = None
    """Generate the synthetic data set (used by the quickstart) instead of reading `sources`."""
    chat_template: Literal["vicuna_v1", "llama3", "qwen2", "phi", "plain", "tokenizer"] = "vicuna_v1"
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
    lm: Literal["llama", "qwen2"] = "llama"
    """Language model family."""
    vocab_size: int = 2000
    """Tokenizer vocabulary size (trained on the training text)."""
    tokenizer_family: Literal["byte_bpe", "sentencepiece_bpe"] = "byte_bpe"
    """Tokenizer kind: byte-level BPE (GPT-2/Qwen2) or SentencePiece-style BPE (Llama)."""


class ModelConfig(_Strict):
    """Which model is trained and which parts of it learn."""

    name_or_path: str = "tiny"
    """Hugging Face id (e.g. llava-hf/llava-1.5-7b-hf), a local folder, or `tiny` for the locally built preset."""
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)
    """Shape of the `tiny` preset."""
    freeze: Literal["connector_only", "vision_tower", "none"] = "vision_tower"
    """`connector_only`: train only the projector (pre-training); `vision_tower`: freeze the vision tower (the paper's fine-tuning); `none`: train everything."""
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

    mode: Literal["response", "l2t", "l2t_no_template"] = "l2t"
    """`response`: answers only (VIT); `l2t`: instructions too; `l2t_no_template`: instructions minus system, role and task-template tokens."""
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
    ingest: Literal["auto", "stream", "materialize"] = "auto"
    """`stream`: Ray Data loads images while training runs; `materialize`: load them all before the fit starts; `auto`: stream when the cluster has a CPU to spare beside the workers."""


class AshaConfig(_Strict):
    """Asynchronous successive halving: stop trials that are clearly worse early."""

    enabled: bool = False
    """Use ASHA; otherwise every trial runs to the end."""
    metric: str = "loss_response"
    """Training metric compared across trials (`loss_response` does not scale with λ, unlike `loss`)."""
    mode: Literal["min", "max"] = "min"
    """Whether lower or higher `metric` is better."""
    grace_period: int = Field(20, ge=1)
    """Optimizer steps a trial runs before it can be stopped (the first rung; later rungs at grace_period x reduction_factor^k steps)."""
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


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as YAML scalars) to a raw config dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.lr=1e-4)")
        key, _, text = item.partition("=")
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key")
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
    return raw


def _known_keys(model: type[BaseModel], path: tuple) -> list[str]:
    """Field names allowed at `path` (used for 'did you mean' hints)."""
    current: Any = model
    for part in path:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def _format_errors(error: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for item in error.errors():
        loc = tuple(item["loc"])
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
            close = difflib.get_close_matches(str(loc[-1]), _known_keys(ExperimentConfig, loc[:-1]), n=1)
            if close:
                message += f" (did you mean {'.'.join(str(p) for p in loc[:-1] + (close[0],))}?)"
        lines.append(f"  {dotted}: {message}")
    return "\n".join(lines)


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_errors(error, source)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML experiment, apply dotted overrides, validate."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return config_from_dict(apply_overrides(raw, overrides or []), str(path))


def json_schema() -> dict[str, Any]:
    return ExperimentConfig.model_json_schema()


def resolve_repo_path(value: str) -> Path:
    """A path from a config: as given if it exists, else relative to the repository root."""
    path = Path(value).expanduser()
    if path.exists() or path.is_absolute():
        return path
    return REPO_ROOT / path
