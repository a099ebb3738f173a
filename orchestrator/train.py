"""Ray Train launch: prepared shards stream through Ray Data into DeepSpeed workers.

Data order is planned, not left to chance. The driver reads each prepared
row's length (rows are numbered by shard file, then position) and makes a
`BatchPlan`: which rows form each optimizer step, and which rank reads which
micro-batch of it. Global batches depend only on the data, the global batch
size and the seed, not on how a step is split into workers × accumulation ×
micro-batches, so those layouts train on the same steps, and a restarted
worker group reads exactly the rows it read before. Within windows of a few
steps rows are grouped by length, so micro-batches hold rows of similar
length and carry little padding (`padding_share` per step and for the run).

Ray Data reads the shards' row groups and, per rank, keeps only that rank's
rows and loads their images with the model's image processor on CPU; each
Train worker reads its own dataset through `get_dataset_shard` and puts its
micro-batches in plan order before `workloads.train_loop.run_training` sees
them. On a cluster with no CPU to spare beside the workers the datasets are
materialized before the fit (`train.ingest`).

Per-step metrics are appended to `metrics.jsonl` beside the run by a
controller-side callback, so the curve survives worker restarts; the final
model comes back as a checkpoint holding a `save_pretrained` folder.

Runs and their names: Ray Train resumes a run whose folder already holds
checkpoints. `run_train` lets it do so only for an unfinished run of the same
configuration (a driver that died mid-run is picked up where it stopped);
otherwise the old folder is replaced, so a re-run never starts from another
run's weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator import storage
from orchestrator.cluster import cluster_cpus, cpus_per_worker
from orchestrator.config import ExperimentConfig, resolve_repo_path
from orchestrator.prepare import PreparedData
from workloads.train_loop import MODEL_SUBDIR, TrainSpec

RUN_STATE_FILE = "l2t_run.json"
LENGTH_GROUP_STEPS = 8
"""Global batches per length-grouping window (rows are sorted by length within it)."""
READ_CHUNK_ROWS = 128
"""Rows per Ray Data read unit (a slice of a Parquet row group)."""
LIGHT_TASK_CPUS = 0.05
"""CPU share of Ray Data tasks that only select rows."""


@dataclass
class TrainResult:
    run_name: str
    run_path: str
    model_dir: str
    """Local folder with the exported model (save_pretrained + processor)."""
    history: list[dict[str, Any]]
    final_metrics: dict[str, Any]
    spec: TrainSpec
    data: dict[str, Any] = field(default_factory=dict)
    """The data plan: steps per epoch, padding share with and without length grouping."""


# ---------------------------------------------------------------- the data plan


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
    """Ray Data stage: slices of Parquet row groups -> rows with their `row` number, tokens and `pixel_values`
    (the model's image processor); with `owner` and `rank`, only that rank's rows, kept before any image is opened."""

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
        self.owner, self.rank = owner, rank
        self._group: tuple[Any, dict[str, list]] | None = None  # the last row group read (its slices come in a row)

    def _columns(self, path: str, index: int) -> dict[str, list]:
        import pyarrow.parquet as pq

        if self._group is None or self._group[0] != (path, index):
            with self.fs.open_input_file(path) as handle:
                table = pq.ParquetFile(handle).read_row_group(index, columns=["input_ids", "segments", "images"])
            self._group = ((path, index), {name: table.column(name).to_pylist() for name in table.column_names})
        return self._group[1]

    def _open(self, image: str):
        from PIL import Image

        if storage.is_s3(self.image_root or ""):
            fs, path = storage.filesystem(storage.join(self.image_root, image))
            with fs.open_input_file(path) as handle:
                return Image.open(handle).convert("RGB")
        with Image.open(Path(self.image_root or ".", image)) as img:
            return img.convert("RGB")

    def __call__(self, chunks: dict[str, np.ndarray]) -> dict[str, Any]:
        out: dict[str, list] = {"row": [], "input_ids": [], "segments": [], "pixel_values": []}
        for path, index, start, stop, first in zip(
            chunks["path"], chunks["row_group"], chunks["start"], chunks["stop"], chunks["first_row"]
        ):
            columns = self._columns(str(path), int(index))
            rows = int(first) + np.arange(int(stop) - int(start))
            keep = np.arange(len(rows)) if self.rank is None else np.flatnonzero(self.owner[rows] == self.rank)
            per_row = [columns["images"][int(start) + i] for i in keep]
            flat = [self._open(str(p)) for images in per_row for p in images]
            pixels = self.processor(images=flat, return_tensors="np")["pixel_values"] if flat else None
            cursor = 0
            for i, images in zip(keep, per_row):
                out["row"].append(int(rows[i]))
                out["input_ids"].append(np.asarray(columns["input_ids"][int(start) + i], dtype=np.int32))
                out["segments"].append(np.asarray(columns["segments"][int(start) + i], dtype=np.int8))
                out["pixel_values"].append(
                    pixels[cursor : cursor + len(images)].astype(np.float32) if images else np.zeros((0,), np.float32)
                )
                cursor += len(images)
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


# ---------------------------------------------------------------- the fit


def load_deepspeed_config(value: str) -> dict[str, Any]:
    path = resolve_repo_path(value)
    if not path.exists():
        raise FileNotFoundError(f"train.deepspeed: {value} not found")
    return json.loads(path.read_text())


def train_spec(cfg: ExperimentConfig, model_dir: str, rows: int) -> TrainSpec:
    """Steps and layout from the config and the number of prepared rows."""
    train = cfg.train
    steps_per_epoch = rows // (train.num_workers * train.micro_batch_size * train.gradient_accumulation)
    if steps_per_epoch < 1:
        raise ValueError(
            f"{rows} rows are too few for one step of {train.num_workers} workers x micro batch "
            f"{train.micro_batch_size} x accumulation {train.gradient_accumulation}"
        )
    total_steps = train.max_steps or max(1, math.ceil(train.epochs * steps_per_epoch))
    return TrainSpec(
        model_path=model_dir,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        mode=cfg.masking.mode,
        lambda_instruction=cfg.masking.lambda_instruction,
        lambda_response=cfg.masking.lambda_response,
        freeze=cfg.model.freeze,
        lr=train.lr,
        lr_schedule=train.lr_schedule,
        warmup_ratio=train.warmup_ratio,
        weight_decay=train.weight_decay,
        grad_clip=train.grad_clip,
        micro_batch_size=train.micro_batch_size,
        gradient_accumulation=train.gradient_accumulation,
        seed=train.seed,
        use_gpu=train.use_gpu,
        dtype=cfg.model.dtype,
        attn_implementation=cfg.model.attn_implementation,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        deepspeed_config=load_deepspeed_config(train.deepspeed),
        checkpoint_every=train.checkpoint_every,
        log_every=train.log_every,
    )


def _worker_entry(config: dict[str, Any]) -> None:
    import ray.train

    from workloads.train_loop import run_training

    spec = TrainSpec(**config["spec"])
    plan = BatchPlan.from_config(config["plan"])
    rank = ray.train.get_context().get_world_rank()
    shard = ray.train.get_dataset_shard(dataset_name(rank))

    def epoch_batches(epoch: int):
        rows = shard.iter_batches(batch_size=64, batch_format="numpy", prefetch_batches=2)
        return ordered_micro_batches(rows, plan.order(rank, epoch), spec.micro_batch_size)

    def report(metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        run_training(spec, epoch_batches, report)
    else:
        with checkpoint.as_directory() as resume_dir:
            run_training(spec, epoch_batches, report, resume_dir=resume_dir)


def _metrics_logger(log_uri: str, total_steps: int, label: str):
    """A controller-side callback: append rank 0's metrics (plus each rank's trained tokens) per report, print progress."""
    from ray.train import UserCallback

    class MetricsLog(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            row = dict(metrics[0])
            row["trained_tokens_by_rank"] = [m.get("trained_tokens_rank") for m in metrics]
            storage.append_text(log_uri, json.dumps(row) + "\n")
            step = int(row.get("step", 0))
            if row.get("final") or step == 1 or step % max(1, total_steps // 10) == 0:
                print(
                    f"[{label}] step {step}/{total_steps} loss {row.get('loss', float('nan')):.4f} "
                    f"instr {row.get('loss_instruction', float('nan')):.3f} resp {row.get('loss_response', float('nan')):.3f} "
                    f"{row.get('tokens_per_s', 0):.0f} tok/s, padding {row.get('padding_share', 0):.1%}",
                    flush=True,
                )

    return MetricsLog()


def read_history(log_uri: str) -> list[dict[str, Any]]:
    """Metrics by step; after a restart the replayed steps replace the earlier ones."""
    if not storage.exists(log_uri):
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for line in storage.read_text(log_uri).splitlines():
        if line.strip():
            row = json.loads(line)
            by_step[int(row.get("step", 0))] = row
    return [by_step[k] for k in sorted(by_step)]


def _run_fingerprint(spec: TrainSpec, prepared: PreparedData, plan: BatchPlan) -> str:
    settings = {k: v for k, v in asdict(spec).items() if k not in ("fail_at_step", "fail_marker")}
    plan_settings = {k: v for k, v in asdict(plan).items() if k != "lengths"}
    blob = json.dumps(
        {"spec": settings, "data": prepared.manifest.get("key"), "plan": plan_settings}, sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _claim_run_folder(run_path: str, fingerprint: str, label: str) -> None:
    """Keep an unfinished run of the same configuration (Ray Train resumes it); replace anything else."""
    state_uri = storage.join(run_path, RUN_STATE_FILE)
    if storage.exists(run_path):
        state = json.loads(storage.read_text(state_uri)) if storage.exists(state_uri) else {}
        if state.get("fingerprint") == fingerprint and not state.get("finished"):
            print(f"[{label}] resuming the unfinished run in {run_path} from its latest checkpoint", flush=True)
            return
        print(f"[{label}] replacing the earlier run in {run_path}", flush=True)
        storage.delete_dir(run_path)
    storage.write_text(state_uri, json.dumps({"fingerprint": fingerprint, "finished": False}))


def run_train(
    cfg: ExperimentConfig,
    prepared: PreparedData,
    model_dir: str,
    run_name: str,
    *,
    spec_overrides: dict[str, Any] | None = None,
    callbacks: list | None = None,
    dataset=None,
    length_group_steps: int = LENGTH_GROUP_STEPS,
) -> TrainResult:
    """One Ray Train fit of `cfg` on prepared data; returns the exported model and the curve.

    `callbacks`: more Ray Train `UserCallback`s (e.g. Tune's report callback).
    `dataset`: a `training_dataset` of all rows, already materialized, shared by several fits.
    """
    import ray.train
    from ray.data import DataContext
    from ray.train.torch import TorchConfig, TorchTrainer

    DataContext.get_current().execution_options.preserve_order = True
    spec = train_spec(cfg, model_dir, prepared.manifest["rows_written"])
    for key, value in (spec_overrides or {}).items():
        setattr(spec, key, value)
    rows = read_prepared_rows(prepared)
    plan = BatchPlan(
        rows.lengths,
        spec.micro_batch_size,
        spec.gradient_accumulation,
        cfg.train.num_workers,
        length_group_steps,
        spec.seed,
    )
    spec.steps_per_epoch = plan.steps_per_epoch
    data = {
        "rows": len(rows.lengths),
        "global_batch": plan.global_batch,
        "steps_per_epoch": plan.steps_per_epoch,
        "padding_share_planned": plan.padding_share(grouped=True),
        "padding_share_ungrouped": plan.padding_share(grouped=False),
    }
    print(
        f"[{run_name}] data plan: {data['rows']} rows, global batch {plan.global_batch}, {plan.steps_per_epoch} steps/epoch; "
        f"padding {data['padding_share_planned']:.1%} grouped by length (vs {data['padding_share_ungrouped']:.1%} in data order)",
        flush=True,
    )

    storage_path = storage.absolute(cfg.storage.path)
    run_path = storage.join(storage_path, "runs", run_name)
    log_uri = storage.join(run_path, "metrics.jsonl")
    _claim_run_folder(run_path, _run_fingerprint(spec, prepared, plan), run_name)
    worker_cpus = cpus_per_worker(cfg.train.num_workers, cfg.train.cpus_per_worker, cfg.train.use_gpu)
    data_cpus = 0.25 if not cfg.train.use_gpu else 1.0
    fs, fs_path = storage.filesystem(storage.join(storage_path, "runs"))
    spare = cluster_cpus() - worker_cpus * cfg.train.num_workers
    # Too few CPUs beside the workers for Ray Data's read tasks: load everything first.
    materialize = cfg.train.ingest == "materialize" or (cfg.train.ingest == "auto" and spare < 1.0)

    def make_dataset(owner: np.ndarray, rank: int):
        ds = training_dataset(prepared, model_dir, cfg.data.image_root, data_cpus, rows=rows, owner=owner, rank=rank)
        return ds.materialize() if materialize else ds

    datasets = rank_datasets(plan, make_dataset, shared=dataset)

    trainer = TorchTrainer(
        _worker_entry,
        train_loop_config={"spec": asdict(spec), "plan": plan.to_config()},
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": worker_cpus, **({"GPU": 1} if cfg.train.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=fs_path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[_metrics_logger(log_uri, spec.total_steps, run_name), *(callbacks or [])],
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} ended without a final checkpoint")
    # The final checkpoint holds the exported model; keep a local copy for evaluation.
    local_root = Path(storage_path) if not storage.is_s3(storage_path) else Path(tempfile.gettempdir(), "l2t")
    export_dir = local_root / "models" / run_name
    if export_dir.exists():
        shutil.rmtree(export_dir)
    result.checkpoint.to_directory(str(export_dir))
    state_uri = storage.join(run_path, RUN_STATE_FILE)
    storage.write_text(state_uri, json.dumps({**json.loads(storage.read_text(state_uri)), "finished": True}))
    history = read_history(log_uri)
    return TrainResult(
        run_name=run_name,
        run_path=run_path,
        model_dir=str(export_dir / MODEL_SUBDIR),
        history=history,
        final_metrics=dict(result.metrics or {}),
        spec=spec,
        data=data,
    )
