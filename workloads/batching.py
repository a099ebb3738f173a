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


def ordered_micro_batches(batches: Iterable[dict], order: np.ndarray, micro_batch_size: int) -> Iterator[dict]:
    """Rows arrive in any order, each with its `row` number; yield micro-batches of them in `order`."""
    pending: dict[int, dict] = {}
    position = 0
    for batch in batches:
        for i, row in enumerate(batch["row"]):
            pending[int(row)] = {k: batch[k][i] for k in ("input_ids", "segments", "pixel_values")}
        while position + micro_batch_size <= len(order) and all(
            int(r) in pending for r in order[position : position + micro_batch_size]
        ):
            chosen = [pending.pop(int(r)) for r in order[position : position + micro_batch_size]]
            yield {k: [row[k] for row in chosen] for k in chosen[0]}
            position += micro_batch_size
    if position < len(order):
        raise RuntimeError(f"this rank's data ended {len(order) - position} planned rows early")
