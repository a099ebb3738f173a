"""`l2t sweep`: Ray Tune over λ_I, λ_A and any other config key.

Each trial is a Tune function that runs one Ray Train fit (Train V2: the
trainer runs inside the trial and forwards its reports to Tune through
`TuneReportCallback`), then evaluates the exported model. Data preparation
and image loading happen once, on the driver, for the whole sweep.

A sweep's name (and so its folder) is a hash of its config, so running the
same command again restores the Tune experiment: finished trials are kept,
unfinished and errored ones run again. A trial that wrote its summary
(`trials/<id>.json`) before the driver died, but after Tune last saved its
state, is not retrained: it reports the stored result again. An unfinished
trial's Train run continues from its last checkpoint.

MLflow is written by the driver only (one parent run per sweep, one child
per trial), after trials finish: the default SQLite store does not take
concurrent writers, and a restarted trial never logs twice.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import layout, storage
from orchestrator.cluster import cluster_cpus
from orchestrator.config import ConfigError, ExperimentConfig, config_from_dict, with_overrides
from orchestrator.console import log
from orchestrator.early_stopping import asha_scheduler, training_eval_for
from orchestrator.experiment import prepare_inputs, run_experiment
from orchestrator.ingest import LIGHT_TASK_CPUS
from orchestrator.prepare import PreparedData
from orchestrator.train import read_history
from workloads.training_eval import TrainingEval

TRIAL_CPU = 0.01  # the trial function itself only waits on its Train run (0 is refused)
SWEEP_STATE = "sweep.json"
TRIALS_DIR = "trials"
SEED_KEY = "train.seed"


def point_tag(point: dict[str, Any]) -> str:
    """The arm a trial belongs to: its point without the seed (JSON, keys sorted)."""
    return json.dumps({k: v for k, v in point.items() if k != SEED_KEY}, sort_keys=True)


SHORT_KEYS = {"masking.lambda_instruction": "λI", "masking.lambda_response": "λA", SEED_KEY: "seed"}
IDENTITY_PARAMS = ("masking.mode", "masking.lambda_instruction", "masking.lambda_response", SEED_KEY, "train.lr")
"""Params every child run carries (what `l2t compare` reads, and the learning rate), beside its point's keys."""


def trial_title(cfg: ExperimentConfig, point: dict[str, Any]) -> str:
    """A trial's MLflow run name, by its point: `l2t λI=0.5 λA=1 seed=0` (mode, λs, other swept keys, seed)."""
    m = cfg.masking
    parts = [m.mode, f"λI={m.lambda_instruction:g}", f"λA={m.lambda_response:g}"]
    for key, value in sorted(point.items()):
        if key not in SHORT_KEYS and key != "masking.mode":
            short = key.rsplit(".", 1)[-1]
            parts.append(f"{short}={value:g}" if isinstance(value, float) else f"{short}={value}")
    return " ".join([*parts, f"seed={cfg.train.seed}"])


def trial_params(cfg: ExperimentConfig, point: dict[str, Any]) -> dict[str, Any]:
    """A child run's config params: only what differs between trials (its point) and IDENTITY_PARAMS;
    the whole resolved config is the run's `config.json` artifact."""
    flat = cfg.flat()
    return {key: flat.get(key) for key in (*IDENTITY_PARAMS, *sorted(point)) if key in flat}


def sweep_points(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """The trials of a sweep as `{dotted.key: value}` overrides, each checked against the schema."""
    s = cfg.sweep
    axes: dict[str, list[Any]] = {}
    if s.lambda_instruction:
        axes["masking.lambda_instruction"] = list(s.lambda_instruction)
    if s.lambda_response:
        axes["masking.lambda_response"] = list(s.lambda_response)
    axes.update({k: list(v) for k, v in s.parameters.items()})
    if s.search == "points":
        points = [dict(p) for p in s.points]
    elif not axes and not s.seeds:
        raise ConfigError(
            "sweep: nothing to sweep; set sweep.lambda_instruction, sweep.lambda_response or sweep.parameters"
        )
    elif s.search == "random":
        rng = random.Random(s.seed)
        points = [{k: rng.choice(v) for k, v in axes.items()} for _ in range(s.num_samples)]
    else:
        points = [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]
    if not points:
        raise ConfigError("sweep: no trials (sweep.points is empty)")
    if s.seeds:
        points = [{**point, SEED_KEY: seed} for point in points for seed in s.seeds]
    for i, point in enumerate(points):
        try:
            with_overrides(cfg, point)
        except ConfigError as error:
            raise ConfigError(f"sweep point {i} {point}: {error}") from None
    return points


def sweep_name(cfg: ExperimentConfig) -> str:
    """Stable per config, so re-running the command resumes the same sweep."""
    return f"{cfg.name}-sweep-{cfg.fingerprint('data', 'model', 'masking', 'train', 'sweep', 'eval')[:10]}"


def trial_layout(cfg: ExperimentConfig, points: int) -> tuple[int, float]:
    """(concurrent trials, CPUs per Train worker) so that concurrent trials fit the cluster."""
    workers = cfg.train.num_workers
    if cfg.train.use_gpu:
        return cfg.sweep.max_concurrent_trials or points, cfg.train.cpus_per_worker or 1.0
    cpus = cluster_cpus()
    concurrent = cfg.sweep.max_concurrent_trials or max(1, min(points, int(cpus // (workers * 0.5))))
    # Beside its workers each trial holds its trial function and one row-selecting Ray Data task per rank.
    per_trial_extra = TRIAL_CPU + workers * LIGHT_TASK_CPUS
    per_worker = (
        cfg.train.cpus_per_worker
        or math.floor(100 * (cpus - per_trial_extra * concurrent) / (concurrent * workers)) / 100
    )
    if per_worker <= 0:
        raise ConfigError(f"sweep: {concurrent} concurrent trials of {workers} workers do not fit {cpus:g} CPUs")
    return concurrent, min(per_worker, 1.0)


@dataclass
class SweepResult:
    name: str
    path: str
    parent_run_id: str
    trials: list[dict[str, Any]]


def _trial(
    config: dict[str, Any],
    *,
    cfg_json: dict,
    model_dirs: dict,
    prepared_path: str,
    dataset,
    sweep_path: str,
    training_eval: dict | None = None,
) -> None:
    """One Tune trial: `run_experiment` (a Ray Train fit reporting to Tune, then evaluation); MLflow is the driver's."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = with_overrides(config_from_dict(cfg_json), config["point"])
    prepared = PreparedData.load(prepared_path)
    trial_id = ray.tune.get_context().get_trial_id()
    summary_uri = storage.join(sweep_path, TRIALS_DIR, f"{trial_id}.json")
    if storage.exists(summary_uri):
        # Finished before the driver died, but Tune had not saved that: report it again, don't retrain.
        summary = json.loads(storage.read_text(summary_uri))
        history = read_history(storage.join(summary["run_path"], layout.RUN_METRICS))
        _report_final(history[-1] if history else {}, summary["eval"])
        return
    result = run_experiment(
        cfg,
        run_name=f"{Path(sweep_path).name}-{trial_id}",
        inputs=(cfg, model_dirs[cfg.train.seed], prepared),
        callbacks=[TuneReportCallback()],
        dataset=dataset,
        track=False,
        training_eval=TrainingEval.from_config(training_eval),
    )
    trained = result.train
    summary = {
        "trial_id": trial_id,
        "run_name": result.run_name,
        "point": config["point"],
        "model_dir": trained.model_dir,
        "run_path": trained.run_path,
        "eval": result.eval_metrics,
        "eval_samples": result.eval_samples_file,
    }
    storage.write_text(summary_uri, json.dumps(summary, indent=2))
    _report_final(trained.history[-1] if trained.history else {}, result.eval_metrics)


def _report_final(last_step: dict[str, Any], eval_metrics: dict[str, float]) -> None:
    import ray.tune

    ray.tune.report(
        {
            **{k: v for k, v in last_step.items() if isinstance(v, (int, float))},
            **{f"eval/{k}": v for k, v in eval_metrics.items()},
            "evaluated": 1,
        }
    )


def run_sweep(cfg: ExperimentConfig) -> SweepResult:
    """Run (or resume) the sweep described by `cfg.sweep`; returns the trials as logged to MLflow."""
    import ray.tune

    from orchestrator.ingest import training_dataset
    from orchestrator.tracking import check_reachable, tracking_uri

    check_reachable(tracking_uri(cfg))
    points = sweep_points(cfg)
    name = sweep_name(cfg)
    path = layout.sweep_dir(cfg.storage.path, name)
    resolved, model_dir, prepared = prepare_inputs(cfg)
    model_dirs = _model_per_seed(resolved, model_dir, prepared, points)
    concurrent, worker_cpus = trial_layout(resolved, len(points))
    resolved = with_overrides(resolved, {"train.cpus_per_worker": worker_cpus, "train.ingest": "materialize"})
    workers = f"{resolved.train.num_workers} workers x {worker_cpus:g} CPU each"
    log(f"[sweep] {name}: {len(points)} trials, {concurrent} at a time, {workers} -> {path}")
    rung_check = training_eval_for(resolved, prepared)  # refused before anything runs
    state = _sweep_state(resolved, name, path, points)

    # Images are loaded once for every trial: the materialized blocks stay in the object store.
    data_cpus = min(1.0, cluster_cpus())
    dataset = training_dataset(prepared, model_dir, resolved.data.image_root, data_cpus).materialize()
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(
            _trial,
            cfg_json=resolved.model_dump(mode="json"),
            model_dirs=model_dirs,
            prepared_path=prepared.path,
            dataset=dataset,
            sweep_path=path,
            training_eval=rung_check.to_config() if rung_check else None,
        ),
        {"CPU": TRIAL_CPU},
    )
    results = _tuner(resolved, name, trainable, points, concurrent, prepared).fit()
    trials = _log_trials(resolved, state, path, results, prepared)
    return SweepResult(name=name, path=path, parent_run_id=state["parent_run_id"], trials=trials)


def _model_per_seed(cfg: ExperimentConfig, model_dir: str, prepared: PreparedData, points: list[dict]) -> dict:
    """{seed: model folder}: the tiny preset draws its initial weights from the seed, so each seed gets its own
    (same tokenizer, so every trial shares the prepared data); any other model is the same folder for all."""
    from orchestrator.inputs import resolve_model
    from orchestrator.prepare import preparation_key
    from orchestrator.readers import list_source_files

    seeds = sorted({int(p.get(SEED_KEY, cfg.train.seed)) for p in points} | {cfg.train.seed})
    if cfg.model.name_or_path != "tiny":
        return {seed: model_dir for seed in seeds}
    files = list_source_files(cfg.data.sources)
    out = {}
    for seed in seeds:
        seeded = with_overrides(cfg, {SEED_KEY: seed})
        out[seed] = resolve_model(seeded)
        if preparation_key(seeded, files, out[seed]) != prepared.manifest["key"]:
            raise ConfigError(
                f"sweep.seeds: the tiny preset of seed {seed} has another tokenizer than seed {cfg.train.seed}"
            )
    return out


def _sweep_state(cfg: ExperimentConfig, name: str, path: str, points: list[dict]) -> dict[str, Any]:
    """The sweep's saved state (its MLflow parent run): read on resume, else created with a new parent run."""
    from orchestrator.tracking import start_parent_run

    state_uri = storage.join(path, SWEEP_STATE)
    if storage.exists(state_uri):
        state = json.loads(storage.read_text(state_uri))
        log(f"[sweep] resuming {name} (MLflow parent run {state['parent_run_id']})")
        return state
    state = {"name": name, "points": points, "parent_run_id": start_parent_run(cfg, name, tags={"l2t.sweep": name})}
    storage.write_text(state_uri, json.dumps(state, indent=2))
    return state


def _tuner(cfg: ExperimentConfig, name: str, trainable, points: list[dict], concurrent: int, prepared: PreparedData):
    """The Tune experiment: restored from the sweep's folder when it exists (the same command resumes)."""
    import ray.tune

    scheduler = asha_scheduler(cfg, prepared)
    root = layout.sweeps_dir(cfg.storage.path)
    fs, fs_root = storage.filesystem(root)
    tune_path = layout.sweep_dir(cfg.storage.path, name)
    s3 = storage.is_s3(tune_path)
    if ray.tune.Tuner.can_restore(tune_path if s3 else storage.filesystem(tune_path)[1]):
        return ray.tune.Tuner.restore(
            tune_path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs if s3 else None
        )
    return ray.tune.Tuner(
        trainable,
        param_space={"point": ray.tune.grid_search(points)},
        tune_config=ray.tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=concurrent),
        run_config=ray.tune.RunConfig(
            name=name,
            storage_path=fs_root,
            storage_filesystem=fs,
            failure_config=ray.tune.FailureConfig(max_failures=cfg.sweep.max_failures),
            verbose=1,
        ),
    )


def _log_trials(cfg: ExperimentConfig, state: dict, path: str, results, prepared: PreparedData) -> list[dict[str, Any]]:
    """One MLflow child run per trial not logged yet: evaluated trials and those ASHA stopped."""
    import mlflow

    from orchestrator.tracking import log_training_run, tracking_uri

    mlflow.set_tracking_uri(tracking_uri(cfg))
    parent = state["parent_run_id"]
    logged = {
        r.data.tags.get("l2t.trial_id")
        for r in mlflow.search_runs(
            experiment_names=[cfg.tracking.experiment],
            filter_string=f"tags.mlflow.parentRunId = '{parent}'",
            output_format="list",
        )
    }
    trials = []
    for result in results:
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
        summary_uri = storage.join(path, TRIALS_DIR, f"{trial_id}.json")
        point = (result.config or {}).get("point", {})
        run_name = f"{Path(path).name}-{trial_id}"
        run_path = layout.run_dir(cfg.storage.path, run_name)
        summary = json.loads(storage.read_text(summary_uri)) if storage.exists(summary_uri) else None
        status = "completed" if summary else ("errored" if result.error else "stopped_early")
        trial = {
            "trial_id": trial_id,
            "point": point,
            "status": status,
            "run_name": run_name,
            "eval": (summary or {}).get("eval", {}),
        }
        trials.append(trial)
        if trial_id in logged:
            continue
        trial_cfg = with_overrides(cfg, point)
        history = read_history(storage.join(run_path, layout.RUN_METRICS))
        artifacts = {
            "metrics": storage.join(run_path, layout.RUN_METRICS),
            "task_templates": prepared.task_templates_file,
            "mask_example": storage.join(run_path, layout.RUN_MASK_EXAMPLE),
        }
        if summary:
            artifacts["eval"] = summary["eval_samples"]
        log_training_run(
            trial_cfg,
            run_name=trial_title(trial_cfg, point),
            config_params=trial_params(trial_cfg, point),
            history=history,
            eval_metrics=trial["eval"],
            params={
                "prepared.key": prepared.manifest["key"],
                "sweep.name": state["name"],
                "model.exported_to": (summary or {}).get("model_dir", ""),
                "seed": trial_cfg.train.seed,
            },
            artifacts=artifacts,
            parent_run_id=parent,
            tags={
                "l2t.trial_id": trial_id,
                "l2t.trial_status": status,
                "l2t.sweep": state["name"],
                "l2t.point": point_tag(point),
                "l2t.seed": str(trial_cfg.train.seed),
                "l2t.run_folder": run_name,  # runs/<this>: the Ray Train run (checkpoints, metrics.jsonl)
            },
        )
    return trials
