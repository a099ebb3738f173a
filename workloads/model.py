"""Loading LLaVA-family models, composing TinyLLaVA-style ones, choosing which parts learn.

Everything goes through transformers' `from_pretrained`, by Hugging Face id or
local folder (any family of workloads/families.py: LLaVA, LLaVA-NeXT, Qwen2-VL),
so the tiny preset built by `workloads.tiny_model`, a hub
checkpoint such as `llava-hf/llava-1.5-7b-hf` and a TinyLLaVA-style
composition written by `compose_llava` take the same path.

TinyLLaVA-style composition: a causal LM (e.g. Qwen/Qwen2-0.5B, or microsoft/phi-2 for TinyLLaVA-3B,
whose LM head's bias LLaVA's head can't hold and which is dropped with a warning) and a vision
tower (e.g. google/siglip-so400m-patch14-384) are loaded separately and put
into one `LlavaForConditionalGeneration` through `LlavaConfig`, with a fresh
two-layer MLP connector; the result is saved with its processor and loads like
any LLaVA checkpoint. `tinyllava_config` gives that shape with random weights
(the GPU benchmark uses it; nothing is downloaded).

Training: `prepare_for_training` puts the model in training mode with the KV
cache off (transformers recomputes checkpointed layers and applies dropout only
in training mode); `attention_implementation` picks and logs the attention kernel.

MFU: `TrainingFlops` counts the matmul FLOPs of one training step from the
model's linear layers, attention and which parts train.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

FREEZE_POLICIES = ("connector_only", "vision_tower", "none")
IMAGE_TOKEN = "<image>"

# The shapes of TinyLLaVA-Qwen2-0.5B-SigLIP's parts (config.json of Qwen/Qwen2-0.5B and
# google/siglip-so400m-patch14-384), for random-weight stand-ins.
QWEN2_0_5B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    bos_token_id=151643,
    eos_token_id=151643,
)
SIGLIP_SO400M_384 = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=384,
    patch_size=14,
)


@dataclass
class ParameterCounts:
    trainable: int
    total: int


def _has_cls_token(vision_config) -> bool:
    """CLIP-style towers prepend a CLS token; SigLIP-style ones don't."""
    return "siglip" not in str(getattr(vision_config, "model_type", ""))


def num_image_tokens(config) -> int:
    """Tokens one image occupies in the LM input, from a Llava config.

    "default" drops the first feature (CLIP's CLS); "full" keeps every feature,
    which is patches + 1 with CLIP and patches with SigLIP.
    """
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    if config.vision_feature_select_strategy == "full" and _has_cls_token(vision):
        return patches + 1
    return patches


def torch_dtype(name: str, use_gpu: bool) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if use_gpu else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def _flash_attn_problem() -> str | None:
    """Why FlashAttention-2 can't run here, or None when `flash_attn` imports (a wheel built for another torch
    or CUDA is found by pip but fails to import, so this imports it rather than only looking for it)."""
    if importlib.util.find_spec("flash_attn") is None:
        return "flash_attn is not installed (pip install .[gpu])"
    try:
        import flash_attn  # noqa: F401
    except Exception as error:  # an ABI mismatch raises ImportError or OSError
        return f"flash_attn does not import: {type(error).__name__}: {error}"
    return None


def attention_implementation(requested: str, use_gpu: bool, dtype: torch.dtype) -> str:
    """`auto`: FlashAttention-2 on GPU in bf16 when `flash_attn` imports, else SDPA; logs the choice and why."""
    if requested != "auto":
        logger.info("attention: %s (as configured)", requested)
        return requested
    if not use_gpu or dtype not in (torch.bfloat16, torch.float16):
        choice, reason = "sdpa", "FlashAttention-2 needs a GPU and bf16/fp16" if use_gpu else "on CPU"
    else:
        problem = _flash_attn_problem()
        choice, reason = ("sdpa", problem) if problem else ("flash_attention_2", "flash_attn imports")
    logger.info("attention: %s (model.attn_implementation=auto: %s)", choice, reason)
    return choice


def prepare_for_training(model) -> None:
    """Training mode and no KV cache: transformers recomputes checkpointed layers only when `model.training`,
    applies dropout only then, and builds a cache on every forward while the LM's `use_cache` is on
    (`from_pretrained` returns a model in eval mode with the cache on)."""
    model.train()
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.use_cache = False


def enable_gradient_checkpointing(model) -> None:
    """Recompute activations in backward (non-reentrant, so frozen inputs still pass gradients)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # transformers < 5
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def load_model(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "auto",
    gradient_checkpointing: bool = False,
    use_gpu: bool = False,
    **options,
):
    """A LLaVA-family model for training, by hub id or local folder; `options` go to `from_pretrained`
    (QLoRA's `quantization_config` and `device_map`, `workloads.lora.quantized_loading`)."""
    from transformers import AutoModelForImageTextToText

    attention = attention_implementation(attn_implementation, use_gpu, dtype)
    model = AutoModelForImageTextToText.from_pretrained(
        name_or_path, dtype=dtype, attn_implementation=attention, **options
    )
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


@dataclass
class ProcessorParts:
    """A processor's tokenizer and image processor, saved side by side, where the processor class itself can't
    be built here (Qwen2-VL's demands a video processor, which needs torchvision)."""

    tokenizer: object
    image_processor: object

    def save_pretrained(self, out_dir) -> None:
        self.tokenizer.save_pretrained(out_dir)
        self.image_processor.save_pretrained(out_dir)


def load_processor(name_or_path: str):
    """The model's processor (the export saves it beside the weights), or its `ProcessorParts`: l2t itself
    loads only the tokenizer and the image processor."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(name_or_path)
    except ImportError:  # a backend the processor class needs (torchvision) is missing
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        return ProcessorParts(tokenizer, AutoImageProcessor.from_pretrained(name_or_path))


def apply_freeze_policy(model: torch.nn.Module, policy: str) -> ParameterCounts:
    """Set requires_grad by policy.

    `connector_only`: only the projector learns (LLaVA pre-training);
    `vision_tower`: the vision tower is frozen, connector and LM learn (fine-tuning, the paper's setting);
    `none`: everything learns (LLaVA-NeXT style). Which parameters are the connector and the tower is the
    family's (workloads/families.py: LLaVA-NeXT's `image_newline` is connector, Qwen2-VL's `visual.merger`).
    """
    from workloads.families import FAMILIES

    if policy not in FREEZE_POLICIES:
        raise ValueError(f"unknown freeze policy {policy!r}; expected one of {FREEZE_POLICIES}")
    family = FAMILIES.get(getattr(model.config, "model_type", None), FAMILIES["llava"])  # LLaVA's names otherwise
    for name, param in model.named_parameters():
        if policy == "connector_only":
            param.requires_grad = family.is_connector(name)
        elif policy == "vision_tower":
            param.requires_grad = not family.is_vision_tower(name)
        else:
            param.requires_grad = True
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ParameterCounts(trainable=trainable, total=sum(p.numel() for p in model.parameters()))


# ---------------------------------------------------------------- TinyLLaVA-style composition


def llava_config(
    text_config,
    vision_config,
    *,
    image_token_id: int,
    vision_feature_layer: int = -2,
    projector_hidden_act: str = "gelu",
):
    """A `LlavaConfig` joining any causal LM config and a CLIP or SigLIP vision config.

    SigLIP has no CLS token, so its features are all kept ("full"); CLIP drops
    CLS ("default"), as LLaVA-1.5 does.
    """
    from transformers import LlavaConfig

    if hasattr(vision_config, "vision_config"):  # a whole CLIP/SigLIP config: keep its vision half
        vision_config = vision_config.vision_config
    if "siglip" in str(vision_config.model_type):
        vision_config.vision_use_head = False  # the pooling head feeds nothing in LLaVA
    strategy = "default" if _has_cls_token(vision_config) else "full"
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act=projector_hidden_act,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    config.image_seq_length = num_image_tokens(config)
    return config


def tinyllava_config(*, text: dict | None = None, vision: dict | None = None, image_token_id: int | None = None):
    """TinyLLaVA-Qwen2-0.5B-SigLIP's shape (Qwen2-0.5B LM, SigLIP-so400m/14 at 384 px), overridable per part."""
    from transformers import Qwen2Config, SiglipVisionConfig

    text_config = Qwen2Config(**{**QWEN2_0_5B, **(text or {})})
    vision_config = SiglipVisionConfig(**{**SIGLIP_SO400M_384, **(vision or {})})
    token = image_token_id if image_token_id is not None else text_config.vocab_size - 1
    return llava_config(text_config, vision_config, image_token_id=token)


def _load_vision_weights(target, source) -> None:
    """Copy a pretrained tower (a whole CLIP/SigLIP model or its vision half) into LLaVA's vision tower."""
    target = getattr(target, "vision_model", target)
    source_state = getattr(source, "vision_model", source).state_dict()
    wanted = target.state_dict()
    missing = sorted(set(wanted) - set(source_state))
    unexpected = sorted(
        k for k in set(source_state) - set(wanted) if not k.startswith("head.")
    )  # the unused pooling head
    if missing or unexpected:
        raise ValueError(f"vision tower weights don't fit: missing {missing}, unexpected {unexpected}")
    target.load_state_dict({k: source_state[k] for k in wanted})


def compose_llava(
    out_dir: str | Path,
    language_model: str,
    vision_tower: str,
    *,
    vision_feature_layer: int = -2,
    projector_hidden_act: str = "gelu",
    seed: int = 0,
) -> Path:
    """Join a pretrained causal LM and a pretrained vision tower (hub ids or local folders) into a
    `LlavaForConditionalGeneration` with a fresh connector, the TinyLLaVA recipe; writes model,
    tokenizer (with `<image>` added) and a `LlavaProcessor` to `out_dir` and returns it."""
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModel,
        AutoModelForCausalLM,
        AutoTokenizer,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    out_dir = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(language_model)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lm = AutoModelForCausalLM.from_pretrained(language_model, dtype=torch.float32)
    tower = AutoModel.from_pretrained(vision_tower, dtype=torch.float32)

    text_config = lm.config
    text_config.vocab_size = max(text_config.vocab_size, len(tokenizer))
    text_config.pad_token_id = tokenizer.pad_token_id
    config = llava_config(
        text_config,
        AutoConfig.from_pretrained(vision_tower),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=vision_feature_layer,
        projector_hidden_act=projector_hidden_act,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    lm.resize_token_embeddings(text_config.vocab_size)
    missing, unexpected = model.model.language_model.load_state_dict(lm.model.state_dict(), strict=False)
    if missing or unexpected:
        raise ValueError(f"language model {language_model}: missing {missing}, unexpected {unexpected}")
    head = lm.lm_head.state_dict()
    if head.pop("bias", None) is not None:  # Phi-2's head has one; LlavaForConditionalGeneration's lm_head has none
        warnings.warn(
            f"{language_model}: the LM head's bias has no place in LlavaForConditionalGeneration and is dropped "
            "(fine-tuning the LM absorbs it)",
            stacklevel=2,
        )
    model.lm_head.load_state_dict(head)
    _load_vision_weights(model.model.vision_tower, tower)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = lm.generation_config.eos_token_id or tokenizer.eos_token_id

    image_processor = AutoImageProcessor.from_pretrained(vision_tower)
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1 if _has_cls_token(config.vision_config) else 0,
        image_token=IMAGE_TOKEN,
        chat_template=tokenizer.chat_template,
    )
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------- FLOPs and MFU

# Peak dense bf16 tensor-core FLOP/s by GPU name (first match wins); L2T_PEAK_TFLOPS overrides.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
)


def peak_flops(device_name: str) -> float | None:
    override = os.environ.get("L2T_PEAK_TFLOPS")
    if override:
        return float(override) * 1e12
    return next((v for k, v in PEAK_BF16_FLOPS if k in device_name), None)


def _matmul_params(module: torch.nn.Module) -> int:
    """Multiply-accumulates per token (or per patch) of a module's linear and conv layers."""
    total = 0
    for sub in module.modules():
        if isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d)):
            weight = sub.weight
            total += int(getattr(weight, "ds_numel", 0) or weight.numel())
    return total


@dataclass
class TrainingFlops:
    """Matmul FLOPs of a LLaVA training step (PaLM's MFU convention: no recomputation counted).

    Per LM token: 2·P forward, 2·P for activation gradients (always: the
    connector below the LM trains under every policy), 2·P for weight
    gradients if the LM trains; attention adds 4·L·d·s per token forward (QKᵀ
    and AV over the whole sequence of length s), doubled in backward. The vision
    tower runs forward per patch, and backward only if it trains. The LM head
    (`head_params` of `lm_params`) runs on `head_tokens` positions when given: the
    chunked loss applies it only where a target is scored.
    """

    lm_params: int
    lm_layers: int
    lm_hidden: int
    vision_params: int
    vision_layers: int
    vision_hidden: int
    vision_positions: int
    connector_params: int
    lm_trains: bool
    vision_trains: bool
    head_params: int = 0

    @classmethod
    def of(cls, model) -> "TrainingFlops":
        """From a LLaVA-style model (`model.model.{language_model, vision_tower, multi_modal_projector}`);
        other image-text models count as one language model without a tower."""
        config = model.config
        text = config.get_text_config()
        inner = getattr(model, "model", model)
        language_model = getattr(inner, "language_model", None)
        tower = getattr(inner, "vision_tower", None)
        projector = getattr(inner, "multi_modal_projector", None)
        vision = getattr(config, "vision_config", None)
        trains = lambda part: part is not None and any(p.requires_grad for p in part.parameters())  # noqa: E731
        if language_model is None or tower is None or vision is None:
            return cls(
                _matmul_params(model), text.num_hidden_layers, text.hidden_size, 0, 0, 0, 0, 0, trains(model), False
            )
        positions = (vision.image_size // vision.patch_size) ** 2 + (1 if _has_cls_token(vision) else 0)
        lm_head = getattr(model, "lm_head", None)
        return cls(
            lm_params=_matmul_params(language_model) + (_matmul_params(lm_head) if lm_head is not None else 0),
            lm_layers=text.num_hidden_layers,
            lm_hidden=text.hidden_size,
            vision_params=_matmul_params(tower),
            vision_layers=vision.num_hidden_layers,
            vision_hidden=vision.hidden_size,
            vision_positions=positions,
            connector_params=_matmul_params(projector) if projector is not None else 0,
            lm_trains=trains(language_model) or trains(lm_head),
            vision_trains=trains(tower),
            head_params=_matmul_params(lm_head) if lm_head is not None else 0,
        )

    def step(self, tokens: float, tokens_times_length: float, images: int, head_tokens: float | None = None) -> float:
        """FLOPs for `tokens` LM tokens in sequences whose Σ length² is `tokens_times_length`, plus `images`;
        the LM head on `head_tokens` positions (all `tokens` when None). `images=0` counts the LM alone."""
        lm_passes = 2 + (1 if self.lm_trains else 0)  # forward, activation grads, weight grads
        lm = 2 * self.lm_params * tokens * lm_passes
        if head_tokens is not None:
            lm -= 2 * self.head_params * (tokens - head_tokens) * lm_passes
        lm += 4 * self.lm_layers * self.lm_hidden * tokens_times_length * 3
        features = images * self.vision_positions
        vision_passes = 3 if self.vision_trains else 1
        vision = 2 * self.vision_params * features * vision_passes
        vision += 4 * self.vision_layers * self.vision_hidden * features * self.vision_positions * vision_passes
        connector = 2 * self.connector_params * features * (3 if self.vision_trains else 2)
        return float(lm + vision + connector)


def mfu(flops: float, seconds: float, world_size: int, device_name: str) -> float:
    peak = peak_flops(device_name)
    if not peak or seconds <= 0:
        return math.nan
    return flops / seconds / (peak * world_size)
