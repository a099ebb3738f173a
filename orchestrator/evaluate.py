"""`l2t eval`: batch inference of a trained model on Ray Data, per-sample outputs, metrics.

The questions (a suite: the synthetic held-out scenes, or a LLaVA-style
question file such as VQAv2, GQA, TextVQA, POPE or COCO captions) become a
Ray Data set of `{index, question}` rows; `map_batches` sends them through a
pool of `EvalActor`s, each of which loads the model, tokenizer and image
processor once and runs `workloads.evaluator.Evaluator` on its batches
(generation, teacher-forced log-likelihoods with the real image and with
V=∅, scores). The driver collects the rows, sorts them by question order and
writes them to `samples.jsonl` and `samples.parquet` (one file each, in the
suite's order, so two runs can be compared with `diff` or a Parquet join),
then aggregates them with `workloads.eval_summary.summarize` into
`metrics.json`.

Every entry point runs this same code: `l2t eval` (`run_eval`), the
evaluation after `l2t train` and each sweep trial (`evaluate_model`). Each
question is scored by a named rule (`score_questions`: `eval.answer_rule`,
`eval.choice_parser`, else the question file's, else the rule published
numbers use for the suite), recorded per sample (`rule`) and per suite
(`scoring` in `metrics.json`). lmms-eval tasks (`eval.lmms_eval_tasks`,
`--lmms-eval`) run after l2t's suites through `orchestrator.lmms_eval`.

Resources: on GPU each actor holds one GPU; on CPU each actor asks for a
fraction of a CPU (0.5 by default: on a 2-core machine, an actor holding a
whole CPU beside another stage that needs one stalls) and runs as many torch
threads as the CPUs it holds, at least one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import posixpath
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from orchestrator import storage
from orchestrator.config import EvalConfig, ExperimentConfig
from orchestrator.console import log
from orchestrator.eval_inputs import (  # noqa: F401 - re-exported
    RULE_FIELDS,
    SyntheticSuite,
    encode_spec_kwargs,
    load_question_file,
    load_suite,
    suite_name,
)
from orchestrator.images import open_image

SAMPLES_JSONL = "samples.jsonl"
SAMPLES_PARQUET = "samples.parquet"
METRICS_FILE = "metrics.json"
DEFAULT_CPUS_PER_ACTOR = 0.5

SAMPLE_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("question_id", pa.string()),
        ("kind", pa.string()),
        ("category", pa.string()),
        ("images", pa.list_(pa.string())),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("references", pa.list_(pa.string())),
        ("choices", pa.list_(pa.string())),
        ("objects", pa.list_(pa.string())),
        ("prediction", pa.string()),
        ("correct", pa.float64()),
        ("logp_with_image", pa.float64()),
        ("logp_null_image", pa.float64()),
        ("vc_sum", pa.float64()),
        ("vc_mean", pa.float64()),
        ("response_tokens", pa.int64()),
        ("error", pa.string()),
        ("rule", pa.string()),
    ]
)


@dataclass
class SuiteResult:
    suite: str
    metrics: dict[str, float]
    samples_jsonl: str
    samples_parquet: str
    metrics_file: str
    rows: list[dict] = field(repr=False, default_factory=list)
    scoring: dict[str, str] = field(default_factory=dict)
    """`{kind: rule}` the suite was scored by (`workloads.eval_summary.scoring_rules`)."""


# ---------------------------------------------------------------- Ray Data stage


class EvalActor:
    """Ray Data actor: loads the model once, answers and scores each batch of questions."""

    def __init__(self, model_dir: str, spec_kwargs: dict[str, Any], image_root: str | None, options: dict[str, Any]):
        import os

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import torch

        from workloads.evaluator import Evaluator
        from workloads.segments import EncodeSpec

        opts = EvalConfig.model_validate(options)
        if opts.torch_threads and not opts.use_gpu:
            torch.set_num_threads(opts.torch_threads)
        device = "cuda" if opts.use_gpu else "cpu"
        self.evaluator = Evaluator.from_pretrained(
            model_dir,
            EncodeSpec(**spec_kwargs),
            device=device,
            open_image=functools.partial(open_image, image_root),  # the training data loader's opener
            null_image=opts.null_image,
            max_new_tokens=opts.max_new_tokens,
            num_beams=opts.num_beams,
            seed=opts.seed,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        questions = [json.loads(str(q)) for q in batch["question"]]
        samples = self.evaluator(questions)
        rows = [{"index": int(i), **asdict(s)} for i, s in zip(batch["index"], samples)]
        return pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)


def _pool(options: EvalConfig, batches: int) -> tuple[int, float, dict[str, Any]]:
    """(actors, CPUs per actor, extra map_batches arguments) for this cluster."""
    import ray

    from orchestrator.cluster import cluster_cpus

    if options.use_gpu:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if gpus < 1:
            raise RuntimeError("use_gpu is set but the Ray cluster has no GPU")
        actors = options.concurrency or gpus
        return max(1, min(actors, batches)), options.cpus_per_actor or 1.0, {"num_gpus": 1}
    cpus = cluster_cpus()
    actors = max(1, min(options.concurrency or max(1, int(cpus // 4)), batches))
    return actors, options.cpus_per_actor or DEFAULT_CPUS_PER_ACTOR, {}


def batch_inference(
    model_dir: str,
    questions: list[dict],
    spec_kwargs: dict[str, Any],
    image_root: str | None,
    options: EvalConfig,
) -> list[dict]:
    """Per-sample rows (SAMPLE_SCHEMA), in question order, from a pool of EvalActors on Ray Data."""
    import ray

    if not questions:
        return []
    batches = math.ceil(len(questions) / options.batch_size)
    actors, cpus_per_actor, extra = _pool(options, batches)
    if not options.use_gpu and options.torch_threads is None:
        options = options.model_copy(update={"torch_threads": max(1, round(cpus_per_actor))})
    items = [{"index": i, "question": json.dumps(q, ensure_ascii=False)} for i, q in enumerate(questions)]
    dataset = ray.data.from_items(items, override_num_blocks=min(batches, 256))
    results = dataset.map_batches(
        EvalActor,
        fn_constructor_kwargs={
            "model_dir": str(model_dir),
            "spec_kwargs": spec_kwargs,
            "image_root": image_root,
            "options": options.model_dump(),
        },
        batch_size=options.batch_size,
        batch_format="numpy",
        concurrency=actors,
        num_cpus=cpus_per_actor,
        **extra,
    )
    rows = results.take_all()
    rows.sort(key=lambda r: r["index"])
    if [r["index"] for r in rows] != list(range(len(questions))):
        raise RuntimeError(f"batch inference returned {len(rows)} rows for {len(questions)} questions")
    return [_plain(r) for r in rows]


def _plain(row: dict) -> dict:
    """A row from Ray Data with numpy values turned into JSON-ready Python values."""
    out = {}
    for key, value in row.items():
        if isinstance(value, np.ndarray):
            value = value.tolist()
        elif isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, float) and math.isnan(value):
            value = None
        out[key] = value
    return out


# ---------------------------------------------------------------- outputs


def write_samples(rows: list[dict], jsonl_uri: str, parquet_uri: str | None) -> None:
    """Rows as JSON lines (sorted keys: stable for diff) and as one Parquet file."""
    storage.write_text(jsonl_uri, "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows))
    if parquet_uri:
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist([{k: r.get(k) for k in SAMPLE_SCHEMA.names} for r in rows], schema=SAMPLE_SCHEMA)
        fs, path = storage.filesystem(parquet_uri)
        fs.create_dir(posixpath.dirname(path) if storage.is_s3(parquet_uri) else str(Path(path).parent), recursive=True)
        pq.write_table(table, path, filesystem=fs)


def score_questions(questions: list[dict], options: EvalConfig, suite: str, synthetic: bool = False) -> list[dict]:
    """The questions with the answer rule and choice parser each is scored by (`eval.answer_rule`,
    `eval.choice_parser`, else the row's or file's own, else the suite's published default)."""
    from workloads.eval_summary import resolve_scoring

    return resolve_scoring(
        questions,
        answer_rule=options.answer_rule,
        choice_parser=options.choice_parser,
        suite=suite,
        synthetic=synthetic,
    )


def _with_rules(rows: list[dict], questions: list[dict]) -> list[dict]:
    """Per-sample rows with the `rule` their score used (choice parser or answer rule; None when unscored)."""
    from workloads.eval_questions import MULTIPLE_CHOICE

    for row, q in zip(rows, questions):
        scored = row.get("correct") is not None
        row["rule"] = (q["choice_parser"] if q["kind"] == MULTIPLE_CHOICE else q["answer_rule"]) if scored else None
    return rows


def evaluate_questions(
    model_dir: str,
    questions: list[dict],
    spec_kwargs: dict[str, Any],
    image_root: str | None,
    options: EvalConfig,
    out_dir: str,
    *,
    suite: str = "questions",
    chair_vocabularies: dict[str, list[str]] | None = None,
    extra: dict[str, Any] | None = None,
    synthetic: bool = False,
) -> SuiteResult:
    """Batch inference, per-sample files and metrics for normalized questions; the one code path
    behind `l2t eval`, `l2t train` and sweep trials. The scoring rules used go into `metrics.json`
    (`scoring`) and each sample row (`rule`)."""
    from workloads.eval_summary import scoring_rules, summarize

    started = time.perf_counter()
    questions = score_questions(questions, options, suite, synthetic)
    rows = _with_rules(batch_inference(model_dir, questions, spec_kwargs, image_root, options), questions)
    metrics = summarize(rows, chair_vocabularies=chair_vocabularies)
    jsonl, parquet, metrics_file = (storage.join(out_dir, n) for n in (SAMPLES_JSONL, SAMPLES_PARQUET, METRICS_FILE))
    write_samples(rows, jsonl, parquet)
    record = {
        "suite": suite,
        "model_dir": str(model_dir),
        "questions": len(questions),
        "spec": {**spec_kwargs, "task_templates": list(spec_kwargs.get("task_templates", ()))},
        "options": options.model_dump(exclude={"max_rows"}),  # the questions asked are counted above
        "wall_s": round(time.perf_counter() - started, 2),
        "metrics": metrics,
        "scoring": scoring_rules(questions),
        **(extra or {}),
    }
    storage.write_text(metrics_file, json.dumps(record, indent=2, sort_keys=True))
    return SuiteResult(suite, metrics, jsonl, parquet, metrics_file, rows, record["scoring"])


# ---------------------------------------------------------------- entry points


def run_eval(
    model_dir: str,
    suites: list[str] | str,
    output: str,
    *,
    options: EvalConfig | None = None,
    image_root: str | None = None,
    max_rows: int | None = None,
    kind: str | None = None,
    prepared: str | None = None,
    config=None,
    chat_template: str | None = None,
    system_prompt: str | None = None,
    max_length: int | None = None,
    synthetic: SyntheticSuite | None = None,
    track: bool | None = None,
) -> dict[str, SuiteResult]:
    """`l2t eval`: every suite evaluated into `output/<suite name>/`, then the lmms-eval tasks of
    `options.lmms_eval_tasks` into `output/lmms_eval/<task>/` (results named `lmms:<task>`);
    `output/metrics.json` holds all of them. With `track` (default: when lmms-eval tasks ran) the
    results are logged to an MLflow run (`orchestrator.eval_tracking`)."""
    from orchestrator.cluster import connect
    from workloads.lora import adapter_base

    options = options or standalone_options()
    if options.lmms_eval_tasks:
        from orchestrator.lmms_eval import require_lmms_eval

        require_lmms_eval()  # before any suite runs
    connect()
    suites = [suites] if isinstance(suites, str) else list(suites)
    spec_kwargs = encode_spec_kwargs(
        adapter_base(model_dir) or model_dir,  # a LoRA adapter folder: its base's config (image tokens)
        chat_template=chat_template,
        system_prompt=system_prompt,
        max_length=max_length,
        prepared=prepared,
        config=config,
    )
    synthetic = synthetic or SyntheticSuite.from_config(config)
    output = storage.absolute(output)
    results: dict[str, SuiteResult] = {}
    for suite in suites:
        name = suite_name(suite)
        if name in results:
            raise ValueError(f"two suites named {name!r}; evaluate them into different outputs")
        out_dir = storage.join(output, name)
        questions, root, vocabularies = load_suite(
            suite, out_dir, image_root=image_root, limit=max_rows, default_kind=kind, synthetic=synthetic
        )
        log(
            f"[eval] {name}: {len(questions)} questions, chat template {spec_kwargs['template']}, "
            f"{options.null_image} V=∅ -> {out_dir}"
        )
        results[name] = evaluate_questions(
            model_dir,
            questions,
            spec_kwargs,
            root,
            options,
            out_dir,
            suite=suite,
            chair_vocabularies=vocabularies,
            extra={"image_root": root, **({"synthetic": asdict(synthetic)} if name == "synthetic" else {})},
            synthetic=name == "synthetic",
        )
    results.update(_lmms_results(model_dir, output, spec_kwargs, options, max_rows))
    summary = {
        "model_dir": str(model_dir),
        "suites": {k: v.metrics for k, v in results.items()},
        "scoring": {k: v.scoring for k, v in results.items() if v.scoring},
    }
    storage.write_text(storage.join(output, METRICS_FILE), json.dumps(summary, indent=2, sort_keys=True))
    if track if track is not None else bool(options.lmms_eval_tasks):
        from orchestrator.eval_tracking import log_eval_run

        log_eval_run(model_dir, output, results, config)
    return results


def _lmms_results(model_dir: str, output: str, spec_kwargs, options: EvalConfig, limit: int | None) -> dict:
    """`lmms:<task>` -> SuiteResult for each lmms-eval task of `options` (metrics without the `lmms/<task>/`
    prefix); {} when there are none."""
    if not options.lmms_eval_tasks:
        return {}
    from orchestrator.lmms_eval import LMMS_DIR, run_lmms_eval, task_dir

    log(f"[eval] lmms-eval: {', '.join(options.lmms_eval_tasks)} -> {storage.join(output, LMMS_DIR)}")
    lmms = run_lmms_eval(
        model_dir,
        options.lmms_eval_tasks,
        output,
        spec_kwargs,
        options,
        include_path=options.lmms_eval_include_path,
        limit=options.lmms_eval_limit or limit,
    )
    out = {}
    for task, metrics in lmms.items():
        folder = task_dir(output, task)
        short = {k.split("/", 2)[2] if k.startswith(f"lmms/{task}/") else k: v for k, v in metrics.items()}
        out[f"lmms:{task}"] = SuiteResult(
            f"lmms:{task}", short, storage.join(folder, "samples.jsonl"), "", storage.join(folder, "results.json")
        )
    return out


def options_from_config(cfg: ExperimentConfig) -> EvalConfig:
    """The experiment's `eval` section, with `use_gpu` unset meaning as `train.use_gpu`."""
    use_gpu = cfg.train.use_gpu if cfg.eval.use_gpu is None else cfg.eval.use_gpu
    return cfg.eval.model_copy(update={"use_gpu": use_gpu})


def standalone_options() -> EvalConfig:
    """The eval settings of `l2t eval` without a config: the `eval` defaults, but answers to real suites
    (captions, phrases) get 32 new tokens, not the 8 of the held-out eval after training, on CPU unless asked."""
    return EvalConfig(max_new_tokens=32, use_gpu=False)


def evaluate_model(cfg: ExperimentConfig, model_dir: str, prepared, out_file: str) -> dict[str, float]:
    """Held-out evaluation of an exported model on `data.eval_file` (what `l2t train` and each sweep
    trial run after training): per-sample rows go to `out_file` (JSONL), with a Parquet copy and the
    metrics beside it (`<stem>.parquet`, `<stem>.metrics.json`); then the lmms-eval tasks of
    `eval.lmms_eval_tasks`, written beside it (`lmms_eval/<task>/`), their metrics added as
    `lmms/<task>/<metric>`."""
    spec_kwargs = dataclasses.asdict(prepared.encode_spec())  # exactly how the training rows were encoded
    options = options_from_config(cfg)
    if options.lmms_eval_tasks:
        from orchestrator.lmms_eval import require_lmms_eval

        require_lmms_eval()  # before the held-out evaluation
    metrics: dict[str, float] = {}
    if cfg.data.eval_file:
        from workloads.eval_summary import scoring_rules, summarize

        questions = load_question_file(cfg.data.eval_file, limit=cfg.eval.max_rows)
        questions = score_questions(questions, options, cfg.data.eval_file, cfg.data.synthetic is not None)
        rows = _with_rules(batch_inference(model_dir, questions, spec_kwargs, cfg.data.image_root, options), questions)
        metrics = summarize(rows)
        stem = out_file[: -len(".jsonl")] if out_file.endswith(".jsonl") else out_file
        write_samples(rows, out_file, stem + ".parquet")
        record = {
            "model_dir": str(model_dir),
            "eval_file": cfg.data.eval_file,
            "options": options.model_dump(),
            "metrics": metrics,
            "scoring": scoring_rules(questions),
        }
        storage.write_text(stem + ".metrics.json", json.dumps(record, indent=2, sort_keys=True))
    if options.lmms_eval_tasks:
        from orchestrator.lmms_eval import merged_metrics, run_lmms_eval

        folder = posixpath.dirname(out_file) if storage.is_s3(out_file) else str(Path(out_file).parent)
        lmms = run_lmms_eval(
            model_dir,
            options.lmms_eval_tasks,
            folder,
            spec_kwargs,
            options,
            include_path=options.lmms_eval_include_path,
            limit=options.lmms_eval_limit,
        )
        metrics = {**metrics, **merged_metrics(lmms)}
    return metrics
