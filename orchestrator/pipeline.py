"""The chain as small declarative steps: inputs -> prepare -> train -> evaluate -> track.

Each step writes under `storage.path` at a location keyed by what determines
it (the synthetic data by its settings, the tiny model by its shape and
corpus, prepared data by its hash), so running again reuses finished steps
and only training and evaluation are repeated.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator import storage
from orchestrator.config import ExperimentConfig, with_overrides
from orchestrator.evaluate import evaluate_model
from orchestrator.prepare import PreparedData, prepare
from orchestrator.train import TrainResult, run_train


def log(message: str) -> None:
    """Progress for people, on stderr so that stdout stays clean for piped output."""
    print(message, file=sys.stderr, flush=True)


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
    extra: dict[str, Any] = field(default_factory=dict)


def materialize_synthetic(cfg: ExperimentConfig) -> ExperimentConfig:
    """Write the synthetic data set (once per settings) and point `data` at its files."""
    from workloads.synthetic import ALL_KINDS, write_synthetic_dataset

    synthetic = cfg.data.synthetic
    if synthetic is None:
        return cfg
    root = Path(storage.absolute(cfg.storage.path))
    if storage.is_s3(str(root)):
        raise ValueError("data.synthetic needs a local storage.path (generate once, then upload)")
    out = root / "data" / f"synthetic-{_hash(synthetic.model_dump(mode='json'))}"
    done = out / ".complete"
    if not done.exists():
        log(
            f"[data] generating synthetic data set: {synthetic.train_rows} train rows, {synthetic.eval_rows} eval questions -> {out}"
        )
        write_synthetic_dataset(
            out,
            train_rows=synthetic.train_rows,
            eval_rows=synthetic.eval_rows,
            seed=synthetic.seed,
            max_objects=synthetic.max_objects,
            image_size=synthetic.image_size,
            kinds=tuple(synthetic.kinds or ALL_KINDS),
        )
        done.write_text("ok")
    return with_overrides(
        cfg,
        {
            "data.sources": [str(out / "train.jsonl")],
            "data.image_root": str(out),
            "data.eval_file": str(out / "eval.jsonl") if synthetic.eval_rows else None,
            "data.synthetic": None,
        },
    )


def _hash(value: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


def _corpus(files: list[str], template: str, limit: int = 50_000):
    """Text of the training conversations, rendered with the chat template (so system prompt and
    role markers get their own tokens), for training the tiny model's tokenizer."""
    from workloads.chat_templates import render
    from workloads.conversations import ConversationError, parse_record

    seen = 0
    for path in files:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if seen >= limit:
                    return
                try:
                    conversation = parse_record(json.loads(line))
                except (json.JSONDecodeError, ConversationError):
                    continue
                seen += 1
                if template == "tokenizer":
                    yield from (turn.text for turn in conversation.turns)
                else:
                    yield render(conversation, template).text


def resolve_model(cfg: ExperimentConfig) -> str:
    """The model folder or hub id to train; builds the `tiny` preset once per shape and corpus."""
    if cfg.model.name_or_path != "tiny":
        local = Path(cfg.model.name_or_path).expanduser()
        return str(local.resolve()) if local.exists() else cfg.model.name_or_path
    from orchestrator.prepare import list_source_files
    from workloads.tiny_model import build_tiny_model

    files = list_source_files(cfg.data.sources)
    key = _hash(
        {
            "tiny": cfg.model.tiny.model_dump(mode="json"),
            "template": cfg.data.chat_template,
            "corpus": [storage.file_fingerprint(f) for f in files],
            "seed": cfg.train.seed,
        }
    )
    out = Path(storage.absolute(cfg.storage.path)) / "models" / f"tiny-{key}"
    if not (out / "config.json").exists():
        log(f"[model] building the tiny LLaVA preset -> {out}")
        build_tiny_model(
            out,
            _corpus([f for f in files if not storage.is_s3(f)], cfg.data.chat_template),
            cfg.model.tiny,
            seed=cfg.train.seed,
        )
    return str(out)


def mask_example_html(
    cfg: ExperimentConfig, prepared: PreparedData, model_dir: str, out_uri: str, rows: int = 3
) -> str:
    """A standalone HTML page of the first prepared rows, colored by segment, with this run's weights."""
    import numpy as np
    import pyarrow.dataset as pads
    from transformers import AutoTokenizer

    from workloads.mask_inspect import inspect_rows, to_html
    from workloads.segments import EncodedRow

    fs, path = storage.filesystem(prepared.shards)
    table = pads.dataset(path, filesystem=fs, format="parquet").head(rows, columns=["id", "input_ids", "segments"])
    encoded = [
        (r["id"], EncodedRow(np.asarray(r["input_ids"], np.int32), np.asarray(r["segments"], np.int8), False, 0))
        for r in table.to_pylist()
    ]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    m = cfg.masking
    storage.write_text(
        out_uri, to_html(inspect_rows(encoded, tokenizer, m.mode, m.lambda_instruction, m.lambda_response))
    )
    return out_uri


def default_run_name(cfg: ExperimentConfig) -> str:
    m = cfg.masking
    return f"{cfg.name}-{m.mode}-li{m.lambda_instruction:g}-la{m.lambda_response:g}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare_inputs(cfg: ExperimentConfig) -> tuple[ExperimentConfig, str, PreparedData]:
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
    inputs: tuple[ExperimentConfig, str, PreparedData] | None = None,
) -> ExperimentResult:
    """Prepare (or reuse), train with Ray Train, evaluate, log to MLflow."""
    from orchestrator.tracking import check_reachable, log_training_run, tracking_uri

    started = time.perf_counter()
    check_reachable(tracking_uri(cfg))
    resolved, model_dir, prepared = inputs or prepare_inputs(cfg)
    resolved = with_overrides(
        resolved, {"masking": cfg.masking.model_dump(mode="json"), "train": cfg.train.model_dump(mode="json")}
    )
    run_name = run_name or default_run_name(resolved)
    log(f"[train] {run_name}: Ray Train, {resolved.train.num_workers} workers, DeepSpeed {resolved.train.deepspeed}")
    trained = run_train(resolved, prepared, model_dir, run_name)
    log(f"[eval] {run_name}: held-out questions")
    samples_file = storage.join(trained.run_path, "eval_samples.jsonl")
    eval_metrics = evaluate_model(resolved, trained.model_dir, prepared, samples_file)
    mask_page = mask_example_html(resolved, prepared, model_dir, storage.join(trained.run_path, "mask_example.html"))
    run_id = log_training_run(
        resolved,
        run_name=run_name,
        history=trained.history,
        eval_metrics=eval_metrics,
        params={
            "prepared.key": prepared.manifest["key"],
            "prepared.path": prepared.path,
            "model.exported_to": trained.model_dir,
        },
        artifacts={
            "task_templates": prepared.task_templates_file,
            "eval": samples_file,
            "metrics": storage.join(trained.run_path, "metrics.jsonl"),
            "mask_example": mask_page,
        },
        parent_run_id=parent_run_id,
    )
    return ExperimentResult(
        run_name=run_name,
        config=resolved,
        train=trained,
        eval_metrics=eval_metrics,
        eval_samples_file=samples_file,
        mlflow_run_id=run_id,
        wall_s=time.perf_counter() - started,
        prepared=prepared,
    )
