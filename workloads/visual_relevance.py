"""Visual relevance of instruction tokens, and the `l2t_visual` weights made from it.

Not every instruction token tells about the image: "red", "triangle" and "left of" can be predicted
from the picture, "What", "is" and "the" cannot. A reference model measures it per token, the
quantity evaluation reports over responses (workloads/evaluator.py), here over the instruction side:

    r_t = log p(x_t | V, prefix) - log p(x_t | V=∅, prefix)

from two teacher-forced passes over the row as prepared, with its image and with V=∅ (evaluation's
choice, `NULL_IMAGES`: seeded noise, a blank image, or no image tokens at all). Preparation stores r_t
per token (`RELEVANCE_COLUMN`, float16, 0 off the instruction side and in rows without an image;
orchestrator/relevance.py runs `RelevanceScorer` on Ray Data actors). `masking.mode=l2t_visual`
trains `l2t`'s segments with each INSTRUCTION token weighted λ_I · max(floor, g(r_t)) (`gains`,
`masking.visual`); the training step applies the factor to the segment weights (`with_weight_scales`
before collation, `weight_scale` after), so every normalization and per-segment override works as
for the other modes. Nothing here imports Ray.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from workloads.segment_codes import INSTRUCTION_SEGMENTS, VISUAL_MODES, Segment

RELEVANCE_COLUMN = "relevance"
"""The prepared shards' list<float16> column of per-token relevance (aligned with `input_ids`)."""
WEIGHT_SCALE = "weight_scale"
"""A micro-batch's per-row, then (collated) per-token, multipliers of the segment weights."""
TRANSFORMS = ("clip", "sigmoid", "rank")
_SCORED = np.array([int(s) for s in INSTRUCTION_SEGMENTS])


# ---------------------------------------------------------------- the math


def token_relevance(logp_with_image: np.ndarray, logp_null: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """r_t (float16) of one row: `logp_*[t]` is log p(token t | its prefix) (index 0, never a target, unused);
    instruction-side tokens (system, role, instruction, task template) get the difference, the others 0."""
    segments = np.asarray(segments)
    scored = np.isin(segments, _SCORED)
    scored[:1] = False
    out = np.zeros(len(segments), dtype=np.float32)
    out[scored] = np.asarray(logp_with_image, np.float32)[scored] - np.asarray(logp_null, np.float32)[scored]
    return out.astype(np.float16)


def _rank01(values: np.ndarray) -> np.ndarray:
    """Ranks scaled to [0, 1], ties sharing their mean rank; one value gets 1."""
    if len(values) <= 1:
        return np.ones(len(values), dtype=np.float32)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(len(values))
    unique, inverse = np.unique(values, return_inverse=True)
    if len(unique) < len(values):  # ties: the mean rank of each group
        ranks = (np.bincount(inverse, weights=ranks) / np.bincount(inverse))[inverse]
    return (ranks / (len(values) - 1)).astype(np.float32)


def transform(relevance: np.ndarray, kind: str, temperature: float = 1.0) -> np.ndarray:
    """g(r) of one row's values (float32): `clip` clip(r/τ, 0, 1), `sigmoid` sigmoid(r/τ), `rank` rank in [0, 1]."""
    r = np.asarray(relevance, dtype=np.float32)
    if kind == "clip":
        return np.clip(r / temperature, 0.0, 1.0)
    if kind == "sigmoid":
        return (1.0 / (1.0 + np.exp(-r.astype(np.float64) / temperature))).astype(np.float32)
    if kind == "rank":
        return _rank01(r)
    raise ValueError(f"masking.visual.transform={kind!r}; expected one of {TRANSFORMS}")


def gains(segments: np.ndarray, relevance: np.ndarray, kind: str, temperature: float, floor: float) -> np.ndarray:
    """Per-token factors of one row's segment weights: max(floor, g(r)) on INSTRUCTION tokens (g over the
    row's instruction tokens, which is what `rank` ranks among), 1 elsewhere."""
    segments = np.asarray(segments)
    relevance = np.asarray(relevance, dtype=np.float32)
    if len(relevance) != len(segments):
        raise ValueError(f"relevance has {len(relevance)} values for {len(segments)} tokens")
    out = np.ones(len(segments), dtype=np.float32)
    instruction = segments == int(Segment.INSTRUCTION)
    out[instruction] = np.maximum(floor, transform(relevance[instruction], kind, temperature))
    return out


def with_weight_scales(batch: dict[str, Any], masking) -> dict[str, Any]:
    """The micro-batch with `WEIGHT_SCALE` (per row, `gains` of its stored relevance) under a visual mode;
    other modes get it back unchanged. `masking` is the `MaskingConfig`."""
    if masking.mode not in VISUAL_MODES:
        return batch
    if RELEVANCE_COLUMN not in batch:
        raise ValueError(
            f"masking.mode={masking.mode} needs each token's visual relevance, and this prepared data has none: "
            "set data.relevance.reference_model and prepare again"
        )
    v = masking.visual
    scales = [
        gains(s, r, v.transform, v.temperature, v.floor) for s, r in zip(batch["segments"], batch[RELEVANCE_COLUMN])
    ]
    return {**batch, WEIGHT_SCALE: scales}


# ---------------------------------------------------------------- per-segment statistics

HISTOGRAM_EDGES = np.linspace(-16.0, 16.0, 1601)
"""Bins (0.02 nats) of the relevance histograms that per-segment quantiles are read from (outside: the ends)."""


@dataclass
class RelevanceHistogram:
    """Counts, sums and a histogram of relevance per segment, mergeable across blocks."""

    counts: dict[str, list[float]] = field(default_factory=dict)  # segment -> [n, Σr, Σr², min, max]
    bins: dict[str, np.ndarray] = field(default_factory=dict)

    def add(self, segments: np.ndarray, relevance: np.ndarray) -> None:
        segments, relevance = np.asarray(segments), np.asarray(relevance, dtype=np.float64)
        for segment in INSTRUCTION_SEGMENTS:
            values = relevance[segments == int(segment)]
            if len(values):
                self.add_values(segment.name.lower(), values)

    def add_values(self, name: str, values: np.ndarray) -> None:
        n, total, squares, low, high = self.counts.get(name, [0, 0.0, 0.0, np.inf, -np.inf])
        self.counts[name] = [
            n + len(values),
            total + float(values.sum()),
            squares + float((values**2).sum()),
            min(low, float(values.min())),
            max(high, float(values.max())),
        ]
        clipped = np.clip(values, HISTOGRAM_EDGES[0], HISTOGRAM_EDGES[-1])
        counts = np.histogram(clipped, HISTOGRAM_EDGES)[0]
        self.bins[name] = self.bins.get(name, np.zeros(len(HISTOGRAM_EDGES) - 1, np.int64)) + counts

    def merge(self, other: "RelevanceHistogram") -> None:
        for name, (n, total, squares, low, high) in other.counts.items():
            mine = self.counts.get(name, [0, 0.0, 0.0, np.inf, -np.inf])
            self.counts[name] = [mine[0] + n, mine[1] + total, mine[2] + squares, min(mine[3], low), max(mine[4], high)]
            self.bins[name] = self.bins.get(name, np.zeros_like(other.bins[name])) + other.bins[name]

    def to_dict(self) -> dict[str, Any]:
        return {"counts": self.counts, "bins": {k: v.tolist() for k, v in self.bins.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RelevanceHistogram":
        return cls(dict(data["counts"]), {k: np.asarray(v, np.int64) for k, v in data["bins"].items()})

    def summary(self, quantiles: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95)) -> dict[str, dict[str, float]]:
        """Per segment: tokens, mean, std, min, max and the quantiles (interpolated within the 0.02-nat bins)."""
        out = {}
        for name, (n, total, squares, low, high) in self.counts.items():
            mean = total / n
            counts = self.bins[name]
            cumulative = np.cumsum(counts) / n
            entry = {"tokens": int(n), "mean": round(mean, 4), "std": round(max(squares / n - mean**2, 0.0) ** 0.5, 4)}
            entry.update({"min": round(low, 4), "max": round(high, 4)})
            for q in quantiles:
                k = min(int(np.searchsorted(cumulative, q)), len(counts) - 1)
                below = cumulative[k - 1] if k else 0.0
                share = (q - below) / (counts[k] / n) if counts[k] else 0.0
                value = float(HISTOGRAM_EDGES[k] + share * (HISTOGRAM_EDGES[k + 1] - HISTOGRAM_EDGES[k]))
                entry[f"q{round(q * 100):02d}"] = round(min(max(value, low), high), 3)
            out[name] = entry
        return out


# ---------------------------------------------------------------- the reference model's two passes


@dataclass
class RowToScore:
    """One prepared row: its id (seeds its noise image), tokens, segments and images (PIL, in order)."""

    row_id: str
    input_ids: np.ndarray
    segments: np.ndarray
    images: list = field(default_factory=list)


class RelevanceScorer:
    """Scores rows with one loaded reference model: per-token r_t (`token_relevance`) of each row.

    `null_image` and `seed` are evaluation's (`eval.null_image`, `eval.seed`): a noise image is drawn
    per row id, as evaluation draws one per question id, so a row's relevance does not depend on its batch.
    """

    def __init__(self, model, image_processor, *, null_image: str = "noise", seed: int = 0, pad_token_id: int = 0):
        from workloads.evaluator import NULL_IMAGES

        if null_image not in NULL_IMAGES:
            raise ValueError(f"null_image must be one of {NULL_IMAGES}, got {null_image!r}")
        self.model, self.image_processor = model, image_processor
        self.null_image, self.seed, self.pad_token_id = null_image, seed, pad_token_id
        model.eval()

    @classmethod
    def from_pretrained(cls, model_dir: str, *, device: str = "cpu", **options) -> "RelevanceScorer":
        import torch
        from transformers import AutoImageProcessor, AutoModelForImageTextToText

        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype).to(device)
        pad = model.config.get_text_config().pad_token_id or 0
        return cls(model, AutoImageProcessor.from_pretrained(model_dir), pad_token_id=pad, **options)

    def _token_logp(self, ids: list[np.ndarray], segments: list[np.ndarray], images: dict) -> list[np.ndarray]:
        """log p(token t | prefix) per row (index 0 is 0), computed at instruction-side targets only;
        `images`: the forward's image inputs (pixel values and the family's grid; {} for none)."""
        import torch

        from workloads.evaluator import with_token_types
        from workloads.forward import training_nll
        from workloads.loss import part_masks

        device = next(self.model.parameters()).device
        length = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), length), self.pad_token_id, dtype=torch.long)
        segs = torch.full((len(ids), length), int(Segment.PAD), dtype=torch.long)
        for i, (row_ids, row_segments) in enumerate(zip(ids, segments)):
            input_ids[i, : len(row_ids)] = torch.as_tensor(row_ids.astype(np.int64))
            segs[i, : len(row_segments)] = torch.as_tensor(row_segments.astype(np.int64))
        scored = torch.nonzero(part_masks(segs[:, 1:])[0].reshape(-1)).squeeze(1)
        inputs = {"input_ids": input_ids.to(device), "attention_mask": (segs != int(Segment.PAD)).long().to(device)}
        if images:
            placed = with_token_types(images, segs == int(Segment.IMAGE))
            inputs.update({k: v.to(device) for k, v in placed.items()})
        kernel = "chunked" if getattr(self.model, "base_model", self.model) is not self.model else "full"
        with torch.no_grad():
            nll = training_nll(self.model, scored_index=scored.to(device), kernel=kernel, chunk_tokens=1024, **inputs)
        logp = torch.nn.functional.pad(-nll.float(), (1, 0)).cpu().numpy()
        return [logp[i, : len(row_ids)] for i, row_ids in enumerate(ids)]

    def _null_pixels(self, rows: Sequence[RowToScore], images: dict) -> dict:
        from workloads.evaluator import image_keys, null_image_inputs

        keys = [key for row in rows for key in image_keys(row.row_id, len(row.images))]
        return null_image_inputs(images, self.null_image, self.seed, keys)

    def __call__(self, rows: Sequence[RowToScore]) -> list[np.ndarray]:
        """r_t (float16, one value per token) of each row, in order; rows without images get zeros."""
        out: list[np.ndarray | None] = [
            None if row.images else np.zeros(len(row.input_ids), np.float16) for row in rows
        ]
        seen = [row for row in rows if row.images]
        if not seen:
            return out  # type: ignore[return-value]
        ids = [np.asarray(r.input_ids) for r in seen]
        segments = [np.asarray(r.segments) for r in seen]
        from workloads.evaluator import image_tensors

        images = image_tensors(self.model, self.image_processor, [image for r in seen for image in r.images])
        with_image = self._token_logp(ids, segments, images)
        if self.null_image == "none":  # the image tokens taken out: map the shorter rows' values back
            keep = [s != int(Segment.IMAGE) for s in segments]
            short = self._token_logp([i[k] for i, k in zip(ids, keep)], [s[k] for s, k in zip(segments, keep)], {})
            null = []
            for k, values in zip(keep, short):
                full = np.zeros(len(k), np.float32)
                full[k] = values
                null.append(full)
        else:
            null = self._token_logp(ids, segments, self._null_pixels(seen, images))
        scored = iter(token_relevance(a, b, s) for a, b, s in zip(with_image, null, segments))
        return [value if value is not None else next(scored) for value in out]
