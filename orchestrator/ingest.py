"""Training ingest: prepared shards -> Ray Data -> each rank's rows with their pixel values.

The driver reads each prepared row's length (rows are numbered by shard
file, then position) without Ray tasks. Ray Data reads the shards' row
groups in slices and, per rank, keeps only that rank's rows (`BatchPlan`'s
`rank_of_rows`) before any image is opened, then loads their images with the
model's image processor on CPU. Each Train worker reads its own dataset and
puts its micro-batches in plan order (`workloads.batching`).

An image that fails here (deleted, replaced, truncated since preparation, or
a path that now leaves `image_root` through a symlink: paths are confined
again, or one whose size now gives another image-token count than the
prepared row holds, workloads/families.py) never ends the ingest: its row comes out with a `problem` naming the
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
from workloads.visual_relevance import RELEVANCE_COLUMN

READ_CHUNK_ROWS = 128
"""Rows per Ray Data read unit (a slice of a Parquet row group)."""
LOAD_SLICE_ROWS = 64
"""Rows per image-loading task: its first micro-batch comes after this many images, not a whole read unit's."""
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

        from workloads.families import counter_for

        self.processor = AutoImageProcessor.from_pretrained(model_dir)
        self.counter = counter_for(model_dir)  # the family: its image grid, each image's token count
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
                wanted = ("id", "input_ids", "segments", "images", "image_tokens", RELEVANCE_COLUMN)
                names = [n for n in wanted if n in reader.schema_arrow.names]
                table = reader.read_row_group(index, columns=names)
            self._group = ((path, index), {name: _row_values(table.column(name)) for name in table.column_names})
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
        """Pixel values per row (None for a row without images) and each row's problem ("" when fine).

        Row by row, not the whole slice in one processor call: the processor works image by image anyway, and
        a call on a hundred images keeps every intermediate array of all of them (a hundred times 1.4 MB at
        336 px), so each step streams them through memory instead of cache: measured 2.7x slower per image
        (benchmarks/ingest.py). Rows with the same images (a LLaVA image asked about in several rows) are
        decoded and processed once per slice."""
        done: dict[tuple, tuple[Any, str]] = {}
        out, problems = [], []
        for row_id, paths in rows:
            key = tuple(str(path) for path in paths)
            if key not in done or done[key][1]:  # a failed row is retried: its problem names its own row
                done[key] = self._pixels_of_row(self._images(row_id, paths)) if paths else (None, "")
            out.append(done[key][0])
            problems.append(done[key][1])
        return out, problems

    def _pixels_of_row(self, loaded: tuple[list, str]) -> tuple[Any, str]:
        images, problem = loaded
        if problem:
            return None, problem
        from workloads.families import image_inputs

        try:
            inputs = image_inputs(self.processor, images)  # pixel values and the family's image grid
            inputs["pixel_values"] = inputs["pixel_values"].astype(np.float32, copy=False)
            inputs["image_tokens"] = np.asarray(self.counter.counts([image.size for image in images]))
            return inputs, ""
        except Exception as error:  # noqa: BLE001 - one image the processor can't take: its row is skipped
            return None, f"image processor failed: {type(error).__name__}: {error}"

    def _add_images(self, out: dict[str, list], images: dict[str, np.ndarray], prepared, row_id: str) -> str:
        """Append a row's pixel values (and its family's image grid) to `out`; "" or why the row can't train:
        its images now take other token counts than the prepared row holds (an image replaced since)."""
        out["pixel_values"].append(images.get("pixel_values", np.zeros((0,), np.float32)))
        grid = self.counter.family.image_grid
        if grid:
            empty = np.zeros((0, 2 if grid == "image_sizes" else 3), np.int64)
            out.setdefault(grid, []).append(images.get(grid, empty))
        counts = images.get("image_tokens")
        if prepared is not None and counts is not None and list(prepared) != counts.tolist():
            return f"row {row_id!r}: its images take {counts.tolist()} image tokens, prepared with {list(prepared)}"
        return ""

    def __call__(self, chunks: dict[str, np.ndarray]) -> dict[str, Any]:
        out: dict[str, list] = {"row": [], "input_ids": [], "segments": [], "pixel_values": [], "problem": []}
        for path, index, start, stop, first in zip(
            chunks["path"], chunks["row_group"], chunks["start"], chunks["stop"], chunks["first_row"]
        ):
            columns = self._columns(str(path), int(index))
            if RELEVANCE_COLUMN in columns:  # the prepared data was scored (`data.relevance`)
                out.setdefault(RELEVANCE_COLUMN, [])
            rows = int(first) + np.arange(int(stop) - int(start))
            keep = np.arange(len(rows)) if self.rank is None else np.flatnonzero(self.owner[rows] == self.rank)
            ids = columns.get("id")
            per_row = [
                (ids[int(start) + i] if ids else f"#{int(rows[i])}", columns["images"][int(start) + i]) for i in keep
            ]
            pixels, problems = self._pixels(per_row)
            for i, row_pixels, problem, (row_id, _) in zip(keep, pixels, problems, per_row):
                out["row"].append(int(rows[i]))
                out["input_ids"].append(np.asarray(columns["input_ids"][int(start) + i], dtype=np.int32))
                out["segments"].append(np.asarray(columns["segments"][int(start) + i], dtype=np.int8))
                prepared = columns["image_tokens"][int(start) + i] if "image_tokens" in columns else None
                changed = self._add_images(out, row_pixels or {}, prepared, row_id)
                out["problem"].append(problem or changed)
                if RELEVANCE_COLUMN in columns:
                    out[RELEVANCE_COLUMN].append(np.asarray(columns[RELEVANCE_COLUMN][int(start) + i], np.float32))
        out["pixel_values"] = _empties_shaped_alike(out["pixel_values"])
        return out


def _empties_shaped_alike(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Rows without pixels as empty arrays of the others' rank ([0, 3, H, W]): Ray Data stores a column of
    arrays of one rank as a tensor column, but one 1-D empty among 4-D images makes it pickle every row."""
    shaped = next((a for a in arrays if a.ndim > 1), None)
    if shaped is None:
        return arrays
    empty = np.zeros((0, *shaped.shape[1:]), shaped.dtype)
    return [empty if a.size == 0 and a.ndim != shaped.ndim else a for a in arrays]


def _row_values(column) -> Any:
    """A Parquet column as what `column[i]` of one row reads: numeric lists as numpy views into one buffer
    (no Python object per token), anything else as Python values."""
    import pyarrow as pa

    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_list(column.type) and (
        pa.types.is_integer(column.type.value_type) or pa.types.is_floating(column.type.value_type)
    ):
        return _ListRows(column)
    return column.to_pylist()


class _ListRows:
    """Rows of an Arrow list column of numbers: `rows[i]` is row i's values as a numpy view."""

    def __init__(self, column):
        self.offsets = column.offsets.to_numpy()
        self.values = column.values.to_numpy(zero_copy_only=False)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]


def training_dataset(
    prepared: PreparedData,
    model_dir: str,
    image_root: str | None,
    data_cpus: float,
    *,
    rows: PreparedRows | None = None,
    owner: np.ndarray | None = None,
    rank: int | None = None,
    workers: int = 1,
):
    """Prepared rows with their `row` number and pixel values (all rows, or one rank's by `owner`).

    Materialized once, a dataset of all rows serves several fits (a sweep's
    trials): `run_train(..., dataset=...)` then only selects each rank's rows.
    `workers`: loading tasks at a time, of `data_cpus` CPUs each (`load_rows`).
    """
    import ray.data

    rows = rows or read_prepared_rows(prepared)
    settings = {"model_dir": model_dir, "shards": prepared.shards, "image_root": image_root}
    return ray.data.from_items(_slices(rows.chunks, LOAD_SLICE_ROWS)).map_batches(
        load_rows,
        fn_kwargs={**settings, "owner": owner, "rank": rank},
        batch_size=1,
        num_cpus=data_cpus,
        concurrency=workers,
    )


def _slices(chunks: list[dict[str, Any]], size: int) -> list[dict[str, Any]]:
    """The read units cut to at most `size` rows (a task's block of pixel values: 64 rows at 336 px are 87 MB)."""
    out = []
    for chunk in chunks:
        for start in range(chunk["start"], chunk["stop"], size):
            first_row = chunk["first_row"] + start - chunk["start"]
            out.append({**chunk, "start": start, "stop": min(start + size, chunk["stop"]), "first_row": first_row})
    return out


_LOADER: tuple[tuple, Any, LoadRows] | None = None
"""This process's `LoadRows`: (settings, owner, loader)."""


def load_rows(chunks: dict[str, np.ndarray], model_dir: str, shards: str, image_root, owner=None, rank=None):
    """Ray Data task: `LoadRows` on one slice, with the loader this worker process keeps between tasks.

    Tasks, not an actor pool: Ray keeps its worker processes, so from the second epoch on (and for every
    slice after a process's first) no task imports transformers or loads the processor again, where each
    epoch's actor pool would start cold (seconds per epoch, before the first micro-batch)."""
    global _LOADER
    settings = (model_dir, shards, image_root, rank)
    if _LOADER is None or _LOADER[0] != settings or not _same_owner(_LOADER[1], owner):
        _LOADER = (settings, owner, LoadRows(model_dir, shards, image_root, owner=owner, rank=rank))
    return _LOADER[2](chunks)


def _same_owner(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))


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
