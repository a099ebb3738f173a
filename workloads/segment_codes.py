"""Segment codes and the weights made from them: the one leaf every masking module imports.

Every token carries one segment (system prompt, role marker, image, instruction,
task template, response, end of turn, pad). Preparation stores segments, never
weights, so one prepared data set serves a whole λ grid: the training step turns
segments into weights with the trial's masking mode and λ values (the segment
table in docs/design.md).
"""

from __future__ import annotations

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


MASKING_MODES = ("response", "l2t", "l2t_no_template")

# Which segments each mode trains, and with which λ ("I" instruction, "A" response).
_MODE_TABLE: dict[str, dict[Segment, str]] = {
    "response": {Segment.RESPONSE: "A", Segment.END_OF_TURN: "A"},
    "l2t": {
        Segment.SYSTEM: "I",
        Segment.ROLE: "I",
        Segment.INSTRUCTION: "I",
        Segment.TASK_TEMPLATE: "I",
        Segment.RESPONSE: "A",
        Segment.END_OF_TURN: "A",
    },
    "l2t_no_template": {
        Segment.INSTRUCTION: "I",
        Segment.RESPONSE: "A",
        Segment.END_OF_TURN: "A",
    },
}

INSTRUCTION_SEGMENTS = (Segment.SYSTEM, Segment.ROLE, Segment.INSTRUCTION, Segment.TASK_TEMPLATE)
RESPONSE_SEGMENTS = (Segment.RESPONSE, Segment.END_OF_TURN)


def segment_weight_table(mode: str, lambda_instruction: float, lambda_response: float) -> np.ndarray:
    """A lookup table `table[segment_code] -> weight` for one masking mode and λ pair."""
    if mode not in _MODE_TABLE:
        raise ValueError(f"unknown masking mode {mode!r}; expected one of {MASKING_MODES}")
    table = np.zeros(len(Segment), dtype=np.float32)
    lam = {"I": lambda_instruction, "A": lambda_response}
    for segment, which in _MODE_TABLE[mode].items():
        table[segment] = lam[which]
    return table


def token_weights(segments, mode: str, lambda_instruction: float = 1.0, lambda_response: float = 1.0):
    """Per-token loss weights from segment codes (numpy array or torch tensor, any shape)."""
    table = segment_weight_table(mode, lambda_instruction, lambda_response)
    if isinstance(segments, np.ndarray):
        return table[segments.astype(np.int64)]
    import torch

    return torch.as_tensor(table, device=segments.device)[segments.long()]
