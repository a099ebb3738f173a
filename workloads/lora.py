"""LoRA and QLoRA through peft: adapters on the language model, the connector trained in full, the rest frozen.

Researchers without a node of 80 GB GPUs fine-tune LLaVA-style models with
LoRA, as LLaVA's and TinyLLaVA's scripts allow (`model.lora`,
`workloads.lora_config.ModelLoraConfig`). The rule with `model.freeze`: LoRA trains
its adapters and `model.lora.full_modules` (the connector unless set) and
freezes everything else, so the freeze policy must stay `vision_tower`
(the config refuses `connector_only` and `none` with LoRA).

Where the adapters go: `target_modules` are matched inside the language model
only (a regular expression anchored at its qualified name), because CLIP and
SigLIP towers name their projections `q_proj`, `k_proj`, `v_proj` too. A name
that matches nothing is refused with the layers it could have named.

The wrapped model: `apply_lora` runs peft's `get_peft_model` and hands back the
transformers model with the LoRA layers injected (peft's `PeftModel` wraps it
and is kept beside it for the export), so the training forward
(`workloads.forward`: `base_model` and the LM head), DeepSpeed's engine and its
checkpoints see the model as before; a checkpoint holds the adapter and
connector weights with the frozen base, and `load_checkpoint` restores them.

Export (`save_trained_model`, called by the train loop's `_export`):
`merged` merges the adapters into the base weights and saves a plain
`save_pretrained` model; `adapter` saves peft's adapter folder (its
`adapter_config.json` names the base in `base_model_name_or_path`) with the
base's config.json, so transformers' `from_pretrained` (evaluation's loader)
loads base + adapter from that folder and the tokenizer, processor and config
read from it as from any model folder.

QLoRA (`quantize: 4bit`): the base is loaded in 4-bit NF4 by bitsandbytes
(`quantized_loading`, the vision tower, connector and LM head kept in
`model.dtype`); it needs a CUDA GPU and bitsandbytes, and is refused with a
message naming `model.lora.quantize` anywhere else. Its merged export merges
the adapter into the base reloaded in full precision on CPU.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workloads.config import ModelConfig
from workloads.lora_config import ModelLoraConfig
from workloads.model import ParameterCounts

logger = logging.getLogger(__name__)

CONNECTOR_MODULES = ("multi_modal_projector", "visual.merger")
"""The connector of each family (LLaVA and LLaVA-NeXT; Qwen2-VL), the default `full_modules`."""
VISION_TOWER_MODULES = ("vision_tower", "visual", "vision_model")
"""Names of the vision tower's root module across families."""
QUANTIZED_SKIP_MODULES = ("vision_tower", "visual", "multi_modal_projector", "lm_head")
"""Modules that QLoRA leaves in `model.dtype` (bitsandbytes matches them by substring)."""
ADAPTER_CONFIG_FILE = "adapter_config.json"
"""peft's adapter folder marker; it names the base model in `base_model_name_or_path`."""
LORA_RUN_ATTRIBUTE = "_l2t_lora"
"""Where `apply_lora` keeps its `LoraRun` on the model it returns (not a submodule: no state, no recursion)."""


@dataclass
class LoraPlan:
    """Where the adapters go and what else trains, resolved against a model."""

    language_model: str
    """Qualified name of the language model module."""
    target_pattern: str
    """peft's `target_modules` as a regular expression (full match on qualified module names)."""
    targets: list[str]
    """Qualified names of the linear layers that get adapters."""
    full_modules: list[str]
    """Qualified names of the modules trained in full (peft's `modules_to_save`)."""


@dataclass
class LoraRun:
    """What the export needs of a LoRA model: peft's wrapper and the export kind."""

    peft_model: Any
    export: str


def _named(name: str, qualified: str) -> bool:
    return qualified == name or qualified.endswith("." + name)


def _holds(name: str, inner: str | None) -> bool:
    """Whether module `name` is module `inner` or holds it."""
    return inner is not None and (inner == name or inner.startswith(name + "."))


def _root_name(model: torch.nn.Module, module: torch.nn.Module | None) -> str | None:
    return next((n for n, m in model.named_modules() if m is module), None) if module is not None else None


def language_model_name(model: torch.nn.Module) -> str:
    """Qualified name of the language model (the decoder without its head)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    name = _root_name(model, decoder)
    if not name:
        name = next((n for n, _ in model.named_modules() if n.split(".")[-1] == "language_model"), None)
    if not name:
        raise ValueError(f"model.lora: {type(model).__name__} has no language model module to put adapters in")
    return name


def vision_tower_name(model: torch.nn.Module) -> str | None:
    """Qualified name of the vision tower's root, or None for a text-only model."""
    return next((n for n, _ in model.named_modules() if n.split(".")[-1] in VISION_TOWER_MODULES), None)


def plan_lora(model: torch.nn.Module, lora: ModelLoraConfig) -> LoraPlan:
    """Resolve `model.lora.target_modules` and `full_modules` against `model`; errors name the key."""
    lm = language_model_name(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(lm + ".")]
    unmatched = [t for t in lora.target_modules if not any(_named(t, n) for n in linears)]
    if unmatched:
        candidates = sorted({n.split(".")[-1] for n in linears})
        raise ValueError(
            f"model.lora.target_modules: {unmatched} name no linear layer of the language model ({lm}); "
            f"its linear layers are {candidates}"
        )
    alternatives = "|".join(re.escape(t) for t in lora.target_modules)
    pattern = rf"^{re.escape(lm)}\.(?:.*\.)?(?:{alternatives})$"
    targets = [n for n in linears if re.fullmatch(pattern, n)]
    return LoraPlan(lm, pattern, targets, _full_modules(model, lora, lm))


def _full_modules(model: torch.nn.Module, lora: ModelLoraConfig, lm: str) -> list[str]:
    names = [n for n, _ in model.named_modules() if n]
    if lora.full_modules is None:
        connector = next((n for n in names for c in CONNECTOR_MODULES if _named(c, n)), None)
        if connector is None:
            logger.warning("model.lora.full_modules: no connector (%s); only the adapters train", CONNECTOR_MODULES)
        return [connector] if connector else []
    tower = vision_tower_name(model)
    resolved = []
    for wanted in lora.full_modules:
        found = [n for n in names if _named(wanted, n)]
        if not found:
            shallow = sorted(n for n in names if n.count(".") <= 1 and n != lm and not _holds(n, tower))
            raise ValueError(f"model.lora.full_modules: {wanted!r} names no module of the model; candidates {shallow}")
        for name in found:
            if name == lm or _holds(name, tower):
                part = "the language model, which LoRA adapts" if name == lm else f"the vision tower ({tower})"
                raise ValueError(
                    f"model.lora.full_modules: {wanted!r} holds {part}; with LoRA, model.freeze=vision_tower keeps "
                    "the vision tower and the language model's base weights frozen"
                )
        resolved.extend(found)
    return resolved


def quantization_problem(use_gpu: bool) -> str | None:
    """Why QLoRA's 4-bit base can't be loaded here, or None when it can."""
    if not use_gpu:
        return "needs train.use_gpu=true"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU and this process sees none"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "needs bitsandbytes (pip install bitsandbytes)"
    return None


def _refuse_quantization(lora: ModelLoraConfig, use_gpu: bool) -> None:
    problem = quantization_problem(use_gpu) if lora.enabled and lora.quantize != "none" else None
    if problem:
        raise ValueError(
            f"model.lora.quantize={lora.quantize}: QLoRA's 4-bit base {problem}; on CPU set "
            "model.lora.quantize=none (LoRA on a full-precision base)"
        )


def quantized_loading(model: ModelConfig, dtype: torch.dtype, *, use_gpu: bool) -> dict[str, Any]:
    """More `from_pretrained` arguments for QLoRA's 4-bit base; {} unless `model.lora.quantize` is `4bit`."""
    lora = model.lora
    if not lora.enabled or lora.quantize == "none":
        return {}
    _refuse_quantization(lora, use_gpu)
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=list(QUANTIZED_SKIP_MODULES),
    )
    return {"quantization_config": quantization, "device_map": {"": torch.cuda.current_device()}}


def parameter_counts(model: torch.nn.Module) -> ParameterCounts:
    """Trainable and all parameters (peft's copy of each full module counted once more in `total`)."""
    params = list(model.parameters())
    return ParameterCounts(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))


def apply_lora(model: torch.nn.Module, config: ModelConfig, *, use_gpu: bool = False) -> torch.nn.Module:
    """`model` with LoRA adapters per `config.lora` (itself, untouched, when LoRA is off); logs what trains."""
    lora = config.lora
    if not lora.enabled:
        return model
    from peft import LoraConfig, get_peft_model

    _refuse_quantization(lora, use_gpu)
    plan = plan_lora(model, lora)
    peft_config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=plan.target_pattern,
        modules_to_save=plan.full_modules or None,
        bias="none",
    )
    peft_model = get_peft_model(model, peft_config)
    wrapped = peft_model.base_model.model
    object.__setattr__(wrapped, LORA_RUN_ATTRIBUTE, LoraRun(peft_model, lora.export))
    counts = parameter_counts(wrapped)
    logger.info(
        "LoRA r=%d alpha=%g on %d linear layers of %s, in full %s: %d of %d parameters train (%.2f%%)",
        lora.rank,
        lora.alpha,
        len(plan.targets),
        plan.language_model,
        plan.full_modules or "nothing",
        counts.trainable,
        counts.total,
        100.0 * counts.trainable / max(1, counts.total),
    )
    return wrapped


def lora_run_of(model: torch.nn.Module) -> LoraRun | None:
    """The `LoraRun` of a model `apply_lora` returned, or None for a model without LoRA."""
    return model.__dict__.get(LORA_RUN_ATTRIBUTE)


def check_lora_launch(config: ModelConfig, model_dir: str, zero_stage: int, *, use_gpu: bool) -> None:
    """The driver's checks before a fit: target and full modules resolve (on an empty meta-device copy of the
    model, so nothing is loaded), ZeRO-3 is not asked for, QLoRA can run. Raises ValueError naming the key."""
    lora = config.lora
    if not lora.enabled:
        return
    if zero_stage == 3:
        raise ValueError(
            "model.lora.enabled with a ZeRO-3 train.deepspeed config: LoRA runs under ZeRO-0/1/2 "
            "(configs/deepspeed/zero2.json); its frozen base needs no partitioned optimizer state"
        )
    if lora.quantize != "none" and not use_gpu:
        _refuse_quantization(lora, use_gpu)
    from transformers import AutoConfig, AutoModelForImageTextToText

    with torch.device("meta"):
        empty = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(model_dir))
    plan_lora(empty, lora)


def save_trained_model(model: torch.nn.Module, target: Path, state_dict: dict | None = None) -> None:
    """The trained model as a `save_pretrained` folder: with LoRA, merged into the base or as an adapter with its
    base's pointer and config (`model.lora.export`); without, as it is (`state_dict`: ZeRO-3's consolidated one)."""
    run = lora_run_of(model)
    if run is None:
        model.save_pretrained(target, state_dict=state_dict)
        return
    if state_dict is not None:
        raise ValueError("model.lora.enabled: LoRA's export runs under ZeRO-0/1/2, not ZeRO-3")
    peft_model = run.peft_model
    if run.export == "adapter":
        peft_model.save_pretrained(target)  # no config.json: transformers then loads the base it points to
    elif getattr(model, "is_loaded_in_4bit", False):
        with tempfile.TemporaryDirectory(prefix="l2t-adapter-") as tmp:
            peft_model.save_pretrained(tmp)
            merge_adapter_folder(tmp, target)
    else:
        merged = peft_model.merge_and_unload()  # in place: the run is over
        merged.save_pretrained(target)


def adapter_base(model_dir: str | Path) -> str | None:
    """The base model an adapter folder points to (`base_model_name_or_path`), or None for a model folder."""
    path = Path(model_dir, ADAPTER_CONFIG_FILE)
    if not path.is_file():
        return None
    return json.loads(path.read_text())["base_model_name_or_path"]


def merge_adapter_folder(adapter_dir: str | Path, target: Path, dtype: torch.dtype | None = None) -> Path:
    """Merge an adapter folder into its base, loaded in full precision on CPU, and save it to `target`."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForImageTextToText

    base_path = PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    base = AutoModelForImageTextToText.from_pretrained(base_path, dtype=dtype or torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(target)
    return target
