"""Which prepared rows form each optimizer step, and in which order a rank consumes them.

Data order is planned, not left to chance: `BatchPlan` depends only on the
row lengths, the global batch size and the seed, not on how a step is split
into workers x accumulation x micro-batches, so those layouts train on the
same steps, and a restarted worker group reads exactly the rows it read
before. Within windows of a few steps rows are grouped by length, so
micro-batches hold rows of similar length and carry little padding.

Plain numpy: the orchestrator plans on the driver, each worker orders the
rows it receives with `ordered_micro_batches`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

LENGTH_GROUP_STEPS = 8
"""Global batches per length-grouping window (rows are sorted by length within it)."""


@dataclass
class BatchPlan:
    """Which prepared rows form each optimizer step, and which rank reads which of them.

    Rows are numbered in the prepared order (shard file, then position). The
    first `steps_per_epoch * global_batch` rows are cut into windows of
    `group_steps` global batches; each window is sorted by length (longest
    first) and cut into global batches, whose order within the window is
    shuffled per epoch. A global batch, sorted, is cut into micro-batches of
    neighbouring rows: micro-batch k goes to rank k % world_size as its
    (k // world_size)-th accumulation step.
    """

    lengths: np.ndarray
    micro_batch_size: int
    gradient_accumulation: int
    world_size: int
    group_steps: int = LENGTH_GROUP_STEPS
    seed: int = 0

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return len(self.lengths) // self.global_batch

    def steps(self, epoch: int) -> np.ndarray:
        """[steps_per_epoch, global_batch] row numbers; each step's rows sorted by length, longest first."""
        size, steps = self.global_batch, self.steps_per_epoch
        out = []
        for first in range(0, steps, max(1, self.group_steps)):
            count = min(max(1, self.group_steps), steps - first)
            rows = np.arange(first * size, (first + count) * size)
            rows = rows[np.argsort(-self.lengths[rows], kind="stable")].reshape(count, size)
            out.append(rows[np.random.default_rng([self.seed, epoch, first]).permutation(count)])
        return np.concatenate(out) if out else np.zeros((0, size), dtype=np.int64)

    def micro_batches(self, epoch: int) -> np.ndarray:
        """[steps, accumulation, rank, micro] row numbers."""
        shape = (self.steps_per_epoch, self.gradient_accumulation, self.world_size, self.micro_batch_size)
        return self.steps(epoch).reshape(shape)

    def order(self, rank: int, epoch: int) -> np.ndarray:
        """The rows `rank` trains on in `epoch`, in the order it consumes them."""
        return self.micro_batches(epoch)[:, :, rank, :].reshape(-1)

    def rank_of_rows(self) -> np.ndarray:
        """The rank that reads each row (the same every epoch); -1 for rows past the last whole step."""
        owner = np.full(len(self.lengths), -1, dtype=np.int32)
        batches = self.micro_batches(0)
        for rank in range(self.world_size):
            owner[batches[:, :, rank, :].reshape(-1)] = rank
        return owner

    def padding_share(self, grouped: bool = True) -> float:
        """Padded positions / all positions over an epoch's micro-batches (grouped: this plan; else data order)."""
        if grouped:
            rows = self.micro_batches(0).reshape(-1, self.micro_batch_size)
        else:
            rows = np.arange(self.steps_per_epoch * self.global_batch).reshape(-1, self.micro_batch_size)
        lengths = self.lengths[rows]
        positions = lengths.max(axis=1).sum() * self.micro_batch_size
        return float(1.0 - lengths.sum() / positions) if positions else 0.0

    def to_config(self) -> dict[str, Any]:
        return {**asdict(self), "lengths": self.lengths.astype(np.int32)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "BatchPlan":
        return cls(**config)


ROW_KEYS = ("input_ids", "segments", "pixel_values")
"""What a micro-batch holds per row (lists, in plan order)."""
OPTIONAL_ROW_KEYS = ("relevance", "image_sizes", "image_grid_thw")
"""Per-row columns a micro-batch carries too when the rows have them (`relevance`: `l2t_visual`'s; the image
grids of the families that take them, workloads/families.py: LLaVA-NeXT's `image_sizes`, Qwen2-VL's)."""
BAD_ROWS_GRACE = 200
"""Rows seen before the bad share is judged on the rows seen alone (the first bad row is no 100% share)."""


class TooManyBadRows(RuntimeError):
    """More rows than `data.max_bad_fraction` of those seen could not be loaded."""


class _BadRows:
    """Rows dropped from micro-batches: counted, named in the log, and judged against `max_bad_fraction`.

    The share is judged over the rows seen, floored at `BAD_ROWS_GRACE` rows (or all the planned rows when
    fewer), so that one bad row early in an epoch does not read as a 100% share.
    """

    def __init__(self, planned: int, max_bad_fraction: float, log):
        self.planned, self.max_bad_fraction, self.log = planned, max_bad_fraction, log
        self.seen = self.bad = 0
        self.names: deque[str] = deque(maxlen=3)  # the last few, for the error

    def count(self, rows: list[dict]) -> list[dict]:
        """The rows that can be trained on; the others are logged and counted."""
        self.seen += len(rows)
        bad = [row for row in rows if row["problem"]]
        for row in bad:
            self.bad += 1
            self.names.append(row["problem"])
            self.log(f"[ingest] skipped row {row['row']} ({self.bad} so far): {row['problem']}")
        allowed = self.max_bad_fraction * max(self.seen, min(self.planned, BAD_ROWS_GRACE))
        if self.bad > allowed:
            raise TooManyBadRows(
                f"{self.bad} of {self.seen} rows seen could not be loaded, above data.max_bad_fraction="
                f"{self.max_bad_fraction:.1%}; the last: {'; '.join(self.names)}"
            )
        return [row for row in rows if not row["problem"]]


def _placeholder(row: dict) -> dict:
    """A row that trains nothing and needs no image: two of a bad row's text tokens, marked IMAGE (weight 0
    in every masking mode, attended to, so no fully masked row), for a micro-batch whose rows all failed."""
    from workloads.segment_codes import Segment

    ids, segments = np.asarray(row["input_ids"]), np.asarray(row["segments"])
    text = ids[segments != int(Segment.IMAGE)][:2] if len(ids) == len(segments) else ids[:0]
    text = np.concatenate([text, np.zeros(2 - len(text), dtype=ids.dtype)]) if len(text) < 2 else text
    return {
        "input_ids": text.astype(np.int32),
        "segments": np.full(2, int(Segment.IMAGE), dtype=np.int8),
        "pixel_values": np.zeros((0,), np.float32),
        **{key: np.zeros(2, np.float32) for key in OPTIONAL_ROW_KEYS if key in row},
    }


def _default_log(message: str) -> None:
    print(message, flush=True)


def ordered_micro_batches(
    batches: Iterable[dict],
    order: np.ndarray,
    micro_batch_size: int,
    *,
    max_bad_fraction: float | None = None,
    log=_default_log,
) -> Iterator[dict]:
    """Rows arrive in any order, each with its `row` number; yield micro-batches of them in `order`.

    A row that arrives with a `problem` (its images could not be loaded, `orchestrator.ingest.LoadRows`)
    is dropped from its micro-batch, logged with its row and image, and counted: every micro-batch carries
    `skipped_rows`, the rows dropped from it (0 mostly). A micro-batch whose rows all failed still comes, as
    one placeholder row that trains no token (`_placeholder`), so every rank takes the same steps; the
    step's loss divides by its trained tokens, so a dropped row is just fewer tokens. `TooManyBadRows`
    past `max_bad_fraction` (default: `data.max_bad_fraction`'s default) of the rows seen.
    """
    if max_bad_fraction is None:
        from workloads.config import DataConfig

        max_bad_fraction = DataConfig.model_fields["max_bad_fraction"].default
    bad_rows = _BadRows(len(order), max_bad_fraction, log)
    pending: dict[int, dict] = {}
    position = 0
    for batch in batches:
        problems = batch.get("problem")
        keys = ROW_KEYS + tuple(k for k in OPTIONAL_ROW_KEYS if k in batch)
        for i, row in enumerate(batch["row"]):
            entry = {k: batch[k][i] for k in keys}
            entry["row"], entry["problem"] = int(row), str(problems[i]) if problems is not None else ""
            pending[int(row)] = entry
        while position + micro_batch_size <= len(order) and all(
            int(r) in pending for r in order[position : position + micro_batch_size]
        ):
            chosen = [pending.pop(int(r)) for r in order[position : position + micro_batch_size]]
            good = bad_rows.count(chosen)
            skipped = len(chosen) - len(good)
            keys = ROW_KEYS + tuple(k for k in OPTIONAL_ROW_KEYS if k in chosen[0])
            micro_batch: dict[str, Any] = {k: [row[k] for row in good or [_placeholder(chosen[0])]] for k in keys}
            micro_batch["skipped_rows"] = skipped
            yield micro_batch
            position += micro_batch_size
    if position < len(order):
        raise RuntimeError(f"this rank's data ended {len(order) - position} planned rows early")
