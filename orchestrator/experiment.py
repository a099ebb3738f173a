"""One experiment, end to end: inputs -> prepared data -> a Ray Train fit -> evaluation -> MLflow.

`run_experiment` is the one experiment function: `l2t train`, the quickstart
and every sweep trial call it. The steps before the fit (synthetic data, the
model folder, prepared data) are keyed by their inputs and reused
(`orchestrator.steps`), so only training and evaluation repeat; a sweep
prepares once on the driver and hands each trial the same `inputs`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from orchestrator import layout, storage
from orchestrator.config import ExperimentConfig, with_overrides
from orchestrator.console import log
from orchestrator.evaluate import evaluate_model
from orchestrator.inputs import materialize_synthetic, resolve_model
from orchestrator.mask_examples import mask_example_html
from orchestrator.prepare import PreparedData, prepare
from orchestrator.train import TrainResult, run_train

Inputs = tuple[ExperimentConfig, str, PreparedData]
"""(the config with data resolved to files, the model folder, the prepared data): everything a fit reads."""


@dataclass
class ExperimentResult:
    run_name: str
    config: ExperimentConfig
    train: TrainResult
    eval_metrics: dict[str, float]
    eval_samples_file: str
    mlflow_run_id: str | None
    wall_s: float
    prepared: PreparedData
    mask_example: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def default_run_name(cfg: ExperimentConfig) -> str:
    m = cfg.masking
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{cfg.name}-{m.mode}-li{m.lambda_instruction:g}-la{m.lambda_response:g}-{stamp}"


def prepare_inputs(cfg: ExperimentConfig) -> Inputs:
    """Synthetic data (if configured), model, prepared shards: everything a fit reads."""
    cfg = materialize_synthetic(cfg)
    model_dir = resolve_model(cfg)
    log(f"[prepare] Ray Data: validate, count task templates, tokenize and segment {cfg.data.sources}")
    prepared = prepare(cfg, model_dir)
    m = prepared.manifest
    log(
        f"[prepare] {m['rows_written']} rows written, {m['rows_quarantined']} quarantined, "
        f"{m['task_templates']} task templates -> {prepared.path}"
    )
    return cfg, model_dir, prepared


def run_experiment(
    cfg: ExperimentConfig,
    *,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    inputs: Inputs | None = None,
    callbacks: list | None = None,
    dataset=None,
    track: bool = True,
) -> ExperimentResult:
    """Prepare (or reuse `inputs`), train with Ray Train, evaluate, and (with `track`) log to MLflow.

    `cfg`'s masking and train sections win over those of `inputs` (a sweep point or quickstart arm).
    `callbacks` and `dataset` go to `run_train` (Tune's report callback, a sweep's shared images).
    """
    from orchestrator.tracking import check_reachable, tracking_uri

    started = time.perf_counter()
    if track:
        check_reachable(tracking_uri(cfg))
    resolved, model_dir, prepared = inputs or prepare_inputs(cfg)
    resolved = with_overrides(
        resolved, {"masking": cfg.masking.model_dump(mode="json"), "train": cfg.train.model_dump(mode="json")}
    )
    run_name = run_name or default_run_name(resolved)
    log(f"[train] {run_name}: Ray Train, {resolved.train.num_workers} workers, DeepSpeed {resolved.train.deepspeed}")
    trained = run_train(resolved, prepared, model_dir, run_name, callbacks=callbacks, dataset=dataset)
    log(f"[eval] {run_name}: held-out questions")
    samples_file = layout.run_file(resolved.storage.path, run_name, layout.RUN_EVAL_SAMPLES)
    eval_metrics = evaluate_model(resolved, trained.model_dir, prepared, samples_file)
    mask_uri = layout.run_file(resolved.storage.path, run_name, layout.RUN_MASK_EXAMPLE)
    mask_page = mask_example_html(resolved, prepared, model_dir, mask_uri)
    result = ExperimentResult(
        run_name=run_name,
        config=resolved,
        train=trained,
        eval_metrics=eval_metrics,
        eval_samples_file=samples_file,
        mlflow_run_id=None,
        wall_s=0.0,
        prepared=prepared,
        mask_example=mask_page,
    )
    if track:
        result.mlflow_run_id = log_experiment(result, parent_run_id=parent_run_id)
    result.wall_s = time.perf_counter() - started
    return result


def log_experiment(
    result: ExperimentResult,
    *,
    parent_run_id: str | None = None,
    params: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """One MLflow run for a finished experiment: config, curve, evaluation, artifacts."""
    from orchestrator.tracking import log_training_run

    trained, prepared = result.train, result.prepared
    return log_training_run(
        result.config,
        run_name=result.run_name,
        history=trained.history,
        eval_metrics=result.eval_metrics,
        params={
            "prepared.key": prepared.manifest["key"],
            "prepared.path": prepared.path,
            "model.exported_to": trained.model_dir,
            **(params or {}),
        },
        artifacts={
            "task_templates": prepared.task_templates_file,
            "eval": result.eval_samples_file,
            "metrics": storage.join(trained.run_path, layout.RUN_METRICS),
            "mask_example": result.mask_example,
        },
        parent_run_id=parent_run_id,
        tags=tags,
    )
