"""Segment codes and the weights made from them: the one leaf every masking module imports.

Every token carries one segment (system prompt, role marker, image, instruction,
task template, response, end of turn, pad). Preparation stores segments, never
weights, so one prepared data set serves a whole λ grid: the training step turns
segments into weights with the trial's masking mode, λ values and per-segment
overrides (the segment table in docs/design.md). The λ schedules over steps are
`workloads.schedules`.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntEnum

import numpy as np


class Segment(IntEnum):
    """Compact segment codes, stored as int8 in the prepared Parquet shards."""

    PAD = 0
    SYSTEM = 1
    ROLE = 2
    IMAGE = 3
    INSTRUCTION = 4
    TASK_TEMPLATE = 5
    RESPONSE = 6
    END_OF_TURN = 7


MASKING_MODES = ("response", "l2t_full", "l2t_no_system", "l2t", "l2t_visual")
"""The paper's ablation ladder, weakest first: answers only (VIT), the full instruction, minus the system
template (system prompt and role markers), minus the task templates too (`l2t`, the paper's method); then
`l2t_visual`, the paper's future work: `l2t`'s segments with each instruction token's λ_I scaled by how much
the image tells about it (`workloads.visual_relevance`)."""
VISUAL_MODES = ("l2t_visual",)
"""Modes whose instruction weights also depend on each token's stored visual relevance, not on segments alone."""
RENAMED_MODES = {"l2t_no_template": "l2t"}
"""Earlier names of masking modes, refused with the new name."""

_RESPONSE_SIDE = {Segment.RESPONSE: "A", Segment.END_OF_TURN: "A"}
# Which segments each mode trains, and with which λ ("I" instruction, "A" response); IMAGE and PAD never.
_MODE_TABLE: dict[str, dict[Segment, str]] = {
    "response": dict(_RESPONSE_SIDE),
    "l2t_full": {
        Segment.SYSTEM: "I",
        Segment.ROLE: "I",
        Segment.INSTRUCTION: "I",
        Segment.TASK_TEMPLATE: "I",
        **_RESPONSE_SIDE,
    },
    "l2t_no_system": {Segment.INSTRUCTION: "I", Segment.TASK_TEMPLATE: "I", **_RESPONSE_SIDE},
    "l2t": {Segment.INSTRUCTION: "I", **_RESPONSE_SIDE},
    "l2t_visual": {Segment.INSTRUCTION: "I", **_RESPONSE_SIDE},  # times g(relevance) per instruction token
}

INSTRUCTION_SEGMENTS = (Segment.SYSTEM, Segment.ROLE, Segment.INSTRUCTION, Segment.TASK_TEMPLATE)
"""The instruction side (part I of the `per_part` normalization), whatever the mode trains of it."""
RESPONSE_SEGMENTS = (Segment.RESPONSE, Segment.END_OF_TURN)
"""The response side (part A)."""
WEIGHTED_SEGMENTS = INSTRUCTION_SEGMENTS + RESPONSE_SEGMENTS
"""Segments a per-segment weight can be set for (`masking.weights.<name>`): never IMAGE or PAD."""


def segment_weight_table(
    mode: str,
    lambda_instruction: float,
    lambda_response: float,
    overrides: Mapping[str, float | None] | None = None,
) -> np.ndarray:
    """A lookup table `table[segment_code] -> weight` for one masking mode and λ pair.

    `overrides` maps segment names (`system`, `role`, `instruction`, `task_template`, `response`,
    `end_of_turn`, as in `MaskingConfig.weights.model_dump()`) to an absolute weight that replaces the
    mode's entry (not scaled by λ); None keeps the mode's entry.
    """
    if mode not in _MODE_TABLE:
        hint = f" (renamed {RENAMED_MODES[mode]!r})" if mode in RENAMED_MODES else ""
        raise ValueError(f"unknown masking mode {mode!r}{hint}; expected one of {MASKING_MODES}")
    table = np.zeros(len(Segment), dtype=np.float32)
    lam = {"I": lambda_instruction, "A": lambda_response}
    for segment, which in _MODE_TABLE[mode].items():
        table[segment] = lam[which]
    names = {segment.name.lower(): segment for segment in WEIGHTED_SEGMENTS}
    for name, weight in (overrides or {}).items():
        if name not in names:
            raise ValueError(f"no per-segment weight for {name!r}; expected one of {tuple(names)}")
        if weight is not None:
            if weight < 0:
                raise ValueError(f"weight of {name!r} is {weight}; weights are >= 0")
            table[names[name]] = weight
    return table


def weights_from_table(segments, table: np.ndarray, scale=None):
    """Per-token weights `table[segments]` (numpy array or torch tensor of segment codes, any shape), times
    `scale` (per-token multipliers of the same shape, e.g. `l2t_visual`'s g(relevance)) when given."""
    if isinstance(segments, np.ndarray):
        weights = table[segments.astype(np.int64)]
        return weights if scale is None else weights * np.asarray(scale, dtype=np.float32)
    import torch

    weights = torch.as_tensor(table, device=segments.device)[segments.long()]
    return weights if scale is None else weights * scale.to(weights.dtype)


def token_weights(
    segments,
    mode: str,
    lambda_instruction: float = 1.0,
    lambda_response: float = 1.0,
    overrides: Mapping[str, float | None] | None = None,
):
    """Per-token loss weights from segment codes (numpy array or torch tensor, any shape)."""
    return weights_from_table(segments, segment_weight_table(mode, lambda_instruction, lambda_response, overrides))


def token_shares(tokens_by_segment: Mapping[str, int]) -> dict[str, dict[str, float]]:
    """Per masking mode, what it trains of a prepared set's tokens (the manifest's ``tokens_by_segment``):
    ``{"trained": tokens with a nonzero weight at λ_I = λ_A = 1, "instruction": their instruction-side share,
    "response": their response-side share (response + end of turn)}``. `VISUAL_MODES` are left out: which of
    their tokens train depends on the stored relevance, not on segment counts (at most `l2t`'s)."""
    counts = {segment: int(tokens_by_segment.get(segment.name.lower(), 0)) for segment in Segment}
    shares = {}
    for mode in (m for m in MASKING_MODES if m not in VISUAL_MODES):
        table = segment_weight_table(mode, 1.0, 1.0)
        trained = sum(n for segment, n in counts.items() if table[segment] > 0)
        response = sum(counts[segment] for segment in RESPONSE_SEGMENTS if table[segment] > 0)
        shares[mode] = {
            "trained": trained,
            "instruction": (trained - response) / trained if trained else 0.0,
            "response": response / trained if trained else 0.0,
        }
    return shares
