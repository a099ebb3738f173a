"""Ray Train launch: prepared shards stream through Ray Data into DeepSpeed workers.

The driver plans the data order (`workloads.batching.BatchPlan`: which rows
form each optimizer step and which rank reads which micro-batch of it) and
builds one Ray Dataset per rank (`orchestrator.ingest`); each Train worker
reads its own dataset through `get_dataset_shard`, puts its micro-batches in
plan order and runs `workloads.train_loop.run_training`. On a cluster with no
CPU to spare beside the workers the datasets are materialized before the fit
(`train.ingest`). A resumed worker streams only the rows its checkpoint has
not trained on yet, so their images are never decoded.

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

import contextlib
import functools
import json
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator import layout, storage
from orchestrator.cluster import cluster_cpus, cpus_per_worker
from orchestrator.config import ExperimentConfig, resolve_repo_path, with_overrides
from orchestrator.images import open_image
from orchestrator.ingest import (
    LIGHT_TASK_CPUS,
    PreparedRows,
    dataset_name,
    rank_datasets,
    read_prepared_rows,
    training_dataset,
)
from orchestrator.prepare import PreparedData
from orchestrator.steps import stable_hash
from workloads.batching import LENGTH_GROUP_STEPS, BatchPlan, ordered_micro_batches
from workloads.lora import check_lora_launch
from workloads.train_loop import MODEL_SUBDIR
from workloads.training_eval import TrainingEval

RUN_STATE_FILE = "l2t_run.json"
ReportFn = Callable[[dict[str, float], str | None], None]


@dataclass
class TrainResult:
    run_name: str
    run_path: str
    model_dir: str
    """Local folder with the exported model (save_pretrained + processor)."""
    history: list[dict[str, Any]]
    final_metrics: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)
    """The data plan: steps per epoch, padding share with and without length grouping."""


def load_deepspeed_config(value: str) -> dict[str, Any]:
    path = resolve_repo_path(value)
    if not path.exists():
        raise FileNotFoundError(f"train.deepspeed: {value} not found")
    return json.loads(path.read_text())


# ---------------------------------------------------------------- the worker


def _worker_entry(config: dict[str, Any]) -> None:
    import ray.train

    from workloads.train_loop import run_training

    cfg = ExperimentConfig.model_validate(config["cfg"])
    plan = BatchPlan.from_config(config["plan"])
    rank = ray.train.get_context().get_world_rank()
    shard = ray.train.get_dataset_shard(dataset_name(rank))
    resume_stream = config.get("resume_stream")

    def epoch_batches(epoch: int, skip: int):
        order = plan.order(rank, epoch)[skip * cfg.train.micro_batch_size :]
        source = shard
        if skip and resume_stream:  # stream only the rows still to train on: skipped images are never decoded
            prepared = PreparedData.load(resume_stream["prepared"])
            source = training_dataset(prepared, **resume_stream["load"], order=order)
        # whole blocks (ingest.LOAD_BLOCK_ROWS rows); one fetched ahead: Ray Data's iterator waits for as many
        # blocks as it prefetches before the first, and finished blocks wait in its output queue meanwhile
        rows = source.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1)
        return ordered_micro_batches(
            rows, order, cfg.train.micro_batch_size, max_bad_fraction=cfg.data.max_bad_fraction
        )

    def report(metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    if config.get("wrap_report") is not None:
        report = config["wrap_report"](report)
    fit = dict(
        rows=len(plan.lengths),
        deepspeed_config=config["deepspeed"],
        training_eval=TrainingEval.from_config(
            config.get("training_eval"), functools.partial(open_image, cfg.data.image_root)
        ),
    )
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        run_training(cfg, epoch_batches, report, **fit)
    else:
        with checkpoint.as_directory() as resume_dir:
            run_training(cfg, epoch_batches, report, resume_dir=resume_dir, **fit)


def _metrics_logger(log_uri: str, total_steps: int, label: str, live: Callable[[dict], None] | None = None):
    """A controller-side callback: append rank 0's metrics (and each rank's trained tokens) per report, hand
    them to `live` (MLflow, `tracking.LiveMetrics`) as they come. Progress lines are the driver's (`_progress`):
    the controller's own output stays in Ray's logs unless the command is verbose."""
    from ray.train import UserCallback

    class MetricsLog(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            row = dict(metrics[0])
            row["trained_tokens_by_rank"] = [m.get("trained_tokens_rank") for m in metrics]
            storage.append_text(log_uri, json.dumps(row) + "\n")
            if live is not None:
                live(row)

    return MetricsLog()


def _progress_line(row: dict[str, Any], total_steps: int, label: str) -> str:
    return (
        f"[{label}] step {int(row.get('step', 0))}/{total_steps} loss {row.get('loss', float('nan')):.4f} "
        f"(instr {row.get('loss_instruction', float('nan')):.3f}, resp {row.get('loss_response', float('nan')):.3f}) "
        f"{row.get('tokens_per_s', 0):.0f} tok/s"
    )


@contextlib.contextmanager
def _progress(log_uri: str, total_steps: int, label: str, every_s: float = 2.0):
    """While the fit runs, a driver thread reads `metrics.jsonl` and prints a line at the first report, about
    every fifth of the run and the last step."""
    stop = threading.Event()
    cadence = max(1, total_steps // 5)

    def watch() -> None:
        shown, interval = 0, every_s * (3 if storage.is_s3(log_uri) else 1)
        while True:
            stopping = stop.wait(interval)
            try:
                rows = read_history(log_uri)
            except (OSError, ValueError):  # a line being written
                rows = []
            for row in rows:
                step = int(row.get("step", 0))
                crossed = step // cadence > shown // cadence  # reports may come every log_every steps
                if step > shown and (shown == 0 or crossed or step >= total_steps or row.get("final")):
                    print(_progress_line(row, total_steps, label), file=sys.stderr, flush=True)
                    shown = step
            if stopping:
                return

    thread = threading.Thread(target=watch, name="l2t-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)


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


# ---------------------------------------------------------------- the run folder


def _run_fingerprint(cfg: ExperimentConfig, deepspeed: dict, prepared: PreparedData, plan: BatchPlan) -> str:
    plan_settings = {k: v for k, v in plan.to_config().items() if k != "lengths"}
    settings = {"model": cfg.model.model_dump(mode="json"), "masking": cfg.masking.model_dump(mode="json")}
    settings["train"] = cfg.train.model_dump(mode="json")
    blob = {"spec": settings, "deepspeed": deepspeed, "data": prepared.manifest.get("key"), "plan": plan_settings}
    return stable_hash(blob)


def _claim_run_folder(run_path: str, fingerprint: str, label: str, fresh: bool = False) -> bool:
    """Keep an unfinished run of the same configuration (Ray Train resumes it) unless `fresh`; replace anything
    else. True when the run resumes."""
    state_uri = storage.join(run_path, RUN_STATE_FILE)
    if storage.exists(run_path):
        state = json.loads(storage.read_text(state_uri)) if storage.exists(state_uri) else {}
        if state.get("fingerprint") == fingerprint and not state.get("finished") and not fresh:
            print(f"[{label}] resuming the unfinished run in {run_path} from its latest checkpoint", flush=True)
            return True
        why = "--fresh" if fresh else ("it finished" if state.get("finished") else "its configuration differs")
        print(f"[{label}] starting over ({why}): replacing the earlier run in {run_path}", flush=True)
        storage.delete_dir(run_path)
    storage.write_text(state_uri, json.dumps({"fingerprint": fingerprint, "finished": False}))
    return False


def _data_plan(cfg: ExperimentConfig, rows: PreparedRows, run_name: str, group_steps: int) -> tuple[BatchPlan, dict]:
    train = cfg.train
    plan = BatchPlan(
        rows.lengths, train.micro_batch_size, train.gradient_accumulation, train.num_workers, group_steps, train.seed
    )
    data = {
        "rows": len(rows.lengths),
        "global_batch": plan.global_batch,
        "steps_per_epoch": plan.steps_per_epoch,
        "padding_share_planned": plan.padding_share(grouped=True),
        "padding_share_ungrouped": plan.padding_share(grouped=False),
    }
    print(
        f"[{run_name}] data plan: {data['rows']} rows, global batch {plan.global_batch}, "
        f"{plan.steps_per_epoch} steps/epoch; padding {data['padding_share_planned']:.1%} grouped by length "
        f"(vs {data['padding_share_ungrouped']:.1%} in data order)",
        file=sys.stderr,
        flush=True,
    )
    return plan, data


def _export_locally(result, storage_path: str, run_name: str) -> Path:
    """The final checkpoint holds the exported model; keep a local copy for evaluation."""
    export_dir = Path(layout.exported_models_dir(storage_path, run_name))
    if storage.is_s3(storage_path):
        export_dir = Path(tempfile.gettempdir(), "l2t", "models", run_name)
    if export_dir.exists():
        shutil.rmtree(export_dir)
    result.checkpoint.to_directory(str(export_dir))
    return export_dir


# ---------------------------------------------------------------- the fit


def run_train(
    cfg: ExperimentConfig,
    prepared: PreparedData,
    model_dir: str,
    run_name: str,
    *,
    callbacks: list | None = None,
    dataset=None,
    wrap_report: Callable[[ReportFn], ReportFn] | None = None,
    length_group_steps: int = LENGTH_GROUP_STEPS,
    live_metrics: Callable[[dict], None] | None = None,
    fresh: bool = False,
    training_eval: TrainingEval | None = None,
) -> TrainResult:
    """One Ray Train fit of `cfg` on prepared data; returns the exported model and the curve.

    `callbacks`: more Ray Train `UserCallback`s (e.g. Tune's report callback).
    `dataset`: a `training_dataset` of all rows, already materialized, shared by several fits.
    `wrap_report`: wraps each worker's report function (tests inject faults with it).
    `live_metrics`: called on the controller with each report's metrics row (live MLflow logging).
    `fresh`: start over even when an unfinished run of the same configuration could resume.
    `training_eval`: a held-out check at fixed steps (a sweep's ASHA rungs), run by rank 0.
    """
    from ray.data import DataContext

    DataContext.get_current().execution_options.preserve_order = True
    cfg = with_overrides(cfg, {"model.name_or_path": model_dir})
    deepspeed = load_deepspeed_config(cfg.train.deepspeed)
    zero_stage = int(deepspeed.get("zero_optimization", {}).get("stage", 0))
    check_lora_launch(cfg.model, model_dir, zero_stage, use_gpu=cfg.train.use_gpu)  # before any worker starts
    rows = read_prepared_rows(prepared)
    plan, data = _data_plan(cfg, rows, run_name, length_group_steps)
    total_steps = cfg.train.total_steps(len(rows.lengths))
    storage_path = storage.absolute(cfg.storage.path)
    run_path = layout.run_dir(storage_path, run_name)
    log_uri = storage.join(run_path, layout.RUN_METRICS)
    _claim_run_folder(run_path, _run_fingerprint(cfg, deepspeed, prepared, plan), run_name, fresh)

    train = cfg.train
    worker_cpus = cpus_per_worker(train.num_workers, train.cpus_per_worker, train.use_gpu)
    load = {"model_dir": model_dir, "image_root": cfg.data.image_root, "data_cpus": 1.0 if train.use_gpu else 0.25}
    # Too few CPUs beside the workers for Ray Data's read tasks: load everything first.
    spare = cluster_cpus() - worker_cpus * train.num_workers
    materialize = train.ingest == "materialize" or (train.ingest == "auto" and spare < 1.0)

    def make_dataset(order, rank: int):
        ds = training_dataset(prepared, **load, order=order)
        return ds.materialize() if materialize else ds

    loop_config = {
        "cfg": cfg.model_dump(mode="json"),
        "plan": plan.to_config(),
        "deepspeed": deepspeed,
        "wrap_report": wrap_report,
        "resume_stream": None,
        "training_eval": training_eval.to_config() if training_eval else None,
    }
    if dataset is None and not materialize:
        loop_config["resume_stream"] = {"prepared": prepared.path, "load": load}
    callbacks = [_metrics_logger(log_uri, total_steps, run_name, live_metrics), *(callbacks or [])]
    datasets = rank_datasets(plan, make_dataset, shared=dataset)
    trainer = _trainer(cfg, run_name, worker_cpus, loop_config, datasets, callbacks, shared=dataset is not None)
    with _progress(log_uri, total_steps, run_name):
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} ended without a final checkpoint")
    export_dir = _export_locally(result, storage_path, run_name)
    state_uri = storage.join(run_path, RUN_STATE_FILE)
    storage.write_text(state_uri, json.dumps({**json.loads(storage.read_text(state_uri)), "finished": True}))
    return TrainResult(
        run_name=run_name,
        run_path=run_path,
        model_dir=str(export_dir / MODEL_SUBDIR),
        history=read_history(log_uri),
        final_metrics=dict(result.metrics or {}),
        data=data,
    )


def _trainer(
    cfg: ExperimentConfig,
    run_name: str,
    worker_cpus: float,
    loop_config: dict,
    datasets: dict,
    callbacks: list,
    shared: bool = False,
):
    """The TorchTrainer of one fit: gloo or NCCL workers, run folder under `runs/`, failures and checkpoints.

    `shared`: the rank datasets only select rows of a materialized dataset (a sweep's trials). Each is then
    held to one row-selecting task at a time, the share `sweep.trial_layout` budgets for it: unbounded, Ray
    Data fills every CPU the cluster has free with such tasks, and a concurrent trial's evaluation actor
    (or its workers) can wait behind them as long as this trial trains."""
    import ray.train
    from ray.data import ExecutionResources
    from ray.train.torch import TorchConfig, TorchTrainer

    execution_options = {}
    for name in datasets:
        options = ray.train.DataConfig.default_ingest_options()
        options.preserve_order = False  # blocks as they are done: ordered_micro_batches puts rows in plan order
        if shared:
            options.resource_limits = ExecutionResources.for_limits(cpu=LIGHT_TASK_CPUS)
        execution_options[name] = options

    train = cfg.train
    fs, fs_path = storage.filesystem(layout.runs_dir(cfg.storage.path))
    return TorchTrainer(
        _worker_entry,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=train.num_workers,
            use_gpu=train.use_gpu,
            resources_per_worker={"CPU": worker_cpus, **({"GPU": 1} if train.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=fs_path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=[], execution_options=execution_options),
    )


def total_steps(cfg: ExperimentConfig, prepared: PreparedData) -> int:
    """Optimizer steps of a run of `cfg` on `prepared` (its written rows)."""
    return cfg.train.total_steps(prepared.manifest["rows_written"])
