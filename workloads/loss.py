"""The λ-weighted L2T loss, normalized per optimizer step.

    loss = Σ_t w_t · nll_t / N

`w_t` comes from the token's segment, the masking mode and (λ_I, λ_A);
`N` is the number of tokens with `w_t > 0` in the whole optimizer step:
summed over gradient-accumulation micro-batches and data-parallel ranks. With
that `N`, the step's gradient is the same however the batch is split; the
caller passes `N` in (it has to see every micro-batch of the step first).

Token t's weight applies to predicting token t, so logits at position t-1 are
scored against token t (the usual causal shift).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workloads.segment_codes import INSTRUCTION_SEGMENTS, RESPONSE_SEGMENTS


@dataclass
class LossParts:
    """One micro-batch's contribution to the step loss, plus what is reported."""

    loss: torch.Tensor
    """Σ w·nll / N for this micro-batch (differentiable); summing over the step's micro-batches gives the step loss."""
    nll_instruction: torch.Tensor
    """Summed nll over instruction-side tokens (system, role, instruction, task template), whatever their weight."""
    tokens_instruction: torch.Tensor
    nll_response: torch.Tensor
    """Summed nll over response and end-of-turn tokens."""
    tokens_response: torch.Tensor


def shifted_targets(input_ids: torch.Tensor, segments: torch.Tensor, weights: torch.Tensor):
    """Targets, their segments and weights aligned with logits[:, :-1]."""
    return input_ids[:, 1:], segments[:, 1:], weights[:, 1:]


def count_trained_tokens(weights: torch.Tensor) -> torch.Tensor:
    """Tokens that carry loss in one micro-batch (after the causal shift)."""
    return (weights[:, 1:] > 0).sum()


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-target negative log-likelihood, shape [batch, seq-1], in float32."""
    targets = input_ids[:, 1:]
    flat = logits[:, :-1].reshape(-1, logits.size(-1)).float()
    return F.cross_entropy(flat, targets.reshape(-1), reduction="none").view_as(targets)


def l2t_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    segments: torch.Tensor,
    weights: torch.Tensor,
    trained_tokens_in_step: torch.Tensor | int,
) -> LossParts:
    """The micro-batch's share of the step loss (see the module docstring)."""
    nll = token_nll(logits, input_ids)
    _, target_segments, target_weights = shifted_targets(input_ids, segments, weights)
    denominator = torch.clamp(torch.as_tensor(trained_tokens_in_step, device=nll.device, dtype=nll.dtype), min=1.0)
    loss = (nll * target_weights.to(nll.dtype)).sum() / denominator

    with torch.no_grad():
        detached = nll.detach()
        is_instruction = torch.isin(
            target_segments, torch.tensor([int(s) for s in INSTRUCTION_SEGMENTS], device=nll.device)
        )
        is_response = torch.isin(target_segments, torch.tensor([int(s) for s in RESPONSE_SEGMENTS], device=nll.device))
        parts = LossParts(
            loss=loss,
            nll_instruction=(detached * is_instruction).sum(),
            tokens_instruction=is_instruction.sum(),
            nll_response=(detached * is_response).sum(),
            tokens_response=is_response.sum(),
        )
    return parts
