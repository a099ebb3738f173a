"""Packing a micro-batch's rows into fixed-length sequences, attention kept inside each row.

The data plan is untouched (`workloads/batching.py`): a step trains the same rows
whether or not they are packed; only their layout inside a micro-batch changes.
`pack_rows` places the rows by first-fit decreasing length into as few sequences
of `length` positions as hold them, no row split across two; the tail of each
sequence is filler. Unless `train.packing_length` fixes it, the length is the one
of a few multiples of the longest row whose bins take the fewest positions. Every
row keeps its own positions (position ids restart at 0) and sees only itself:

- with FlashAttention the sequences are laid end to end as one row (`flat`): the
  position ids restart at every row, which transformers turns into the
  variable-length kernel's cu_seqlens (`_is_packed_sequence`, one row only);
- otherwise (eager, SDPA) `block_causal_mask` gives the 4D additive mask
  [sequences, 1, length, length], causal within a row and closed between rows,
  which transformers hands to the attention as it is.

Filler positions form a sequence of their own, so no query row is fully masked.
Segments make the loss the same as unpacked: a row's first token is never a target
unpacked (nothing precedes it), so packed its segment becomes PAD (the previous
row's last token must not learn to predict it); every other target, weight and
denominator is the row's own. Image features follow the image tokens in reading
order, so `row_order` (rows in packed order) orders the pixel values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from workloads.segment_codes import Segment

PACK_MULTIPLE = 8
"""Packed sequence lengths are multiples of this."""
LENGTH_FACTORS = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0)
"""Lengths tried, as multiples of the longest row, when no length is set."""


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Row indices per bin: longest row first, each into the first bin with room, a new bin when none has."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > capacity:
            raise ValueError(f"a row of {lengths[i]} tokens does not fit packed sequences of {capacity}")
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def _round_up(value: float, multiple: int) -> int:
    return -(-int(value) // multiple) * multiple


def packed_length(lengths: Sequence[int], length: int | None = None, multiple: int = PACK_MULTIPLE) -> int:
    """`length` when set (it must hold the longest row); else, of the longest row (rounded up to `multiple`)
    times each of `LENGTH_FACTORS`, the length whose first-fit-decreasing bins take the fewest positions
    (the shortest of equals: a 4D mask costs length² per sequence)."""
    longest = max(lengths)
    if length is not None:
        if longest > length:
            raise ValueError(f"a row of {longest} tokens is longer than train.packing_length={length}")
        return length
    candidates = sorted({_round_up(_round_up(longest, multiple) * f, multiple) for f in LENGTH_FACTORS})
    return min(candidates, key=lambda width: (len(first_fit_decreasing(lengths, width)) * width, width))


@dataclass
class Packed:
    """A micro-batch's rows packed into `input_ids.shape[0]` sequences (numpy, int64)."""

    input_ids: np.ndarray
    segments: np.ndarray
    """Each row's segments, its first token's PAD (never a target, as unpacked); filler PAD."""
    position_ids: np.ndarray
    """0, 1, ... within each row and within the filler."""
    sequence_ids: np.ndarray
    """Which row of its packed sequence each position holds (the filler: one more)."""
    row_order: list[int]
    """Row indices in packed order (sequence by sequence, left to right): the order of their images."""


def pack_rows(
    rows_ids: Sequence[np.ndarray], rows_segments: Sequence[np.ndarray], pad_token_id: int, length: int | None = None
) -> Packed:
    """Pack rows (token ids and segments per row) into as few sequences of `packed_length` as hold them."""
    lengths = [len(x) for x in rows_ids]
    width = packed_length(lengths, length)
    bins = first_fit_decreasing(lengths, width)
    shape = (len(bins), width)
    input_ids = np.full(shape, pad_token_id, dtype=np.int64)
    segments = np.full(shape, int(Segment.PAD), dtype=np.int64)
    position_ids = np.zeros(shape, dtype=np.int64)
    sequence_ids = np.zeros(shape, dtype=np.int64)
    for b, members in enumerate(bins):
        start = 0
        for k, i in enumerate(members):
            end = start + lengths[i]
            input_ids[b, start:end] = rows_ids[i]
            segments[b, start:end] = rows_segments[i]
            segments[b, start] = int(Segment.PAD)
            position_ids[b, start:end] = np.arange(lengths[i])
            sequence_ids[b, start:end] = k
            start = end
        position_ids[b, start:] = np.arange(width - start)
        sequence_ids[b, start:] = len(members)
    return Packed(input_ids, segments, position_ids, sequence_ids, [i for members in bins for i in members])


def block_causal_mask(sequence_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[n, 1, L, L] additive mask (0 allowed, dtype's min closed): causal, and only within a query's own row."""
    length = sequence_ids.size(-1)
    causal = torch.ones(length, length, dtype=torch.bool, device=sequence_ids.device).tril()
    allowed = (sequence_ids[:, :, None] == sequence_ids[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=sequence_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
