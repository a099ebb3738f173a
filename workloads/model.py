"""Loading LLaVA-family models and choosing which of their parts learn.

Everything goes through transformers' `from_pretrained`, by Hugging Face id or
local folder, so the tiny preset built by `workloads.tiny_model` and a hub
checkpoint such as `llava-hf/llava-1.5-7b-hf` take the same path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FREEZE_POLICIES = ("connector_only", "vision_tower", "none")


@dataclass
class ParameterCounts:
    trainable: int
    total: int


def num_image_tokens(config) -> int:
    """Tokens one image occupies in the LM input, from a Llava config."""
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches + 1 if config.vision_feature_select_strategy == "full" else patches


def torch_dtype(name: str, use_gpu: bool) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if use_gpu else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def load_model(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "auto",
    gradient_checkpointing: bool = False,
):
    """A LLaVA-family model for training, by hub id or local folder."""
    from transformers import AutoModelForImageTextToText

    attention = "sdpa" if attn_implementation == "auto" else attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype, attn_implementation=attention)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model


def load_processor(name_or_path: str):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(name_or_path)


def apply_freeze_policy(model: torch.nn.Module, policy: str) -> ParameterCounts:
    """Set requires_grad by policy: `connector_only`, `vision_tower` (frozen) or `none`."""
    if policy not in FREEZE_POLICIES:
        raise ValueError(f"unknown freeze policy {policy!r}; expected one of {FREEZE_POLICIES}")
    for name, param in model.named_parameters():
        if policy == "connector_only":
            param.requires_grad = "multi_modal_projector" in name
        elif policy == "vision_tower":
            param.requires_grad = "vision_tower" not in name
        else:
            param.requires_grad = True
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ParameterCounts(trainable=trainable, total=sum(p.numel() for p in model.parameters()))
