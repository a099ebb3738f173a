"""Training ingest: prepared shards -> Ray Data -> each rank's rows with their pixel values.

The driver reads each prepared row's length (rows are numbered by shard
file, then position) without Ray tasks. Ray Data reads the shards' row
groups in slices and, per rank, keeps only that rank's rows (`BatchPlan`'s
`rank_of_rows`) before any image is opened, then loads their images with the
model's image processor on CPU. Each Train worker reads its own dataset and
puts its micro-batches in plan order (`workloads.batching`).

An image that fails here (deleted, replaced, truncated since preparation, or
a path that now leaves `image_root` through a symlink: paths are confined
again) never ends the ingest: its row comes out with a `problem` naming the
row and the image, and `ordered_micro_batches` drops it from its micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from orchestrator import storage
from orchestrator.images import open_confined_image
from orchestrator.prepare import PreparedData
from workloads.batching import BatchPlan

READ_CHUNK_ROWS = 128
"""Rows per Ray Data read unit (a slice of a Parquet row group)."""
LIGHT_TASK_CPUS = 0.05
"""CPU share of Ray Data tasks that only select rows."""


@dataclass
class PreparedRows:
    """The prepared rows in order (shard files by name, then position): lengths and where each row group starts."""

    lengths: np.ndarray
    chunks: list[dict[str, Any]]
    """{"path", "row_group", "start", "stop", "first_row"}: slices of Parquet row groups, the units Ray Data reads."""


def read_prepared_rows(prepared: PreparedData) -> PreparedRows:
    """Row lengths and row-group layout of the shards, read in this process (one int column; no Ray tasks,
    so it works beside Train workers that hold every CPU)."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs, root = storage.filesystem(prepared.shards)
    files = sorted(
        info.path
        for info in fs.get_file_info(pafs.FileSelector(root, recursive=True))
        if info.path.endswith(".parquet")
    )
    lengths, chunks, first = [], [], 0
    for path in files:
        with fs.open_input_file(path) as handle:
            reader = pq.ParquetFile(handle)
            for index in range(reader.num_row_groups):
                column = reader.read_row_group(index, columns=["length"]).column("length").to_numpy()
                for start in range(0, len(column), READ_CHUNK_ROWS):
                    stop = min(start + READ_CHUNK_ROWS, len(column))
                    chunks.append(
                        {"path": path, "row_group": index, "start": start, "stop": stop, "first_row": first + start}
                    )
                lengths.append(column)
                first += len(column)
    if not files:
        raise FileNotFoundError(f"no Parquet shards in {prepared.shards}")
    return PreparedRows(lengths=np.concatenate(lengths).astype(np.int64), chunks=chunks)


class LoadRows:
    """Ray Data stage: slices of Parquet row groups -> rows with their `row` number, tokens, `pixel_values`
    (the model's image processor) and `problem` ("" or why the row's images could not be loaded); with
    `owner` and `rank`, only that rank's rows, kept before any image is opened. It raises for no image."""

    def __init__(
        self,
        model_dir: str,
        shards: str,
        image_root: str | None,
        owner: np.ndarray | None = None,
        rank: int | None = None,
    ):
        from transformers import AutoImageProcessor

        self.processor = AutoImageProcessor.from_pretrained(model_dir)
        self.fs, _ = storage.filesystem(shards)
        self.image_root = image_root
        self.image_fs = storage.filesystem(image_root)[0] if image_root and storage.is_s3(image_root) else None
        self.owner, self.rank = owner, rank
        self._group: tuple[Any, dict[str, list]] | None = None  # the last row group read (its slices come in a row)

    def _columns(self, path: str, index: int) -> dict[str, list]:
        import pyarrow.parquet as pq

        if self._group is None or self._group[0] != (path, index):
            with self.fs.open_input_file(path) as handle:
                reader = pq.ParquetFile(handle)
                names = [n for n in ("id", "input_ids", "segments", "images") if n in reader.schema_arrow.names]
                table = reader.read_row_group(index, columns=names)
            self._group = ((path, index), {name: table.column(name).to_pylist() for name in table.column_names})
        return self._group[1]

    def _images(self, row_id: str, paths: list[str]) -> tuple[list, str]:
        """(the row's images, "") or ([], why one of them can't be used)."""
        images = []
        for path in paths:
            try:
                images.append(open_confined_image(self.image_root, str(path), filesystem=self.image_fs))
            except Exception as error:  # noqa: BLE001 - missing, corrupt, escaping: the row is skipped, not the run
                return [], f"row {row_id!r}: image {str(path)!r}: {type(error).__name__}: {error}"
        return images, ""

    def _pixels(self, rows: list[tuple[str, list]]) -> tuple[list, list[str]]:
        """Pixel values per row (None for a row without images) and each row's problem ("" when fine)."""
        loaded = [self._images(row_id, paths) if paths else ([], "") for row_id, paths in rows]
        problems = [problem for _, problem in loaded]
        flat = [image for images, problem in loaded if not problem for image in images]
        try:
            pixels = self.processor(images=flat, return_tensors="np")["pixel_values"] if flat else None
        except Exception:  # noqa: BLE001 - one image the processor can't take: process row by row
            return self._pixels_by_row(loaded)
        out, cursor = [], 0
        for images, problem in loaded:
            count = 0 if problem else len(images)
            out.append(pixels[cursor : cursor + count].astype(np.float32) if count else None)
            cursor += count
        return out, problems

    def _pixels_by_row(self, loaded: list[tuple[list, str]]) -> tuple[list, list[str]]:
        out, problems = [], []
        for images, problem in loaded:
            pixels = None
            if images and not problem:
                try:
                    pixels = self.processor(images=images, return_tensors="np")["pixel_values"].astype(np.float32)
                except Exception as error:  # noqa: BLE001
                    problem = f"image processor failed: {type(error).__name__}: {error}"
            out.append(pixels)
            problems.append(problem)
        return out, problems

    def __call__(self, chunks: dict[str, np.ndarray]) -> dict[str, Any]:
        out: dict[str, list] = {"row": [], "input_ids": [], "segments": [], "pixel_values": [], "problem": []}
        for path, index, start, stop, first in zip(
            chunks["path"], chunks["row_group"], chunks["start"], chunks["stop"], chunks["first_row"]
        ):
            columns = self._columns(str(path), int(index))
            rows = int(first) + np.arange(int(stop) - int(start))
            keep = np.arange(len(rows)) if self.rank is None else np.flatnonzero(self.owner[rows] == self.rank)
            ids = columns.get("id")
            per_row = [
                (ids[int(start) + i] if ids else f"#{int(rows[i])}", columns["images"][int(start) + i]) for i in keep
            ]
            pixels, problems = self._pixels(per_row)
            for i, row_pixels, problem in zip(keep, pixels, problems):
                out["row"].append(int(rows[i]))
                out["input_ids"].append(np.asarray(columns["input_ids"][int(start) + i], dtype=np.int32))
                out["segments"].append(np.asarray(columns["segments"][int(start) + i], dtype=np.int8))
                out["pixel_values"].append(row_pixels if row_pixels is not None else np.zeros((0,), np.float32))
                out["problem"].append(problem)
        return out


def training_dataset(
    prepared: PreparedData,
    model_dir: str,
    image_root: str | None,
    data_cpus: float,
    *,
    rows: PreparedRows | None = None,
    owner: np.ndarray | None = None,
    rank: int | None = None,
):
    """Prepared rows with their `row` number and pixel values (all rows, or one rank's by `owner`).

    Materialized once, a dataset of all rows serves several fits (a sweep's
    trials): `run_train(..., dataset=...)` then only selects each rank's rows.
    """
    import ray.data

    rows = rows or read_prepared_rows(prepared)
    return ray.data.from_items(rows.chunks).map_batches(
        LoadRows,
        fn_constructor_kwargs={
            "model_dir": model_dir,
            "shards": prepared.shards,
            "image_root": image_root,
            "owner": owner,
            "rank": rank,
        },
        batch_size=1,
        num_cpus=data_cpus,
        compute=ray.data.ActorPoolStrategy(size=1),
    )


def _select_rank(batch: dict[str, np.ndarray], owner: np.ndarray, rank: int) -> dict[str, Any]:
    keep = np.flatnonzero(owner[np.asarray(batch["row"], dtype=np.int64)] == rank)
    return {k: v[keep] for k, v in batch.items()}


def rank_datasets(plan: BatchPlan, make_dataset, shared=None) -> dict[str, Any]:
    """One Ray Dataset per rank holding exactly that rank's rows (in any order), pixel values loaded.

    From `shared` (all rows, images loaded) by selecting rows; else `make_dataset(owner, rank)`
    reads the shards and loads only that rank's images.
    """
    owner = plan.rank_of_rows()
    datasets = {}
    for rank in range(plan.world_size):
        if shared is not None:
            ds = shared.map_batches(
                _select_rank, fn_kwargs={"owner": owner, "rank": rank}, batch_format="numpy", num_cpus=LIGHT_TASK_CPUS
            )
        else:
            ds = make_dataset(owner, rank)
        datasets[dataset_name(rank)] = ds
    return datasets


def dataset_name(rank: int) -> str:
    return f"train_rank{rank}"
