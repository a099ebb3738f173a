"""The λ-weighted L2T loss, normalized per optimizer step.

`w_t` is token t's weight from its segment, the masking mode, the step's (λ_I, λ_A)
and the per-segment overrides; a token is *trained* when `w_t > 0`. Three
normalizations (`masking.normalize`), each over the whole optimizer step (every
gradient-accumulation micro-batch of every data-parallel rank):

- `tokens` (default; LLaVA's and Hugging Face's rule): Σ_t w_t · nll_t / N, N = trained tokens;
- `weight`: Σ_t w_t · nll_t / Σ_t w_t;
- `per_part`: Σ_{t∈I} w_t · nll_t / N_I + Σ_{t∈A} w_t · nll_t / N_A, I the instruction side (system,
  role, instruction, task template), A the response side (response, end of turn), N_I / N_A the
  trained tokens of each part; a part without trained tokens contributes 0. With the mode's uniform
  weights this is λ_I · mean_I + λ_A · mean_A, so λ means the same whatever the parts' token ratio.

Every normalization is a sum over tokens of `w_t · nll_t / d_t` with a denominator
`d_t` fixed for the whole step, so the step's loss and gradient are the same
however its batch is split. `step_denominators` counts one micro-batch's share of
every denominator at once ([N, Σw, N_I, N_A]); the caller sums them over its
micro-batches, all-reduces the sum over ranks (one collective) and hands it to
`l2t_loss` for each micro-batch. The weight table never weights IMAGE or PAD, so
every trained token is in one part.

Token t's weight applies to predicting token t, so logits at position t-1 are
scored against token t (the usual causal shift).

How nll_t is computed does not change the loss (`l2t_loss_from_nll` takes it from
any kernel): `token_nll` from full logits; `chunked_nll` from the LM's last hidden
states, through the LM head and cross-entropy a chunk of positions at a time with
the chunk's logits recomputed in backward (`torch.utils.checkpoint`), so the
float32 [tokens, vocab] logits (20 GB at 16 x 2048 tokens and Qwen2's 151,936-token
vocabulary) never exist, only one chunk's; `liger_nll`, Liger's fused linear
cross-entropy, per token. Only *scored* targets need an nll (`scored_targets`: the
instruction and response sides, whose nll is trained or reported); image and pad
targets carry no weight and are reported nowhere, so the chunked kernels skip them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from workloads.segment_codes import INSTRUCTION_SEGMENTS, RESPONSE_SEGMENTS

NORMALIZE_TOKENS, NORMALIZE_WEIGHT, NORMALIZE_PER_PART = "tokens", "weight", "per_part"
DENOMINATORS = ("trained_tokens", "weight_sum", "trained_instruction", "trained_response")
"""The entries of `step_denominators`' vector, in order."""


@dataclass
class LossParts:
    """One micro-batch's contribution to the step loss, plus what is reported."""

    loss: torch.Tensor
    """Σ w·nll / d for this micro-batch (differentiable); summing over the step's micro-batches gives the step loss."""
    nll_instruction: torch.Tensor
    """Summed nll over instruction-side tokens (system, role, instruction, task template), whatever their weight."""
    tokens_instruction: torch.Tensor
    nll_response: torch.Tensor
    """Summed nll over response and end-of-turn tokens."""
    tokens_response: torch.Tensor


def shifted_targets(input_ids: torch.Tensor, segments: torch.Tensor, weights: torch.Tensor):
    """Targets, their segments and weights aligned with logits[:, :-1]."""
    return input_ids[:, 1:], segments[:, 1:], weights[:, 1:]


def part_masks(target_segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(instruction side, response side) boolean masks of segment codes."""
    device = target_segments.device
    is_instruction = torch.isin(target_segments, torch.tensor([int(s) for s in INSTRUCTION_SEGMENTS], device=device))
    is_response = torch.isin(target_segments, torch.tensor([int(s) for s in RESPONSE_SEGMENTS], device=device))
    return is_instruction, is_response


def count_trained_tokens(weights: torch.Tensor) -> torch.Tensor:
    """Tokens that carry loss in one micro-batch (after the causal shift)."""
    return (weights[:, 1:] > 0).sum()


def step_denominators(segments: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One micro-batch's [N, Σw, N_I, N_A] (`DENOMINATORS`) after the causal shift, float64, on its device.

    Sum it over the step's micro-batches and all-reduce over ranks before `l2t_loss`.
    """
    target_segments, target_weights = segments[:, 1:], weights[:, 1:].double()
    trained = target_weights > 0
    is_instruction, is_response = part_masks(target_segments)
    return torch.stack(
        [trained.sum(), target_weights.sum(), (trained & is_instruction).sum(), (trained & is_response).sum()]
    ).double()


def _positive_or_one(value: torch.Tensor) -> torch.Tensor:
    return torch.where(value > 0, value, torch.ones_like(value))


def normalized_sum(
    nll: torch.Tensor,
    target_segments: torch.Tensor,
    target_weights: torch.Tensor,
    denominators: torch.Tensor | int | float,
    normalize: str,
) -> torch.Tensor:
    """Σ_t w_t · nll_t / d_t over one micro-batch's targets, with the step's denominators.

    `denominators` is the step's all-reduced `step_denominators` sum, or, for `tokens` only, the bare N.
    """
    totals = torch.as_tensor(denominators, device=nll.device, dtype=torch.float64)
    weighted = nll * target_weights.to(nll.dtype)
    if totals.dim() == 0 and normalize != NORMALIZE_TOKENS:
        raise ValueError(f"normalize={normalize!r} needs the step's {DENOMINATORS} vector, not a bare count")
    if normalize == NORMALIZE_TOKENS:
        return weighted.sum() / _positive_or_one(totals if totals.dim() == 0 else totals[0]).to(nll.dtype)
    if normalize == NORMALIZE_WEIGHT:
        return weighted.sum() / _positive_or_one(totals[1]).to(nll.dtype)
    if normalize == NORMALIZE_PER_PART:
        is_instruction, is_response = part_masks(target_segments)
        instruction = (weighted * is_instruction).sum() / _positive_or_one(totals[2]).to(nll.dtype)
        return instruction + (weighted * is_response).sum() / _positive_or_one(totals[3]).to(nll.dtype)
    raise ValueError(f"unknown normalization {normalize!r}; expected tokens, weight or per_part")


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-target negative log-likelihood, shape [batch, seq-1], in float32."""
    targets = input_ids[:, 1:]
    flat = logits[:, :-1].reshape(-1, logits.size(-1)).float()
    return F.cross_entropy(flat, targets.reshape(-1), reduction="none").view_as(targets)


def scored_targets(segments: torch.Tensor) -> torch.Tensor:
    """[batch, seq-1] boolean: targets whose nll is trained or reported (instruction and response sides)."""
    is_instruction, is_response = part_masks(segments[:, 1:])
    return is_instruction | is_response


def _head_nll(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")


def chunked_nll(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """nll (float32) of `targets` [n] from hidden states [n, hidden]: `head` and cross-entropy `chunk` rows at a
    time; with gradients, each chunk is checkpointed, so backward recomputes its logits instead of keeping them."""
    train = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    pieces = []
    for start in range(0, max(hidden.size(0), 1), chunk):  # one (maybe empty) chunk at least, so a graph exists
        h, t = hidden[start : start + chunk], targets[start : start + chunk]
        if train:
            pieces.append(checkpoint(_head_nll, head, h, t, use_reentrant=False, preserve_rng_state=False))
        else:
            pieces.append(_head_nll(head, h, t))
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


LIGER_MIN_VERSION = (0, 8, 2)
"""Liger's fused linear cross-entropy has a correct per-token (reduction="none") backward from 0.8.2 on."""


def liger_problem() -> str | None:
    """Why `liger_nll` can't run here, or None."""
    from importlib import metadata

    try:
        version = metadata.version("liger-kernel")
        import liger_kernel.transformers.functional  # noqa: F401
    except Exception as error:  # not installed, or no triton/CUDA build for this platform
        return f"liger-kernel is not usable here ({type(error).__name__}: {error}); pip install .[gpu] on a GPU machine"
    numbers = tuple(int(x) for x in version.split(".")[:3] if x.isdigit())
    if numbers < LIGER_MIN_VERSION:
        return f"liger-kernel {version} is too old: per-token losses need >= {'.'.join(map(str, LIGER_MIN_VERSION))}"
    return None


def liger_nll(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """nll (float32) of `targets` [n] from hidden states [n, hidden] with Liger's fused linear cross-entropy."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    nll = liger_fused_linear_cross_entropy(
        hidden.contiguous(), head.weight, targets.contiguous(), bias=head.bias, reduction="none"
    )
    return nll.float()


def l2t_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    segments: torch.Tensor,
    weights: torch.Tensor,
    denominators: torch.Tensor | int | float,
    normalize: str = NORMALIZE_TOKENS,
) -> LossParts:
    """The micro-batch's share of the step loss: Σ_t w_t · nll_t / d_t (see the module docstring).

    `denominators`: the step's [N, Σw, N_I, N_A] summed over micro-batches and ranks (`step_denominators`),
    or the bare step N with `normalize="tokens"`.
    """
    return l2t_loss_from_nll(token_nll(logits, input_ids), segments, weights, denominators, normalize)


def l2t_loss_from_nll(
    nll: torch.Tensor,
    segments: torch.Tensor,
    weights: torch.Tensor,
    denominators: torch.Tensor | int | float,
    normalize: str = NORMALIZE_TOKENS,
) -> LossParts:
    """`l2t_loss` from the per-target nll [batch, seq-1] of any kernel; unscored targets (image, pad) weigh 0
    and are reported nowhere, so their entries only need to be finite (the chunked kernels leave them 0)."""
    target_segments, target_weights = segments[:, 1:], weights[:, 1:]
    loss = normalized_sum(nll, target_segments, target_weights, denominators, normalize)

    with torch.no_grad():
        detached = nll.detach()
        is_instruction, is_response = part_masks(target_segments)
        parts = LossParts(
            loss=loss,
            nll_instruction=(detached * is_instruction).sum(),
            tokens_instruction=is_instruction.sum(),
            nll_response=(detached * is_response).sum(),
            tokens_response=is_response.sum(),
        )
    return parts
