"""`l2t data prepare`: validate, count task templates, tokenize and segment with Ray Data.

The driver: whether to run, the stages in order, progress, row accounting,
the manifest. The stages' row functions are in `readers`, `validation`,
`template_stats` and `encoding` (images: `images`), all under `orchestrator`.

Preparation runs once for a whole sweep. Its output folder
(`layout.prepared_dir`) is keyed by a hash of everything that determines it
(data files, tokenizer, chat template, length limit, image checks, template
selection), so preparing again is a no-op and every trial reads the same
shards. Segments are stored, not weights: the λ values and masking mode are
applied by the training step.

Nothing is lost and no row can stop a stage: every row that can't be used
(unreadable, malformed, unsafe path, undecodable image, duplicate id, fails
to encode) lands in `quarantine/` with its source, line, id and reason and is
counted in the manifest; the run fails only when the bad share exceeds
`data.max_bad_fraction` (not part of the hash: a stricter or looser limit
judges the same output). The manifest is written last, so a folder without
one is an interrupted preparation and is redone; its `encode_spec` gives
later steps the exact `EncodeSpec` (`PreparedData.encode_spec()`).

The stages, each a Ray Data execution of tasks (no actors: an actor holding a
whole CPU starves the other stages on a 2-core machine):

1. read + validate (materialized; `readers`, `validation`): every file is
   read once and split into records, re-cut into blocks of a fixed row count
   so that one big file still spreads over all CPUs; every record is parsed,
   checked (images decoded, `data.check_images`) and normalized into columns;
   then one global pass over the id column finds ids repeated across blocks;
2. task-template statistics (`template_stats`): a groupby-sum of the
   instruction sentences; only the frequent ones come back to the driver;
3. encode (materialized; `encoding`): render, tokenize once with offsets,
   segment, compact Arrow columns;
4. write: shards (good rows) and quarantine (rows that failed validation or
   encoding) as Parquet, task_templates.json, manifest.json last.

Progress goes to `progress` (`console.log` by default): a line per stage with
rows, rate and time, and a live line every few seconds in the long stages.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from orchestrator import layout, storage
from orchestrator.config import ExperimentConfig
from orchestrator.console import Progress, log
from orchestrator.encoding import ENCODED_SCHEMA, SHARD_SCHEMA, _encoding_summary, encode_rows, encoding_totals
from orchestrator.readers import PrepareError, list_source_files, read_records, rows_per_block
from orchestrator.relevance import RELEVANCE_COLUMN, relevance_inputs, score_relevance
from orchestrator.steps import stable_hash
from orchestrator.template_stats import task_template_stats
from orchestrator.validation import (
    QUARANTINE_SCHEMA,
    VALIDATED_SCHEMA,
    _validation_summary,
    duplicate_ids,
    duplicate_report,
    first_occurrences,
    mark_duplicates,
    reasons_text,
    total_reasons,
    validate_rows,
)

if TYPE_CHECKING:
    from workloads.segments import EncodeSpec
    from workloads.task_templates import TaskTemplateList

__all__ = ["PREPARE_FORMAT_VERSION", "PrepareError", "PreparedData", "prepare", "preparation_inputs", "preparation_key"]

PREPARE_FORMAT_VERSION = 4  # 3: segments by the reply-wins and visible-character rules, image placement; 4: hardening
PROGRESS_EVERY_S = 10.0
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
TOKENIZER_FILES += ("config.json", "chat_template.jinja")  # the files of the model folder the key hashes
ENCODE_SPEC_KEYS = ("template", "num_image_tokens", "max_length", "system_prompt", "image_token", "image_placement")


@dataclass
class PreparedData:
    path: str
    manifest: dict[str, Any]

    @property
    def shards(self) -> str:
        return storage.join(self.path, "shards")

    @property
    def quarantine(self) -> str:
        return storage.join(self.path, "quarantine")

    @property
    def task_templates_file(self) -> str:
        return storage.join(self.path, "task_templates.json")

    @classmethod
    def load(cls, path: str) -> "PreparedData":
        manifest_uri = storage.join(path, "manifest.json")
        if not storage.exists(manifest_uri):
            raise FileNotFoundError(f"{path} is not a prepared data folder (no manifest.json)")
        return cls(path=path, manifest=json.loads(storage.read_text(manifest_uri)))

    def encode_spec(self) -> EncodeSpec:
        """The `EncodeSpec` the shards were encoded with: the manifest's settings and task_templates.json.

        A manifest written before it carried `encode_spec` gives the same
        settings from its top-level keys (and the system prompt of its inputs).
        """
        from workloads.segments import EncodeSpec
        from workloads.task_templates import TaskTemplateList

        m = self.manifest
        settings = m.get("encode_spec") or {
            "template": m["chat_template"],
            "num_image_tokens": m["num_image_tokens"],
            "max_length": m["max_length"],
            "system_prompt": m.get("inputs", {}).get("data", {}).get("system_prompt"),
        }
        templates = TaskTemplateList.from_dict(json.loads(storage.read_text(self.task_templates_file)))
        return EncodeSpec(**settings, task_templates=templates.sentences())


# ---------------------------------------------------------------- the key


def preparation_inputs(cfg: ExperimentConfig, files: list[str], model_dir: str) -> dict[str, Any]:
    """Everything that determines the prepared output (what the folder key hashes)."""
    tokenizer_files = {}
    for name in TOKENIZER_FILES:
        path = Path(model_dir, name)
        if path.exists():
            tokenizer_files[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    data = cfg.data.model_dump(mode="json")
    for key in ("sources", "synthetic", "eval_file", "max_bad_fraction"):
        data.pop(key)
    data["relevance"] = relevance_inputs(cfg)  # the reference model's identity and V=∅, not the actor pool
    template_file = None
    if cfg.masking.task_templates.file:
        template_file = hashlib.sha256(storage.read_text(cfg.masking.task_templates.file).encode()).hexdigest()
    return {
        "format_version": PREPARE_FORMAT_VERSION,
        "files": [storage.file_fingerprint(f) for f in sorted(files)],
        "model": model_dir if not tokenizer_files else None,
        "tokenizer_files": tokenizer_files,
        "data": data,
        "task_templates": cfg.masking.task_templates.model_dump(mode="json"),
        "task_templates_file": template_file,
    }


def preparation_key(cfg: ExperimentConfig, files: list[str], model_dir: str) -> str:
    """Hash of everything that determines the prepared output: the name of its folder."""
    return stable_hash(preparation_inputs(cfg, files, model_dir), length=16)


# ---------------------------------------------------------------- the driver


def prepare(
    cfg: ExperimentConfig,
    model_dir: str,
    *,
    data_cpus: float | None = None,
    force: bool = False,
    progress: Progress | None = log,
) -> PreparedData:
    """Prepare `cfg.data` for training with the tokenizer of `model_dir`; reuses an earlier identical run.

    `progress` receives human-readable status lines (None: silent). Ray Data's
    own progress bars are turned off meanwhile, so the two don't interleave.
    """
    from ray.data import DataContext

    files = list_source_files(cfg.data.sources)
    inputs = preparation_inputs(cfg, files, model_dir)
    key = stable_hash(inputs, length=16)
    out = layout.prepared_dir(cfg.storage.path, key)
    manifest_uri = storage.join(out, "manifest.json")
    if storage.exists(manifest_uri) and not force:
        prepared = PreparedData.load(out)
        if progress:
            progress(f"[prepare] reusing {out} (same data, tokenizer and settings: key {key})")
        _check_bad_share(prepared.manifest, cfg, prepared.quarantine)
        return prepared
    storage.delete_dir(out)

    context = DataContext.get_current()
    bars = context.enable_progress_bars
    if progress is not None:
        from ray.util.debug import log_once

        log_once("ray_data_progress_manager_disabled")  # we say what is going on ourselves
        context.enable_progress_bars = False
    try:
        manifest = _prepare(cfg, model_dir, files, inputs, key, out, data_cpus, progress)
    finally:
        context.enable_progress_bars = bars
    storage.write_text(manifest_uri, json.dumps(manifest, indent=2))
    if progress:
        progress(
            f"[prepare] done in {manifest['timings']['total_s']:.1f} s: {manifest['rows_written']:,} rows written, "
            f"{manifest['rows_quarantined']:,} quarantined -> {out}"
        )
    _check_bad_share(manifest, cfg, storage.join(out, "quarantine"))
    return PreparedData(path=out, manifest=manifest)


@dataclass
class _Run:
    """What every stage of one preparation shares."""

    cfg: ExperimentConfig
    model_dir: str
    files: list[str]
    key: str
    inputs: dict[str, Any]  # what the key hashes
    out: str
    cpus: float  # CPUs of the cluster (or data_cpus)
    task_cpus: float  # per task: 1, or less on a cluster with under one CPU
    block_rows: int
    progress: Progress | None
    timings: dict[str, float] = field(default_factory=dict)

    def say(self, message: str) -> None:
        if self.progress:
            self.progress(message)

    def map(self, ds, fn, fn_kwargs: dict[str, Any]):
        """`ds.map_batches(fn)` as every stage runs it: whole blocks, Arrow, one task per CPU."""
        return ds.map_batches(fn, fn_kwargs=fn_kwargs, batch_size=None, batch_format="pyarrow", num_cpus=self.task_cpus)


@dataclass
class _Validated:
    ds: Any  # VALIDATED_SCHEMA, materialized
    rows_in: int
    rows_valid: int
    reasons: Counter
    user_turns: int
    duplicates: dict[str, Any] | None = None  # the manifest's `duplicate_ids` (None: not checked)


@dataclass
class _Encoded:
    ds: Any  # ENCODED_SCHEMA, materialized
    totals: list[dict]  # per-block encoding summaries
    reasons: Counter
    rows_written: int
    spec_kwargs: dict[str, Any]
    relevance: dict[str, Any] | None = None  # the relevance stage's manifest entry (`orchestrator.relevance`)


def _prepare(cfg, model_dir, files, inputs, key, out, data_cpus, progress) -> dict[str, Any]:
    from orchestrator.cluster import cluster_cpus

    started = time.perf_counter()
    cpus = data_cpus or cluster_cpus()
    task_cpus = 1.0 if cpus >= 1 else cpus
    run = _Run(cfg, model_dir, files, key, inputs, out, cpus, task_cpus, rows_per_block(files, cpus), progress)
    validated = _duplicate_ids(run, _read_and_validate(run))
    templates = _task_templates(run, validated)
    encoded = score_relevance(run, _encode(run, validated, templates))  # with data.relevance only
    _write(run, validated, encoded, templates)
    run.timings["total_s"] = time.perf_counter() - started
    return {**_manifest(run, validated, encoded, templates), "relevance": encoded.relevance}


def _read_and_validate(run: _Run) -> _Validated:
    """Stage 1: read every file into records, validate and normalize them (materialized)."""
    data = run.cfg.data
    s3_root = data.image_root and storage.is_s3(data.image_root)
    run.say(f"[prepare] read and validate {len(run.files)} file(s) on {run.cpus:g} CPUs -> {run.out}")
    stage = time.perf_counter()
    fn_kwargs = {"fmt": data.format, "image_root": data.image_root, "check_images": data.check_images}
    fn_kwargs["image_filesystem"] = storage.filesystem(data.image_root)[0] if s3_root else None
    fn_kwargs["max_row_bytes"] = data.max_row_bytes
    records = read_records(run.files, run.block_rows, run.task_cpus)
    ds = _materialize(run.map(records, validate_rows, fn_kwargs), "read and validate", run.progress, VALIDATED_SCHEMA)
    validated = _validated(ds, run.task_cpus)
    seconds = run.timings["read_validate_s"] = time.perf_counter() - stage
    if validated.rows_in == 0:
        raise PrepareError(f"data.sources: no rows found in {run.files}")
    rows_in, rows_valid, reasons = validated.rows_in, validated.rows_valid, validated.reasons
    bad = f", {rows_in - rows_valid:,} bad ({reasons_text(reasons)})" if rows_in > rows_valid else ""
    run.say(
        f"[prepare] validated {rows_in:,} rows in {seconds:.1f} s ({_rate(rows_in, seconds)}): {rows_valid:,} good{bad}"
    )
    return validated


def _validated(ds, task_cpus: float) -> _Validated:
    """Row and reason counts of a validated dataset, from its per-block summaries."""
    summaries = _summaries(ds, _validation_summary, task_cpus)
    rows_in = sum(s["rows"] for s in summaries)
    reasons = total_reasons(summaries)
    user_turns = sum(s["user_turns"] for s in summaries)
    return _Validated(ds, rows_in, rows_in - sum(reasons.values()), reasons, user_turns)


def _duplicate_ids(run: _Run, validated: _Validated) -> _Validated:
    """Stage 1b (`data.duplicate_ids`): ids carried by more than one good row, kept with a warning or
    quarantined after their first occurrence (a global pass over the id column; `keep` skips it)."""
    if run.cfg.data.duplicate_ids == "keep":
        return validated
    stage = time.perf_counter()
    counts = duplicate_ids(validated.ds, run.task_cpus)
    if counts and run.cfg.data.duplicate_ids == "quarantine":
        first = first_occurrences(validated.ds, counts, run.files, run.task_cpus)
        marked = run.map(validated.ds, mark_duplicates, {"first": first})
        validated = _validated(_materialize(marked, "duplicate ids", run.progress, VALIDATED_SCHEMA), run.task_cpus)
    validated.duplicates, warning = duplicate_report(counts, run.cfg.data.duplicate_ids)
    run.timings["duplicate_ids_s"] = time.perf_counter() - stage
    if warning:
        run.say(f"[prepare] warning: {warning}")
    return validated


def _task_templates(run: _Run, validated: _Validated) -> TaskTemplateList:
    """Stage 2: the task templates, counted over the validated rows or read from the configured file."""
    from workloads.task_templates import TaskTemplateList

    stage = time.perf_counter()
    file = run.cfg.masking.task_templates.file
    if file:
        templates = TaskTemplateList.from_dict(json.loads(storage.read_text(file)))
        origin = f"from {file}"
    else:
        partitions = max(1, int(run.cpus))
        templates = task_template_stats(validated.ds, run.cfg, validated.user_turns, run.task_cpus, partitions)
        origin = f"from {validated.user_turns:,} user turns"
    seconds = run.timings["template_stats_s"] = time.perf_counter() - stage
    top = f"; top: {templates.entries[0].sentence!r} ({templates.entries[0].share:.1%})" if templates.entries else ""
    run.say(f"[prepare] task templates: {len(templates.entries)} {origin} in {seconds:.1f} s{top}")
    return templates


def _encode(run: _Run, validated: _Validated, templates: TaskTemplateList) -> _Encoded:
    """Stage 3: render, tokenize and segment the good rows (materialized)."""
    from ray.data.expressions import col
    from transformers import AutoConfig

    from workloads.families import image_settings

    data = run.cfg.data
    stage = time.perf_counter()
    run.say(
        f"[prepare] tokenize and segment {validated.rows_valid:,} rows "
        f"({data.chat_template}, max_length {data.max_length}, {Path(run.model_dir).name})"
    )
    spec_kwargs = {
        "template": data.chat_template,
        **image_settings(AutoConfig.from_pretrained(run.model_dir)),  # the family's image token and count
        "max_length": data.max_length,
        "task_templates": templates.sentences(),
        "system_prompt": data.system_prompt,
        "image_placement": data.image_placement,
    }
    encode_kwargs = {"model_dir": run.model_dir, "spec_kwargs": spec_kwargs, "image_root": data.image_root}
    ds = _materialize(
        run.map(validated.ds.filter(expr=col("ok")), encode_rows, encode_kwargs),
        "tokenize and segment",
        run.progress,
        ENCODED_SCHEMA,
        total=validated.rows_valid,
    )
    totals = _summaries(ds, _encoding_summary, run.task_cpus)
    seconds = run.timings["encode_s"] = time.perf_counter() - stage
    reasons = total_reasons(totals)
    failed = f"; {sum(reasons.values()):,} failed ({reasons_text(reasons)})" if reasons else ""
    run.say(
        f"[prepare] tokenized and segmented {validated.rows_valid:,} rows in {seconds:.1f} s "
        f"({_rate(validated.rows_valid, seconds)}){failed}"
    )
    return _Encoded(ds, totals, reasons, sum(t["rows"] for t in totals), spec_kwargs)


def _write(run: _Run, validated: _Validated, encoded: _Encoded, templates: TaskTemplateList) -> None:
    """Stage 4: shards, quarantine and task_templates.json; then checks the row accounting."""
    from ray.data.expressions import col

    stage = time.perf_counter()
    fs, _ = storage.filesystem(run.out)
    columns = SHARD_SCHEMA.names + ([RELEVANCE_COLUMN] if encoded.relevance else [])
    encoded.ds.filter(expr=col("ok")).select_columns(columns).write_parquet(
        storage.filesystem(storage.join(run.out, "shards"))[1], filesystem=fs
    )
    rows_bad = sum(validated.reasons.values()) + sum(encoded.reasons.values())
    if rows_bad:
        parts = [
            stage_ds.filter(expr=~col("ok")).select_columns(QUARANTINE_SCHEMA.names)
            for stage_ds, reasons in ((validated.ds, validated.reasons), (encoded.ds, encoded.reasons))
            if reasons
        ]
        quarantined = parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
        quarantined.write_parquet(storage.filesystem(storage.join(run.out, "quarantine"))[1], filesystem=fs)
    storage.write_text(
        storage.join(run.out, "task_templates.json"), json.dumps(templates.to_dict(), indent=2, ensure_ascii=False)
    )
    seconds = run.timings["write_s"] = time.perf_counter() - stage
    quarantined_text = f" and {rows_bad:,} quarantined rows" if rows_bad else ""
    run.say(f"[prepare] wrote {encoded.rows_written:,} rows of shards{quarantined_text} in {seconds:.1f} s")
    if validated.rows_in != encoded.rows_written + rows_bad:
        raise PrepareError(
            f"row accounting broke: {validated.rows_in} in, {encoded.rows_written} written, {rows_bad} quarantined"
        )


def _manifest(run: _Run, validated: _Validated, encoded: _Encoded, templates: TaskTemplateList) -> dict[str, Any]:
    """manifest.json: what was prepared, from what, the encoding settings, the row and token counts."""
    import ray

    from workloads.segments import EncodeSpec

    reasons = validated.reasons + encoded.reasons
    spec = EncodeSpec(**encoded.spec_kwargs)
    return {
        "format_version": PREPARE_FORMAT_VERSION,
        "key": run.key,
        "path": run.out,
        "sources": run.files,
        "model": run.model_dir,
        "chat_template": run.cfg.data.chat_template,
        "max_length": run.cfg.data.max_length,
        "num_image_tokens": spec.num_image_tokens,
        "encode_spec": {name: getattr(spec, name) for name in ENCODE_SPEC_KEYS},
        "rows_in": validated.rows_in,
        "rows_written": encoded.rows_written,
        "rows_quarantined": sum(reasons.values()),
        "quarantined_by_reason": dict(sorted(reasons.items())),
        "quarantined_at_validation": sum(validated.reasons.values()),
        "duplicate_ids": validated.duplicates,
        "quarantined_at_encoding": sum(encoded.reasons.values()),
        **encoding_totals(encoded.totals),  # truncated rows, tokens by segment, lengths
        "user_turns": validated.user_turns,
        "task_templates_version": templates.version,
        "task_templates": len(templates.entries),
        "inputs": run.inputs,
        "num_cpus": run.cpus,
        "rows_per_block": run.block_rows,
        "timings": {k: round(v, 3) for k, v in run.timings.items()},
        "ray_version": ray.__version__,
    }


# ---------------------------------------------------------------- helpers


def _summaries(ds, fn, num_cpus: float) -> list[dict]:
    """The per-block JSON summaries `fn` makes of `ds` (one small task per block)."""
    rows = ds.map_batches(fn, batch_size=None, batch_format="pyarrow", num_cpus=num_cpus).take_all()
    return [json.loads(r["summary"]) for r in rows]


def _rate(rows: int, seconds: float) -> str:
    return f"{rows / seconds:,.0f} rows/s" if seconds > 0 else "-"


def _materialize(ds, stage: str, progress: Progress | None, schema: pa.Schema, total: int | None = None):
    """Execute `ds` into the object store (like `ds.materialize()`), reporting rows done every PROGRESS_EVERY_S s."""
    import ray.data

    started = last = time.perf_counter()
    rows = 0
    refs = []
    for bundle in ds.iter_internal_ref_bundles():
        for entry in bundle.blocks:
            refs.append(entry.ref if hasattr(entry, "ref") else entry[0])
        rows += bundle.num_rows() or 0
        now = time.perf_counter()
        if progress is not None and now - last >= PROGRESS_EVERY_S:
            last = now
            elapsed = now - started
            done = f"{rows:,}" + (f" / {total:,} rows ({rows / total:.0%})" if total else " rows")
            eta = f", about {max(0.0, elapsed * (total - rows) / rows):.0f} s left" if total and rows else ""
            progress(f"[prepare] {stage}: {done}, {_rate(rows, elapsed)}{eta}")
    # Public API: a dataset over the executed blocks (their metadata is read back by small tasks).
    return ray.data.from_arrow_refs(refs) if refs else ray.data.from_arrow(schema.empty_table())


def _check_bad_share(manifest: dict[str, Any], cfg: ExperimentConfig, quarantine: str) -> None:
    """PrepareError when the quarantined share exceeds data.max_bad_fraction or no row is usable."""
    rows_in, bad = manifest["rows_in"], manifest["rows_quarantined"]
    share = bad / rows_in if rows_in else 1.0
    if share > cfg.data.max_bad_fraction:
        reasons = ", ".join(f"{k}: {v}" for k, v in manifest["quarantined_by_reason"].items())
        raise PrepareError(
            f"{bad} of {rows_in} rows ({share:.1%}) were quarantined, above data.max_bad_fraction="
            f"{cfg.data.max_bad_fraction:.1%} ({reasons}); see {quarantine}"
        )
    if manifest["rows_written"] == 0:
        raise PrepareError(f"no usable rows in {manifest['sources']}; see {quarantine}")
