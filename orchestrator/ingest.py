"""Training ingest: prepared shards -> Ray Data -> each rank's rows with their pixel values.

The driver reads each prepared row's length (rows are numbered by shard
file, then position) without Ray tasks. Each rank's Ray Data read follows
its plan order (`BatchPlan.order`): every loading task gets a run of the rows
the rank consumes next, the first runs small, so the first micro-batch waits
for its own images only, not for a whole length-grouping window's, and rows
arrive nearly in the order `workloads.batching.ordered_micro_batches` puts
them in. A task reads its rows' row groups (kept per process while their
rows come) and loads their images with the model's image processor on CPU.

An image that fails here (deleted, replaced, truncated since preparation, or
a path that now leaves `image_root` through a symlink: paths are confined
again, or one whose size now gives another image-token count than the
prepared row holds, workloads/families.py) never ends the ingest: its row comes out with a `problem` naming the
row and the image, and `ordered_micro_batches` drops it from its micro-batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from orchestrator import storage
from orchestrator.images import open_confined_image
from orchestrator.prepare import PreparedData
from workloads.batching import BatchPlan
from workloads.visual_relevance import RELEVANCE_COLUMN

LOAD_BLOCK_ROWS = 64
"""Rows per block a loading task hands over as soon as they are loaded (64 rows at 336 px are 87 MB)."""
BLOCK_BYTES = 64 << 20
"""Ray Data's target block size for the loading tasks: a block of LOAD_BLOCK_ROWS rows leaves its task alone, not
merged with the next one (Ray Data's default, 128 MiB, would wait for two); a block of larger images (LLaVA-NeXT's
tiles) is cut into blocks about this size."""
FIRST_UNIT_ROWS = 8
"""Rows of the first loading task; the next ones double up to LOAD_UNIT_ROWS, so the first micro-batch comes
after about its own images and the loaders are soon busy with full units."""
LOAD_UNIT_ROWS = 256
"""Rows of a full loading task. Ray Data leaves a loader idle about 0.1 s between two tasks (its scheduling loop,
the lease of the next task), a tenth of a 64-row task on a 2-core machine: larger tasks pay it less often, and hand
over their rows in blocks of LOAD_BLOCK_ROWS meanwhile."""
GROUPS_KEPT = 2
"""Row groups a loading process keeps read (a unit near a group's end reads the next one too)."""
LIGHT_TASK_CPUS = 0.05
"""CPU share of Ray Data tasks that only select rows."""


@dataclass
class PreparedRows:
    """The prepared rows in order (shard files by name, then position): lengths and where each row group starts."""

    lengths: np.ndarray
    groups: list[dict[str, Any]]
    """{"path", "row_group", "first_row", "rows"} of every Parquet row group, in row order."""


def read_prepared_rows(prepared: PreparedData) -> PreparedRows:
    """Row lengths and row-group layout of the shards, read in this process (one int column; no Ray tasks,
    so it works beside Train workers that hold every CPU)."""
    import pyarrow.parquet as pq

    fs, _ = storage.filesystem(prepared.shards)
    groups = shard_row_groups(prepared.shards)
    lengths = []
    for group in groups:
        with fs.open_input_file(group["path"]) as handle:
            column = pq.ParquetFile(handle).read_row_group(group["row_group"], columns=["length"]).column("length")
        lengths.append(column.to_numpy())
    return PreparedRows(lengths=np.concatenate(lengths).astype(np.int64), groups=groups)


def shard_row_groups(shards: str) -> list[dict[str, Any]]:
    """Every row group of the shards (file footers only): {"path", "row_group", "first_row", "rows"}."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs, root = storage.filesystem(shards)
    files = sorted(
        info.path
        for info in fs.get_file_info(pafs.FileSelector(root, recursive=True))
        if info.path.endswith(".parquet")
    )
    if not files:
        raise FileNotFoundError(f"no Parquet shards in {shards}")
    groups, first = [], 0
    for path in files:
        with fs.open_input_file(path) as handle:
            metadata = pq.ParquetFile(handle).metadata
        for index in range(metadata.num_row_groups):
            rows = metadata.row_group(index).num_rows
            groups.append({"path": path, "row_group": index, "first_row": first, "rows": rows})
            first += rows
    return groups


def load_units(
    order: np.ndarray, first: int = FIRST_UNIT_ROWS, size: int = LOAD_UNIT_ROWS, last: int = LOAD_BLOCK_ROWS
) -> list[dict]:
    """`order` cut into loading tasks' rows (`{"rows": [...]}`): `first` rows, then twice as many each time up to
    `size`; at the end half of what is left, down to `last` rows (a last few rows join the task before), so the loaders
    finish about together."""
    units, start, step = [], 0, max(1, min(first, size))
    while start < len(order):
        left = len(order) - start
        take = min(step, max(last, -(-left // 2)))
        take = left if left - take < take // 2 else take  # no task of a few rows at the very end
        units.append({"rows": [int(r) for r in order[start : start + take]]})
        start += take
        step = min(size, step * 2)
    return units


class LoadRows:
    """Ray Data stage: row numbers (a block of a loading unit, `load_units`) -> those rows, in that order, with
    their `row` number, tokens, `pixel_values` (the model's image processor) and `problem` ("" or why the
    row's images could not be loaded). It raises for no image."""

    def __init__(self, model_dir: str, shards: str, image_root: str | None):
        from transformers import AutoImageProcessor

        from workloads.families import counter_for

        self.processor = AutoImageProcessor.from_pretrained(model_dir)
        self.counter = counter_for(model_dir)  # the family: its image grid, each image's token count
        self.fs, _ = storage.filesystem(shards)
        self.groups = shard_row_groups(shards)
        self.group_first = np.array([g["first_row"] for g in self.groups] + [sum(g["rows"] for g in self.groups)])
        self.image_root = image_root
        self.image_fs = storage.filesystem(image_root)[0] if image_root and storage.is_s3(image_root) else None
        self._read: dict[int, dict[str, list]] = {}  # the last GROUPS_KEPT row groups read, by index

    def _columns(self, index: int) -> dict[str, list]:
        import pyarrow.parquet as pq

        if index not in self._read:
            group = self.groups[index]
            with self.fs.open_input_file(group["path"]) as handle:
                reader = pq.ParquetFile(handle)
                wanted = ("id", "input_ids", "segments", "images", "image_tokens", RELEVANCE_COLUMN)
                names = [n for n in wanted if n in reader.schema_arrow.names]
                table = reader.read_row_group(group["row_group"], columns=names)
            while len(self._read) >= GROUPS_KEPT:
                self._read.pop(next(iter(self._read)))
            self._read[index] = {name: _row_values(table.column(name)) for name in table.column_names}
        return self._read[index]

    def _locate(self, row: int) -> tuple[dict[str, list], int]:
        """The columns of `row`'s row group and its position there."""
        if not 0 <= row < self.group_first[-1]:
            raise IndexError(f"row {row} is not in the shards ({self.group_first[-1]} rows)")
        index = int(np.searchsorted(self.group_first, row, side="right")) - 1
        return self._columns(index), row - int(self.group_first[index])

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

        Row by row, not the whole unit in one processor call: the processor works image by image anyway, and
        a call on a hundred images keeps every intermediate array of all of them (a hundred times 1.4 MB at
        336 px), so each step streams them through memory instead of cache: measured 2.7x slower per image
        (benchmarks/ingest.py). Rows with the same images (a LLaVA image asked about in several rows) are
        decoded and processed once per unit."""
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

    def __call__(self, rows) -> dict[str, Any]:
        """The rows numbered `rows`, in that order (one block)."""
        rows = [int(r) for r in rows]
        out: dict[str, list] = {"row": [], "input_ids": [], "segments": [], "pixel_values": [], "problem": []}
        located = [self._locate(row) for row in rows]
        if any(RELEVANCE_COLUMN in columns for columns, _ in located):  # the prepared data was scored
            out[RELEVANCE_COLUMN] = []
        per_row = [
            (columns["id"][i] if "id" in columns else f"#{row}", columns["images"][i])
            for row, (columns, i) in zip(rows, located)
        ]
        pixels, problems = self._pixels(per_row)
        for row, (columns, i), row_pixels, problem, (row_id, _) in zip(rows, located, pixels, problems, per_row):
            out["row"].append(row)
            out["input_ids"].append(np.asarray(columns["input_ids"][i], dtype=np.int32))
            out["segments"].append(np.asarray(columns["segments"][i], dtype=np.int8))
            prepared = columns["image_tokens"][i] if "image_tokens" in columns else None
            changed = self._add_images(out, row_pixels or {}, prepared, row_id)
            out["problem"].append(problem or changed)
            if RELEVANCE_COLUMN in columns:
                out[RELEVANCE_COLUMN].append(np.asarray(columns[RELEVANCE_COLUMN][i], np.float32))
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
    order: np.ndarray | None = None,
    workers: int = 1,
):
    """Prepared rows with their `row` number and pixel values: those of `order` (a rank's plan order), or all
    rows in prepared order; a task per `load_units` unit, `workers` tasks at a time of `data_cpus` CPUs each, a
    block per LOAD_BLOCK_ROWS rows of a unit.

    Blocks come as they are done (the dataset does not preserve order: `ordered_micro_batches` puts rows in
    plan order, and tasks started in plan order finish nearly in it), so no block waits for a slower one.
    Materialized once, a dataset of all rows serves several fits (a sweep's
    trials): `run_train(..., dataset=...)` then only selects each rank's rows.
    """
    import ray.data

    if order is None:
        order = np.arange(len(read_prepared_rows(prepared).lengths))
    units = load_units(order)
    settings = {"model_dir": model_dir, "shards": prepared.shards, "image_root": image_root}
    ds = ray.data.from_items(units, override_num_blocks=max(1, len(units))).map_batches(
        load_rows,
        fn_kwargs=settings,
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=data_cpus,
        compute=ray.data.TaskPoolStrategy(size=workers),
    )
    ds.context.execution_options.preserve_order = False
    ds.context.target_max_block_size = BLOCK_BYTES
    return ds


_LOADER: tuple[tuple, LoadRows] | None = None
"""This process's `LoadRows`: (settings, loader)."""


def load_rows(units, model_dir: str, shards: str, image_root) -> Iterator[dict[str, Any]]:
    """Ray Data task: `LoadRows` on a unit (`load_units`), a block per LOAD_BLOCK_ROWS rows as each is loaded,
    with the loader this worker process keeps between tasks.

    Tasks, not an actor pool: Ray keeps its worker processes, so from the second epoch on (and for every
    unit after a process's first) no task imports transformers or loads the processor again, where each
    epoch's actor pool would start cold (seconds per epoch, before the first micro-batch)."""
    global _LOADER
    settings = (model_dir, shards, image_root)
    if _LOADER is None or _LOADER[0] != settings:
        _LOADER = (settings, LoadRows(model_dir, shards, image_root))
    rows = [row for unit in units.column("rows").to_pylist() for row in unit]
    for start in range(0, len(rows), LOAD_BLOCK_ROWS):
        yield _LOADER[1](rows[start : start + LOAD_BLOCK_ROWS])


def _select_rank(batch: dict[str, np.ndarray], owner: np.ndarray, rank: int) -> dict[str, Any]:
    keep = np.flatnonzero(owner[np.asarray(batch["row"], dtype=np.int64)] == rank)
    return {k: v[keep] for k, v in batch.items()}


def rank_datasets(plan: BatchPlan, make_dataset, shared=None) -> dict[str, Any]:
    """One Ray Dataset per rank holding exactly that rank's rows, pixel values loaded.

    From `shared` (all rows, images loaded) by selecting rows (in any order); else
    `make_dataset(order, rank)` reads the shards and loads that rank's rows in its plan order (epoch 0's:
    later epochs reorder only within a length-grouping window).
    """
    owner = plan.rank_of_rows() if shared is not None else None
    datasets = {}
    for rank in range(plan.world_size):
        if shared is not None:
            ds = shared.map_batches(
                _select_rank, fn_kwargs={"owner": owner, "rank": rank}, batch_format="numpy", num_cpus=LIGHT_TASK_CPUS
            )
        else:
            ds = make_dataset(plan.order(rank, 0), rank)
        datasets[dataset_name(rank)] = ds
    return datasets


def dataset_name(rank: int) -> str:
    return f"train_rank{rank}"
