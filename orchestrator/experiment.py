"""One experiment, end to end: inputs -> prepared data -> a Ray Train fit -> evaluation -> MLflow.

`run_experiment` is the one experiment function: `l2t train`, the quickstart
and every sweep trial call it. The steps before the fit (synthetic data, the
model folder, prepared data) are keyed by their inputs and reused
(`orchestrator.steps`), so only training and evaluation repeat; a sweep
prepares once on the driver and hands each trial the same `inputs`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
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
    prepared = prepare(cfg, model_dir, progress=_prepare_progress())
    return cfg, model_dir, prepared


def _prepare_progress():
    """Preparation's progress lines: all of them when logs are live (-v), else the ones that say what came out."""
    from orchestrator.console import log_file

    if log_file() is None:
        return log
    keep = ("done in", "reusing", "quarantin", "warning", "error")
    return lambda line: log(line) if any(word in line for word in keep) else None


def run_experiment(
    cfg: ExperimentConfig,
    *,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    inputs: Inputs | None = None,
    callbacks: list | None = None,
    dataset=None,
    track: bool = True,
    fresh: bool = False,
    wrap_report=None,
    training_eval=None,
) -> ExperimentResult:
    """Prepare (or reuse `inputs`), train with Ray Train, evaluate, and (with `track`) log to MLflow.

    `cfg`'s masking and train sections win over those of `inputs` (a sweep point or quickstart arm).
    `callbacks` and `dataset` go to `run_train` (Tune's report callback, a sweep's shared images).
    With `track` the MLflow run opens when training starts, gets the curve live (with wall-clock
    timestamps) and ends FINISHED, FAILED (an error) or KILLED (Ctrl-C, SIGTERM).
    `fresh`: start the run over even when an unfinished run of the same name and configuration could resume.
    `wrap_report`: to `run_train` (tests inject faults with it).
    `training_eval`: to `run_train` (a held-out check at a sweep's ASHA rungs, `workloads.training_eval`).
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
    run_id = _open_run(resolved, run_name, parent_run_id) if track else None
    try:
        options = {
            "callbacks": callbacks,
            "dataset": dataset,
            "fresh": fresh,
            "wrap_report": wrap_report,
            "training_eval": training_eval,
        }
        result = _train_and_evaluate(resolved, model_dir, prepared, run_name, run_id, options)
        if track:
            result.mlflow_run_id = log_experiment(result, parent_run_id=parent_run_id, run_id=run_id)
    except BaseException as error:
        if run_id is not None:
            from orchestrator.tracking import end_training_run

            killed = isinstance(error, (KeyboardInterrupt, SystemExit))
            end_training_run(tracking_uri(resolved), run_id, "KILLED" if killed else "FAILED")
        raise
    result.wall_s = time.perf_counter() - started
    return result


def _open_run(cfg: ExperimentConfig, run_name: str, parent_run_id: str | None) -> str:
    from orchestrator.tracking import start_training_run, tracking_uri

    run_id = start_training_run(cfg, run_name, parent_run_id=parent_run_id)
    log(f"[mlflow] run {run_name} ({run_id}) is live in {storage.redact(tracking_uri(cfg))}")
    return run_id


def _train_and_evaluate(
    resolved: ExperimentConfig,
    model_dir: str,
    prepared: PreparedData,
    run_name: str,
    run_id: str | None,
    options: dict,
) -> ExperimentResult:
    from orchestrator.tracking import LiveMetrics, tracking_uri

    live = LiveMetrics(tracking_uri(resolved), run_id) if run_id else None
    log(f"[train] {run_name}: Ray Train, {resolved.train.num_workers} workers, DeepSpeed {resolved.train.deepspeed}")
    trained = run_train(resolved, prepared, model_dir, run_name, live_metrics=live, **options)
    log(f"[eval] {run_name}: held-out questions")
    samples_file = layout.run_file(resolved.storage.path, run_name, layout.RUN_EVAL_SAMPLES)
    eval_metrics = evaluate_model(resolved, trained.model_dir, prepared, samples_file)
    mask_uri = layout.run_file(resolved.storage.path, run_name, layout.RUN_MASK_EXAMPLE)
    mask_page = mask_example_html(resolved, prepared, model_dir, mask_uri)
    write_model_experiment(trained.model_dir, resolved)
    return ExperimentResult(
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


def log_experiment(
    result: ExperimentResult,
    *,
    parent_run_id: str | None = None,
    params: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
    run_id: str | None = None,
) -> str:
    """One MLflow run for a finished experiment (or the rest of the live `run_id`): config, curve, evaluation,
    artifacts."""
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
        run_id=run_id,
    )


# ---------------------------------------------------------------- the model folder's experiment

MODEL_EXPERIMENT_FILE = "l2t_experiment.json"
"""Written into every exported model folder: the resolved config (evaluation settings included) it was trained
with, so `l2t eval MODEL` needs no `--config`."""


def write_model_experiment(model_dir: str | Path, cfg: ExperimentConfig) -> Path:
    path = Path(model_dir, MODEL_EXPERIMENT_FILE)
    body = {"format": 1, "config": cfg.model_dump(mode="json")}
    path.write_text(storage.redact(json.dumps(body, indent=2)))  # user:password@ in URLs; keys stay as they are
    return path


def model_experiment(model_dir: str | Path) -> ExperimentConfig | None:
    """The config saved in an exported model folder (`l2t_experiment.json`), or None when it has none."""
    from orchestrator.config import config_from_dict

    path = Path(model_dir, MODEL_EXPERIMENT_FILE)
    if not path.is_file():
        return None
    log(f"[eval] using the experiment saved with the model: {path}")
    return config_from_dict(json.loads(path.read_text())["config"], str(path))
