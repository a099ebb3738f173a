"""The training forward: one micro-batch's per-target nll, computed inside DeepSpeed's engine call.

`train.loss_kernel` (`workloads/loss.py` has the kernels):

- `chunked` (default): the model's base (`model.base_model`, for LLaVA the
  `LlavaModel`: vision tower, connector, LM without its head) gives the LM's last
  hidden states; the output embeddings (`model.get_output_embeddings()`, the
  `lm_head`) and cross-entropy run over the scored positions only,
  `train.loss_chunk_tokens` at a time, each chunk recomputed in backward;
- `liger`: the same hidden states through Liger's fused linear cross-entropy;
- `full`: the model's own forward, full logits, `token_nll`.

This is what transformers' forward does too (LLaVA: `lm_head(last_hidden_state)`,
`logits_to_keep` only slices positions), so the nll is the same; families whose
forward does more after the head (logit soft-capping, a logit scale) are refused
for the fused kernels.

DeepSpeed starts its backward bookkeeping (ZeRO's accumulation-boundary flag,
the gradient hooks' state) from hooks on the tensors its engine call returns, so
everything that touches parameters, the LM head included, runs inside that call:
`engine_nll` makes the wrapped model's forward, for the one call, return the nll.
The model stays the Hugging Face model (checkpoints and the export unchanged).
"""

from __future__ import annotations

from typing import Any

import torch

from workloads.loss import chunked_nll, liger_nll, liger_problem, token_nll

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "pixel_values")
MODEL_INPUTS += ("image_sizes", "image_grid_thw", "mm_token_type_ids")  # the families' (workloads/families.py)


def check_loss_kernel(kernel: str, model, *, use_gpu: bool, zero_stage: int) -> None:
    """Refuse a kernel that can't run here, with what to do instead."""
    if kernel == "full":
        return
    text = model.config.get_text_config()
    for name in ("final_logit_softcapping", "logit_scale"):
        if getattr(text, name, None) not in (None, 1.0):
            raise ValueError(
                f"train.loss_kernel={kernel}: this model's forward applies {name} after the LM head; "
                "use train.loss_kernel=full"
            )
    if getattr(model, "base_model", model) is model or model.get_output_embeddings() is None:
        raise ValueError(
            f"train.loss_kernel={kernel}: {type(model).__name__} has no separate base model and LM "
            "head; use train.loss_kernel=full"
        )
    if kernel == "liger":
        problem = None if use_gpu else "Liger's kernels need a GPU (train.use_gpu=true)"
        problem = problem or liger_problem()
        if not problem and zero_stage == 3:
            problem = "ZeRO-3 partitions the LM head, which Liger reads directly; use ZeRO-2 or loss_kernel=chunked"
        if problem:
            raise ValueError(f"train.loss_kernel=liger: {problem}")


def model_inputs(batch: dict[str, Any], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The forward's keyword arguments from a collated micro-batch (pixel values in the model's dtype)."""
    inputs = {k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


def training_nll(model, *, scored_index: torch.Tensor | None, kernel: str, chunk_tokens: int, **inputs) -> torch.Tensor:
    """Per-target nll [batch, seq-1] (float32) of `model` on `inputs`; with `scored_index` (flat positions of
    [batch, seq-1]) the fused kernels score those targets only and leave 0 elsewhere."""
    input_ids = inputs["input_ids"]
    if kernel == "full" or (kernel == "chunked" and chunk_tokens == 0):
        logits = type(model).forward(model, **inputs, use_cache=False).logits
        return token_nll(logits, input_ids)
    hidden = model.base_model(**inputs, use_cache=False)[0]
    hidden = hidden[:, :-1].reshape(-1, hidden.size(-1))
    targets = input_ids[:, 1:].reshape(-1)
    if scored_index is not None:
        hidden, targets = hidden.index_select(0, scored_index), targets.index_select(0, scored_index)
    head = model.get_output_embeddings()
    nll = liger_nll(hidden, head, targets) if kernel == "liger" else chunked_nll(hidden, head, targets, chunk_tokens)
    if scored_index is None:
        return nll.view(input_ids.size(0), -1)
    every = torch.zeros(input_ids[:, 1:].numel(), dtype=nll.dtype, device=nll.device)
    return every.index_copy(0, scored_index, nll).view(input_ids.size(0), -1)


def engine_nll(engine, batch: dict[str, Any], dtype: torch.dtype, kernel: str, chunk_tokens: int) -> torch.Tensor:
    """`training_nll` of a collated micro-batch through DeepSpeed's engine call (see the module docstring)."""
    model = engine.module

    def forward(**inputs):
        return training_nll(
            model, scored_index=batch.get("scored_index"), kernel=kernel, chunk_tokens=chunk_tokens, **inputs
        )

    previous = model.__dict__.get("forward")
    model.forward = forward  # an instance attribute: the engine's `self.module(...)` calls it, for this call only
    try:
        return engine(**model_inputs(batch, dtype))
    finally:
        if previous is None:
            del model.forward
        else:
            model.forward = previous
