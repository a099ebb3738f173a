"""Where every step writes, under `storage.path`: the one place that spells the run layout.

    data/synthetic-<key>/     generated data (train.jsonl, eval.jsonl, images/)
    models/tiny-<key>/        the tiny preset (save_pretrained)
    prepared/<key>/           shards/, quarantine/, task_templates.json, manifest.json
    runs/<run>/               a Ray Train run: checkpoints, metrics.jsonl, eval samples
    models/<run>/model/       the exported model (save_pretrained + processor)
    sweeps/<name>/            a Ray Tune experiment, its state and trial summaries
    mlflow.db                 the MLflow store when tracking.uri is unset

Keys come from `orchestrator.steps.stable_hash` over what determines a step.
Every function takes the storage root (a local folder or s3:// URI) and
returns a URI under it.
"""

from __future__ import annotations

from orchestrator import storage

MLFLOW_DB = "mlflow.db"
RUN_METRICS = "metrics.jsonl"
RUN_EVAL_SAMPLES = "eval_samples.jsonl"
RUN_MASK_EXAMPLE = "mask_example.html"


def root(storage_path: str) -> str:
    """The storage root as an absolute local path or s3:// URI."""
    return storage.absolute(storage_path)


def synthetic_dir(storage_path: str, key: str) -> str:
    return storage.join(root(storage_path), "data", f"synthetic-{key}")


def tiny_model_dir(storage_path: str, key: str) -> str:
    return storage.join(root(storage_path), "models", f"tiny-{key}")


def prepared_dir(storage_path: str, key: str) -> str:
    return storage.join(root(storage_path), "prepared", key)


def runs_dir(storage_path: str) -> str:
    return storage.join(root(storage_path), "runs")


def run_dir(storage_path: str, run_name: str) -> str:
    return storage.join(runs_dir(storage_path), run_name)


def run_file(storage_path: str, run_name: str, name: str) -> str:
    """A file of a run's folder (`RUN_METRICS`, `RUN_EVAL_SAMPLES`, `RUN_MASK_EXAMPLE`)."""
    return storage.join(run_dir(storage_path, run_name), name)


def exported_models_dir(storage_path: str, run_name: str) -> str:
    """Where a run's final checkpoint (holding `model/`) is copied for evaluation."""
    return storage.join(root(storage_path), "models", run_name)


def sweeps_dir(storage_path: str) -> str:
    return storage.join(root(storage_path), "sweeps")


def sweep_dir(storage_path: str, name: str) -> str:
    return storage.join(sweeps_dir(storage_path), name)


def mlflow_db(storage_path: str) -> str:
    return storage.join(root(storage_path), MLFLOW_DB)
