"""Ray Train launch: prepared shards stream through Ray Data into DeepSpeed workers.

Ray Data reads the Parquet shards and loads and preprocesses images on CPU
workers; each Train worker reads its share through `get_dataset_shard` and
runs `workloads.train_loop.run_training`. Per-step metrics are appended to
`metrics.jsonl` beside the run by a controller-side callback, so the curve
survives worker restarts; the final model comes back as a checkpoint holding a
`save_pretrained` folder.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator import storage
from orchestrator.cluster import cluster_cpus, cpus_per_worker
from orchestrator.config import ExperimentConfig, resolve_repo_path
from orchestrator.prepare import PreparedData
from workloads.train_loop import MODEL_SUBDIR, TrainSpec


@dataclass
class TrainResult:
    run_name: str
    run_path: str
    model_dir: str
    """Local folder with the exported model (save_pretrained + processor)."""
    history: list[dict[str, Any]]
    final_metrics: dict[str, Any]
    spec: TrainSpec


class LoadImages:
    """Ray Data stage: image paths -> `pixel_values` with the model's image processor."""

    def __init__(self, model_dir: str, image_root: str | None):
        from transformers import AutoImageProcessor

        self.processor = AutoImageProcessor.from_pretrained(model_dir)
        self.image_root = image_root

    def _open(self, image: str):
        from PIL import Image

        if storage.is_s3(self.image_root or ""):
            fs, path = storage.filesystem(storage.join(self.image_root, image))
            with fs.open_input_file(path) as handle:
                return Image.open(handle).convert("RGB")
        with Image.open(Path(self.image_root or ".", image)) as img:
            return img.convert("RGB")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        per_row = [list(images) for images in batch["images"]]
        flat = [self._open(str(p)) for images in per_row for p in images]
        pixels = self.processor(images=flat, return_tensors="np")["pixel_values"] if flat else None
        out, cursor = [], 0
        for images in per_row:
            out.append(pixels[cursor : cursor + len(images)].astype(np.float32) if images else np.zeros((0,), np.float32))
            cursor += len(images)
        return {"input_ids": batch["input_ids"], "segments": batch["segments"], "pixel_values": out}


def training_dataset(prepared: PreparedData, model_dir: str, image_root: str | None, data_cpus: float):
    import ray.data

    fs, path = storage.filesystem(prepared.shards)
    ds = ray.data.read_parquet(path, filesystem=fs, num_cpus=data_cpus).select_columns(["input_ids", "segments", "images"])
    return ds.map_batches(
        LoadImages,
        fn_constructor_kwargs={"model_dir": model_dir, "image_root": image_root},
        batch_size=64,
        num_cpus=data_cpus,
        concurrency=1,
    )


def load_deepspeed_config(value: str) -> dict[str, Any]:
    path = resolve_repo_path(value)
    if not path.exists():
        raise FileNotFoundError(f"train.deepspeed: {value} not found")
    return json.loads(path.read_text())


def train_spec(cfg: ExperimentConfig, model_dir: str, rows: int) -> TrainSpec:
    """Steps and layout from the config and the number of prepared rows."""
    train = cfg.train
    rows_per_worker = rows // train.num_workers
    steps_per_epoch = rows_per_worker // train.micro_batch_size // train.gradient_accumulation
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
    shard = ray.train.get_dataset_shard("train")

    def epoch_batches(epoch: int):
        return shard.iter_batches(batch_size=spec.micro_batch_size, batch_format="numpy", drop_last=True, prefetch_batches=2)

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
    """A controller-side callback: append rank 0's metrics per report, print progress."""
    from ray.train import UserCallback

    class MetricsLog(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            row = dict(metrics[0])
            storage.append_text(log_uri, json.dumps(row) + "\n")
            step = int(row.get("step", 0))
            if row.get("final") or step == 1 or step % max(1, total_steps // 10) == 0:
                print(
                    f"[{label}] step {step}/{total_steps} loss {row.get('loss', float('nan')):.4f} "
                    f"instr {row.get('loss_instruction', float('nan')):.3f} resp {row.get('loss_response', float('nan')):.3f} "
                    f"{row.get('tokens_per_s', 0):.0f} tok/s",
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


def run_train(
    cfg: ExperimentConfig,
    prepared: PreparedData,
    model_dir: str,
    run_name: str,
    *,
    spec_overrides: dict[str, Any] | None = None,
) -> TrainResult:
    """One Ray Train fit of `cfg` on prepared data; returns the exported model and the curve."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    spec = train_spec(cfg, model_dir, prepared.manifest["rows_written"])
    for key, value in (spec_overrides or {}).items():
        setattr(spec, key, value)
    storage_path = storage.absolute(cfg.storage.path)
    run_path = storage.join(storage_path, "runs", run_name)
    log_uri = storage.join(run_path, "metrics.jsonl")
    worker_cpus = cpus_per_worker(cfg.train.num_workers, cfg.train.cpus_per_worker, cfg.train.use_gpu)
    data_cpus = 0.25 if not cfg.train.use_gpu else 1.0
    fs, fs_path = storage.filesystem(storage.join(storage_path, "runs"))
    dataset = training_dataset(prepared, model_dir, cfg.data.image_root, data_cpus)
    spare = cluster_cpus() - worker_cpus * cfg.train.num_workers
    if cfg.train.ingest == "materialize" or (cfg.train.ingest == "auto" and spare < 1.0):
        # Too few CPUs beside the workers for Ray Data's read tasks: load everything first.
        dataset = dataset.materialize()

    trainer = TorchTrainer(
        _worker_entry,
        train_loop_config={"spec": asdict(spec)},
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
            callbacks=[_metrics_logger(log_uri, spec.total_steps, run_name)],
        ),
        datasets={"train": dataset},
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
    local_model = export_dir / MODEL_SUBDIR
    history = read_history(log_uri)
    return TrainResult(
        run_name=run_name,
        run_path=run_path,
        model_dir=str(local_model),
        history=history,
        final_metrics=dict(result.metrics or {}),
        spec=spec,
    )
