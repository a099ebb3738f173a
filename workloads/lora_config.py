"""The `model.lora` section: LoRA / QLoRA adapters through peft (applied in `workloads/lora.py`).

Its own module, like `masking_config.py`: `workloads/config.py` holds the sections of every run.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The language model's attention and MLP projections (Llama, Qwen2, Mistral, Vicuna names)."""
LORA_EXPORTS = ("merged", "adapter")
"""How a LoRA run's model is exported (see `ModelLoraConfig.export`)."""
LORA_QUANTIZATIONS = ("none", "4bit")
"""The base model's precision under LoRA (see `ModelLoraConfig.quantize`)."""


class ModelLoraConfig(_Strict):
    """LoRA / QLoRA through peft (`workloads/lora.py`): adapters on the language model's projections, the
    connector fully trained, everything else frozen."""

    enabled: bool = False
    """Train LoRA adapters instead of the full weights of `model.freeze`."""
    rank: int = Field(128, ge=1)
    """Rank r of each adapter (LLaVA-1.5's LoRA recipe: 128)."""
    alpha: float = Field(256.0, gt=0)
    """Scale: the adapter's update is multiplied by alpha / rank (LLaVA-1.5: 256)."""
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """Dropout on each adapter's input (LLaVA-1.5: 0.05)."""
    target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGET_MODULES), min_length=1)
    """Names of the language model's linear layers that get adapters (a layer matches when its qualified name
    ends with `.<name>`); only modules inside the language model match, never the vision tower's, though
    CLIP and SigLIP name theirs q_proj, k_proj, v_proj as well."""
    full_modules: list[str] | None = None
    """Modules trained in full beside the adapters (peft's modules_to_save), named like `target_modules`;
    unset: the connector (`multi_modal_projector`, Qwen2-VL's `visual.merger`); `[]`: none."""
    export: Literal[LORA_EXPORTS] = "merged"
    """`merged`: the adapters merged into the base weights, a plain `save_pretrained` model; `adapter`: the
    adapter weights with a pointer to the base model (`base_model_name_or_path`), which `from_pretrained`
    and l2t's evaluation load as base + adapter."""
    quantize: Literal[LORA_QUANTIZATIONS] = "none"
    """`4bit`: QLoRA, the base loaded in 4-bit NF4 by bitsandbytes (the vision tower, connector and LM head
    stay in `model.dtype`); needs a CUDA GPU (`train.use_gpu=true`) and `pip install bitsandbytes`."""

    @field_validator("target_modules", "full_modules")
    @classmethod
    def _module_names(cls, names):
        for name in names or ():
            if not name or not all(part.isidentifier() or part.isdigit() for part in name.split(".")):
                raise ValueError(f"{name!r} is not a module name (letters, digits, _ and dots; no patterns)")
        return names
