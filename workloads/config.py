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

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from workloads.chat_templates import TEMPLATES
from workloads.families import TINY_FAMILIES
from workloads.lora_config import ModelLoraConfig
from workloads.masking_config import MaskingConfig, RelevanceConfig

TINY_LANGUAGE_MODELS = ("llama", "qwen2")
"""Language-model families of the tiny preset."""
TOKENIZER_FAMILIES = ("byte_bpe", "sentencepiece_bpe")
"""Tokenizers the tiny preset can train: byte-level BPE (GPT-2/Qwen2) or SentencePiece-style BPE (Llama)."""
FREEZE_POLICIES = ("connector_only", "vision_tower", "none")
"""Which parts of the model stay frozen."""

ChatTemplate = Literal[TEMPLATES]
TinyLanguageModel = Literal[TINY_LANGUAGE_MODELS]
TokenizerFamily = Literal[TOKENIZER_FAMILIES]
FreezePolicy = Literal[FREEZE_POLICIES]
IMAGE_PLACEMENTS = ("auto", "front", "as_written")
"""Where the image placeholder goes in a user turn (see `DataConfig.image_placement`)."""
IMAGE_CHECKS = ("decode", "header", "off")
"""How far validation checks each image (see `DataConfig.check_images`)."""
LOSS_KERNELS = ("chunked", "full", "liger")
"""How per-token losses are computed from the LM's hidden states (see `TrainConfig.loss_kernel`)."""
DUPLICATE_ID_POLICIES = ("keep", "warn", "quarantine")
"""What preparation does with rows that share an id (see `DataConfig.duplicate_ids`)."""
SYNTHETIC_WORLDS = ("shapes", "scenes")
"""The synthetic data sets (see `SyntheticConfig.world`)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


class SyntheticConfig(_Strict):
    """Generate the project's synthetic visual instruction set instead of reading files."""

    world: Literal[SYNTHETIC_WORLDS] = "shapes"
    """`shapes`: one to a few shapes, one-round questions with one- or two-token answers (the fast tests' world);
    `scenes`: multi-object scenes with questions about attributes, counts and relations in a long tail of
    wordings, LLaVA-665K's mix of short and long (description, reasoning, conversation) answers, and balanced
    yes/no questions (workloads/synthetic_scenes.py gives the figures it targets)."""
    train_rows: int = Field(2000, ge=1)
    """Training conversations to generate."""
    eval_rows: int = Field(200, ge=0)
    """Held-out evaluation questions to generate (disjoint scenes)."""
    seed: int = 0
    """Seed: the same seed gives the same records and images."""
    max_objects: int = Field(1, ge=1, le=6)
    """Most shapes per scene (`scenes`: at least 2, and 4 when unset; from 5 on, a 3x3 layout)."""
    image_size: int = Field(32, ge=16)
    """Image side in pixels (the tiny model's `model.tiny.image_size` should match)."""
    kinds: list[str] | None = None
    """Conversation kinds to generate, all when unset: `shapes` caption, color, shape, count, exists, multi_turn;
    `scenes` vqa, exists, region, caption, detail, reasoning, conversation."""
    mix: dict[str, float] | None = None
    """`scenes` only: relative weight per kind (unset: LLaVA-665K's rows per source in thousands, vqa 250,
    exists 60, region 134, caption 22, detail 23, reasoning 77, conversation 58); kinds left out get 0."""
    long_answer_share: float | None = Field(None, ge=0.0, le=1.0)
    """`scenes` only: share of rows with long free-form answers (detail, reasoning, conversation); rescales the
    mix on both sides (unset: as the mix has it, 158/624 = 0.25 for the default)."""

    @model_validator(mode="after")
    def _world_settings(self) -> "SyntheticConfig":
        if self.world == "shapes":
            if self.mix is not None or self.long_answer_share is not None:
                raise ValueError("mix and long_answer_share are settings of world: scenes")
            return self
        from workloads.synthetic_scenes import DEFAULT_MAX_OBJECTS, resolve_mix

        if "max_objects" not in self.model_fields_set:
            self.max_objects = DEFAULT_MAX_OBJECTS
        if self.max_objects < 2:
            raise ValueError(f"world: scenes needs max_objects >= 2 (relations), got {self.max_objects}")
        resolve_mix(self.mix, self.long_answer_share, self.kinds)  # ValueError: unknown kinds, nothing to draw
        return self


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
    image_placement: Literal[IMAGE_PLACEMENTS] = "auto"
    """`front`: LLaVA's `preprocess_multimodal` rewrite (each turn with images becomes `<image>\n` + its stripped
    text, as llava-1.5 checkpoints were trained); `as_written`: placeholders stay where the data puts them;
    `auto`: `front` for the LLaVA-family templates (vicuna_v1, phi, plain), else `as_written`."""
    max_length: int = Field(512, ge=8)
    """Maximum tokens per row (image tokens included); longer rows are truncated, never through an image."""
    max_bad_fraction: float = Field(0.01, ge=0.0, le=1.0)
    """Largest share of quarantined rows before preparation fails, and of rows whose images fail to load
    during training (per rank, over the rows it has seen) before the run fails."""
    check_images: Literal[IMAGE_CHECKS] = "decode"
    """What validation does with each image: `decode` (decode every pixel, as training will), `header` (the
    file exists and its header and checksums are sound), `off` (neither). Paths are resolved and confined to
    `image_root` whatever the setting. The booleans of earlier versions mean `decode` (true) and `off` (false)."""
    duplicate_ids: Literal[DUPLICATE_ID_POLICIES] = "warn"
    """Rows that share an id: `keep` them unchecked, `warn` (count and name them, keep them), or `quarantine`
    every occurrence after the first (in file order, then line order) as `duplicate_id`."""
    max_row_bytes: int = Field(1_048_576, ge=1024)
    """Largest record (its JSON text in bytes); a longer one is quarantined as `row_too_large`."""
    relevance: RelevanceConfig | None = None
    """Score each instruction-side token's visual relevance with a reference model at preparation (what
    `masking.mode=l2t_visual` weights by); unset: no scoring."""

    @field_validator("check_images", mode="before")
    @classmethod
    def _boolean_image_checks(cls, value):
        if isinstance(value, bool):
            return "decode" if value else "off"
        return value

    @model_validator(mode="after")
    def _has_a_source(self) -> "DataConfig":
        if not self.sources and self.synthetic is None:
            raise ValueError("set data.sources or data.synthetic")
        return self


class TinyModelConfig(_Strict):
    """Shape of the tiny LLaVA built locally when `model.name_or_path` is `tiny`."""

    family: Literal[TINY_FAMILIES] = "llava"
    """Model family (workloads/families.py): `llava` (a fixed token count per image), `llava_next` (AnyRes
    tiles: the count depends on the image's size), `qwen2_vl` (dynamic resolution, M-RoPE) or `qwen2_5_vl`
    (Qwen2-VL with a window-attention tower)."""
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
    """Attention kernel; `auto`: FlashAttention-2 on GPU in bf16 when `flash_attn` imports, else SDPA (logged)."""
    lora: ModelLoraConfig = Field(default_factory=ModelLoraConfig)
    """LoRA / QLoRA adapters (`enabled: true`); with them `freeze` must stay `vision_tower`."""

    @model_validator(mode="after")
    def _lora_freezes_the_base(self) -> "ModelConfig":
        if self.lora.enabled and self.freeze != "vision_tower":
            raise ValueError(
                f"model.lora.enabled: LoRA trains its adapters and model.lora.full_modules and freezes the rest, "
                f"vision tower included, so model.freeze must be vision_tower, not {self.freeze} (for "
                f"connector_only, train the connector without LoRA; to train more, list it in full_modules)"
            )
        return self


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
    loss_kernel: Literal[LOSS_KERNELS] = "chunked"
    """nll per token: `chunked` (LM head and cross-entropy `loss_chunk_tokens` scored positions at a time, logits
    recomputed in backward, never [tokens, vocab] at once), `full` (full logits), `liger` (Liger's fused kernel:
    GPU, `pip install .[gpu]`, not with ZeRO-3). The loss is the same whichever."""
    loss_chunk_tokens: int = Field(1024, ge=0)
    """Positions per chunk of the `chunked` kernel; 0 materializes the full logits (as `full`)."""
    packing: bool = False
    """Pack each micro-batch's rows into few fixed-length sequences (first-fit decreasing, attention within each
    row): the same rows, loss and gradients as padding them, fewer padded positions (`workloads/packing.py`)."""
    packing_length: int | None = Field(None, ge=8)
    """Packed sequence length; unset: per micro-batch, the multiple of its longest row that takes fewest positions."""

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
    """What rungs compare: a training metric (`loss_response` does not scale with λ, unlike `loss`), or a
    held-out one, `eval/<metric>` (e.g. `eval/accuracy`, `eval/vc_mean`): every trial then answers the same
    `eval_rows` questions of `data.eval_file` at each rung (`workloads/training_eval.py`; not with ZeRO-3)."""
    mode: Literal["min", "max"] = "min"
    """Whether lower or higher `metric` is better."""
    grace_period: int = Field(20, ge=1)
    """Optimizer steps a trial runs before it can be stopped (the first rung; later rungs at
    grace_period x reduction_factor^k steps)."""
    reduction_factor: float = Field(2.0, gt=1.0)
    """Keep 1/reduction_factor of the trials at each rung."""
    eval_rows: int = Field(64, ge=1)
    """Held-out questions (the first of `data.eval_file`) answered at each rung when `metric` is `eval/...`."""


class SweepConfig(_Strict):
    """What `l2t sweep` varies, and how trials run."""

    search: Literal["grid", "random", "points"] = "grid"
    """`grid`: every combination; `random`: `num_samples` draws from the listed values; `points`: exactly `points`."""
    lambda_instruction: list[float] = Field(default_factory=list)
    """λ_I values (`masking.lambda_instruction`)."""
    lambda_response: list[float] = Field(default_factory=list)
    """λ_A values (`masking.lambda_response`)."""
    parameters: dict[str, list[Any]] = Field(default_factory=dict)
    """Other swept keys by dotted path, e.g. `masking.mode: [response, l2t_full, l2t]` or `train.lr: [1e-4, 3e-4]`."""
    points: list[dict[str, Any]] = Field(default_factory=list)
    """Explicit trials for `search: points`, each `{dotted.key: value}`."""
    seeds: list[int] = Field(default_factory=list)
    """Seeds crossed with every point (`train.seed`: weights init, data order, dropout; evaluation questions stay
    fixed); the trials of one point form an arm that `l2t compare --baseline` reports with intervals."""
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
    answer_rule: Literal["auto", "vqa", "gqa", "exact"] = "auto"
    """How short answers are scored: `vqa` (VQAv2's normalization and soft score), `gqa` (LLaVA's GQA
    script: trailing periods stripped, lower-cased, exact match), `exact` (exact match after the VQA
    normalization); `auto`: a question's or its file's own `answer_rule`, else `gqa` on GQA suites
    (kind `gqa`, or a question file named like GQA) and `vqa` elsewhere."""
    choice_parser: Literal["auto", "llava", "lenient"] = "auto"
    """How multiple-choice answers are read: `llava` (LLaVA's ScienceQA parser: "B", "B. text" or
    "The answer is B."), `lenient` (also "(B)", "B.", the option's text); `auto`: a question's or its
    file's own `choice_parser`, else `llava` on question files and `lenient` on the synthetic suite."""
    lmms_eval_tasks: list[str] = Field(default_factory=list)
    """lmms-eval tasks to run on the model after the held-out evaluation (needs `pip install .[lmms]`),
    one Ray task each; their metrics join the run's as `lmms/<task>/<metric>`."""
    lmms_eval_include_path: str | None = None
    """A folder of extra lmms-eval task YAMLs (local tasks and data)."""
    lmms_eval_limit: int | None = Field(None, ge=1)
    """Evaluate at most this many documents per lmms-eval task."""


class TrackingConfig(_Strict):
    """MLflow."""

    uri: str | None = None
    """Tracking URI (e.g. http://host:5000, sqlite:///path/mlflow.db); a local SQLite store under `storage.path`
    when unset. Credentials are better given as MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD; a
    `user:password@` in the URI is taken out of it into those variables and never printed."""
    experiment: str = "l2t"
    """MLflow experiment name."""


class StorageConfig(_Strict):
    """Where prepared data, models, checkpoints and results go."""

    path: str = "./l2t_runs"
    """A local folder or an s3:// URI (other URL schemes, e.g. http:// or gs://, are refused)."""


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

    @model_validator(mode="after")
    def _qlora_needs_a_gpu(self) -> "ExperimentConfig":
        if self.model.lora.enabled and self.model.lora.quantize != "none" and not self.train.use_gpu:
            raise ValueError(
                f"model.lora.quantize={self.model.lora.quantize}: QLoRA's 4-bit base runs on a CUDA GPU through "
                "bitsandbytes; set train.use_gpu=true on a GPU machine, or model.lora.quantize=none to train LoRA "
                "on a full-precision base"
            )
        return self

    @model_validator(mode="after")
    def _tiny_family_chat_template(self) -> "ExperimentConfig":
        """The tiny preset's family decides the chat template when `data.chat_template` is not given (a hub
        checkpoint's family is known only from its files: give its template, as configs/ do)."""
        if self.model.name_or_path == "tiny" and "chat_template" not in self.data.model_fields_set:
            from workloads.families import FAMILIES

            self.data.chat_template = FAMILIES[self.model.tiny.family].chat_template
        return self

    @model_validator(mode="after")
    def _visual_needs_relevance(self) -> "ExperimentConfig":
        if self.masking.mode == "l2t_visual" and self.data.relevance is None:
            raise ValueError(
                "masking.mode=l2t_visual weights instruction tokens by their visual relevance, scored at "
                "preparation: set data.relevance.reference_model (a model folder or hub id)"
            )
        return self

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
