"""One micro-batch of prepared rows as the tensors a training forward takes, padded or packed.

`collate` turns the rows Ray Data hands a worker (`input_ids`, `segments`,
`pixel_values` per row; `skipped_rows`, the rows dropped for a bad image, when the
ingest counted them) into tensors on the device: right-padded rows with a 2D
attention mask, or, with `train.packing`, the rows packed by `workloads/packing.py`
(position ids, and a 4D block-causal mask or, for FlashAttention, one flat row).
Besides the model's inputs it gives what the loss and the metrics need without a
device sync: `lengths` (tokens per row), `scored_index` (the flat positions of
[sequences, length-1] whose target is scored, `workloads.loss.scored_targets`,
computed from the segments on the host) and `skipped_rows`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from workloads.families import concatenate_pixels
from workloads.packing import block_causal_mask, pack_rows
from workloads.segment_codes import INSTRUCTION_SEGMENTS, RESPONSE_SEGMENTS, Segment
from workloads.visual_relevance import WEIGHT_SCALE

SCORED_SEGMENTS = np.array([int(s) for s in (*INSTRUCTION_SEGMENTS, *RESPONSE_SEGMENTS)])


def _row_images(batch: dict[str, Any]) -> list[np.ndarray | None]:
    images = batch.get("pixel_values")
    if images is None:
        images = [None] * len(batch["input_ids"])
    return [np.asarray(x, dtype=np.float32) if x is not None and len(x) else None for x in images]


def _padded(rows_ids: list[np.ndarray], rows_segments: list[np.ndarray], pad_token_id: int):
    length = max(len(x) for x in rows_ids)
    input_ids = np.full((len(rows_ids), length), pad_token_id, dtype=np.int64)
    segments = np.full((len(rows_ids), length), int(Segment.PAD), dtype=np.int64)
    for i, (ids, segs) in enumerate(zip(rows_ids, rows_segments)):
        input_ids[i, : len(ids)] = ids
        segments[i, : len(segs)] = segs
    return input_ids, segments


def _laid_out(rows_values: list, rows_segments: list[np.ndarray], packing: bool, packing_length: int | None):
    """Per-token float values of each row (`weight_scale`) laid out as the ids are, padded or packed: the rows'
    flat token indices go through the same layout, and padding (-1) reads 0."""
    starts = np.concatenate([[0], np.cumsum([len(s) for s in rows_segments])]).astype(np.int64)
    index = [np.arange(a, b) for a, b in zip(starts[:-1], starts[1:])]
    if packing:
        laid = pack_rows(index, rows_segments, -1, packing_length).input_ids
    else:
        laid = _padded(index, rows_segments, -1)[0]
    values = np.concatenate([*(np.asarray(v, np.float32) for v in rows_values), np.zeros(1, np.float32)])
    return values[laid]


def _image_grids(batch: dict[str, Any], rows: list[int], segments: torch.Tensor, packing: bool, device) -> dict:
    """The family's image grid of the rows with images (workloads/families.py), and for Qwen2-VL the
    `mm_token_type_ids` its M-RoPE positions are computed from (1 on image tokens, which segments mark)."""
    out = {}
    for key in ("image_sizes", "image_grid_thw"):
        if key in batch and rows:
            out[key] = torch.from_numpy(np.concatenate([np.asarray(batch[key][i]) for i in rows])).to(device)
    if "image_grid_thw" in out:
        if packing:
            raise ValueError("train.packing: Qwen2-VL's M-RoPE positions can't be packed; set train.packing=false")
        out["mm_token_type_ids"] = (segments == int(Segment.IMAGE)).int()
    return out


def collate(
    batch: dict[str, Any],
    pad_token_id: int,
    device: torch.device,
    *,
    packing: bool = False,
    packing_length: int | None = None,
    flat: bool = False,
    mask_dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Pad (or, with `packing`, pack) one micro-batch of prepared rows into tensors on `device`.

    Packed, `flat` lays the sequences end to end as one row without a mask (FlashAttention's variable-length
    path finds the rows from the position ids); otherwise the 4D additive mask is in `mask_dtype`.
    """
    rows_ids = [np.asarray(x) for x in batch["input_ids"]]
    rows_segments = [np.asarray(x) for x in batch["segments"]]
    images = _row_images(batch)
    out: dict[str, Any] = {}
    if packing:
        packed = pack_rows(rows_ids, rows_segments, pad_token_id, packing_length)
        input_ids, segments, order = packed.input_ids, packed.segments, packed.row_order
        position_ids, sequence_ids = packed.position_ids, packed.sequence_ids
        if flat:
            input_ids, segments, position_ids = (x.reshape(1, -1) for x in (input_ids, segments, position_ids))
        out["position_ids"] = torch.from_numpy(position_ids).to(device)
        mask = None if flat else block_causal_mask(torch.from_numpy(sequence_ids).to(device), mask_dtype)
    else:
        input_ids, segments = _padded(rows_ids, rows_segments, pad_token_id)
        order = list(range(len(rows_ids)))
        mask = None
    if WEIGHT_SCALE in batch:  # per-token multipliers of the segment weights (`l2t_visual`)
        scale = _laid_out(batch[WEIGHT_SCALE], rows_segments, packing, packing_length).reshape(segments.shape)
        out[WEIGHT_SCALE] = torch.from_numpy(scale).to(device)
    out["input_ids"] = torch.from_numpy(input_ids).to(device)
    out["segments"] = torch.from_numpy(segments).to(device)
    out["attention_mask"] = (out["segments"] != int(Segment.PAD)).long() if not packing else mask
    scored = np.isin(segments[:, 1:], SCORED_SEGMENTS).reshape(-1)
    out["scored_index"] = torch.from_numpy(np.flatnonzero(scored)).to(device)
    lengths = [int((s != int(Segment.PAD)).sum()) for s in rows_segments]
    out["lengths"] = torch.tensor(lengths, dtype=torch.float64, device=device)
    ordered = [images[i] for i in order if images[i] is not None]
    if ordered:
        out["pixel_values"] = torch.from_numpy(concatenate_pixels(ordered)).to(device)
    out.update(_image_grids(batch, [i for i in order if images[i] is not None], out["segments"], packing, device))
    out["skipped_rows"] = int(batch.get("skipped_rows", 0) or 0)
    return out
