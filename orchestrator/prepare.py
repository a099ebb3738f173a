"""`l2t data prepare`: validate, count task templates, tokenize and segment with Ray Data.

Preparation runs once for a whole sweep. Its output folder is keyed by a hash
of everything that determines it (data files, tokenizer, chat template,
length limit, template selection), so preparing again is a no-op and every
trial reads the same shards. Segments are stored, not weights: the λ values
and masking mode are applied by the training step.

Nothing is lost: every row that can't be used lands in `quarantine/` with a
reason and is counted in the manifest; the run fails only when the bad share
exceeds `data.max_bad_fraction`. The manifest is written last, so a folder
without one is an interrupted preparation and is redone.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from orchestrator import storage
from orchestrator.config import ExperimentConfig

PREPARE_FORMAT_VERSION = 1
TURNS_KEY = "\x00user_turns"  # sentinel row carrying the number of user turns through the aggregation

SHARD_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("segments", pa.list_(pa.int8())),
        ("images", pa.list_(pa.string())),
        ("length", pa.int32()),
        ("truncated", pa.bool_()),
    ]
)
QUARANTINE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("line", pa.int64()),
        ("reason", pa.string()),
        ("message", pa.string()),
        ("raw", pa.string()),
    ]
)


class PrepareError(RuntimeError):
    """Preparation refused to go on (too many bad rows, no data)."""


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


# ---------------------------------------------------------------- reading


def list_source_files(sources: list[str]) -> list[str]:
    """Expand the configured sources (files, folders, local globs) into data files."""
    files: list[str] = []
    for source in sources:
        if storage.is_s3(source):
            found = storage.list_files(source) if not Path(source).suffix else [source]
        elif any(ch in source for ch in "*?["):
            found = sorted(str(p) for p in Path().glob(source)) if not os.path.isabs(source) else sorted(
                str(p) for p in Path("/").glob(source.lstrip("/"))
            )
        elif Path(source).is_dir():
            found = sorted(str(p) for p in Path(source).rglob("*") if p.is_file())
        else:
            found = [source]
        found = [f for f in found if f.endswith((".json", ".jsonl", ".parquet"))]
        if not found:
            raise PrepareError(f"data.sources: {source!r} matches no .json, .jsonl or .parquet file")
        for f in found:
            if not storage.exists(f):
                raise PrepareError(f"data.sources: {f} does not exist")
        files.extend(found)
    return files


def _split_file(row: dict) -> list[dict]:
    """One JSON/JSONL file -> one row per record, keeping the raw text and its position."""
    path = row["path"]
    data: bytes = row["bytes"]
    if path.endswith(".jsonl"):
        lines = data.decode("utf-8", errors="replace").splitlines()
        return [
            {"source": path, "line": i + 1, "raw": line} for i, line in enumerate(lines) if line.strip()
        ]
    try:
        records = json.loads(data)
    except json.JSONDecodeError as error:
        return [{"source": path, "line": 0, "raw": data[:2000].decode("utf-8", "replace") + f"\n<<{error}>>"}]
    if not isinstance(records, list):
        records = [records]
    return [{"source": path, "line": i + 1, "raw": json.dumps(r, ensure_ascii=False)} for i, r in enumerate(records)]


def _parquet_to_raw(batch: pa.Table) -> pa.Table:
    rows = batch.drop_columns([c for c in ("path",) if c in batch.column_names]).to_pylist()
    paths = batch.column("path").to_pylist() if "path" in batch.column_names else [""] * len(rows)
    return pa.table(
        {
            "source": paths,
            "line": list(range(1, len(rows) + 1)),
            "raw": [json.dumps(r, ensure_ascii=False, default=str) for r in rows],
        }
    )


def read_raw_rows(files: list[str], num_cpus: float):
    """A Ray Dataset of `{source, line, raw}`, one row per record of every file."""
    import ray.data

    parts = []
    json_files = [f for f in files if not f.endswith(".parquet")]
    parquet_files = [f for f in files if f.endswith(".parquet")]
    if json_files:
        fs, _ = storage.filesystem(json_files[0])
        paths = [storage.filesystem(f)[1] for f in json_files]
        ds = ray.data.read_binary_files(paths, include_paths=True, filesystem=fs, num_cpus=num_cpus)
        parts.append(ds.flat_map(_split_file, num_cpus=num_cpus))
    if parquet_files:
        fs, _ = storage.filesystem(parquet_files[0])
        paths = [storage.filesystem(f)[1] for f in parquet_files]
        ds = ray.data.read_parquet(paths, include_paths=True, filesystem=fs, num_cpus=num_cpus)
        parts.append(ds.map_batches(_parquet_to_raw, batch_format="pyarrow", num_cpus=num_cpus))
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


# ---------------------------------------------------------------- validation


def check_image(image: str, image_root: str | None) -> tuple[str, str] | None:
    """(reason, message) when an image can't be used: outside the root, missing, corrupt."""
    from PIL import Image

    if image_root is None:
        return ("no_image_root", f"image {image!r} given but data.image_root is not set")
    if storage.is_s3(image_root):
        if image.startswith("/") or ".." in Path(image).parts:
            return ("image_outside_root", f"image {image!r} escapes data.image_root")
        uri = storage.join(image_root, image)
        fs, path = storage.filesystem(uri)
        try:
            with fs.open_input_file(path) as handle:
                Image.open(handle).verify()
        except FileNotFoundError:
            return ("missing_image", f"image {image!r} not found under {image_root}")
        except OSError as error:
            if "not found" in str(error).lower() or "nosuchkey" in str(error).lower():
                return ("missing_image", f"image {image!r} not found under {image_root}")
            return ("corrupt_image", f"image {image!r} can't be decoded: {error}")
        except Exception as error:  # PIL raises a zoo of types for bad bytes
            return ("corrupt_image", f"image {image!r} can't be decoded: {error}")
        return None
    root = Path(image_root).resolve()
    candidate = Path(image)
    resolved = (root / candidate).resolve()
    if candidate.is_absolute() or not resolved.is_relative_to(root):
        return ("image_outside_root", f"image {image!r} resolves outside data.image_root ({root})")
    if not resolved.is_file():
        return ("missing_image", f"image {image!r} not found under {root}")
    try:
        with Image.open(resolved) as img:
            img.verify()
    except Exception as error:
        return ("corrupt_image", f"image {image!r} can't be decoded: {type(error).__name__}: {error}")
    return None


def validate_rows(batch: dict[str, np.ndarray], fmt: str, image_root: str | None, check_images: bool) -> dict[str, list]:
    """Ray Data stage: parse each raw record and check its images; marks rows ok or bad with a reason."""
    from workloads.conversations import ConversationError, parse_record

    out: dict[str, list] = {k: [] for k in ("id", "source", "line", "raw", "ok", "reason", "message")}
    for source, line, raw in zip(batch["source"], batch["line"], batch["raw"]):
        default_id = f"{os.path.basename(str(source))}:{int(line)}"
        row_id, reason, message = default_id, "", ""
        try:
            record = json.loads(raw)
            if isinstance(record, dict) and record.get("id") is not None:
                row_id = str(record["id"])
            conversation = parse_record(record, fmt, default_id=default_id)
            row_id = conversation.id
            if check_images:
                for image in conversation.images:
                    problem = check_image(image, image_root)
                    if problem:
                        reason, message = problem
                        message = f"row {row_id!r}: {message}"
                        break
        except json.JSONDecodeError as error:
            reason, message = "malformed_json", f"{default_id}: not valid JSON: {error}"
        except ConversationError as error:
            reason, message = error.reason, str(error)
        out["id"].append(str(row_id))
        out["source"].append(str(source))
        out["line"].append(int(line))
        out["raw"].append(str(raw))
        out["ok"].append(not reason)
        out["reason"].append(reason)
        out["message"].append(message)
    return out


# ---------------------------------------------------------------- task templates


def _sentence_counts(batch: dict[str, np.ndarray], fmt: str) -> dict[str, list]:
    from workloads.conversations import parse_record
    from workloads.task_templates import instruction_sentences

    counts: Counter = Counter()
    turns = 0
    for raw, row_id in zip(batch["raw"], batch["id"]):
        conversation = parse_record(json.loads(raw), fmt, default_id=str(row_id))
        counts.update(instruction_sentences(conversation))
        turns += sum(1 for t in conversation.turns if t.role == "user")
    counts[TURNS_KEY] += turns
    return {"sentence": list(counts), "count": list(counts.values())}


def task_template_stats(good_rows, cfg: ExperimentConfig, num_cpus: float, parallelism: int = 1):
    """Distributed sentence count over all user turns, then the top-k / min-share selection."""
    from workloads.task_templates import select_task_templates

    selection = cfg.masking.task_templates
    totals = (
        good_rows.map_batches(_sentence_counts, fn_kwargs={"fmt": cfg.data.format}, batch_size=2048, num_cpus=num_cpus)
        .groupby("sentence", num_partitions=max(1, parallelism))
        .sum("count")
        .materialize()
    )
    turns_rows = totals.filter(lambda r: r["sentence"] == TURNS_KEY).take_all()
    total_turns = int(turns_rows[0]["sum(count)"]) if turns_rows else 0
    floor = max(2, math.ceil((selection.min_share or 0.0) * total_turns))
    frequent = totals.filter(lambda r: r["sentence"] != TURNS_KEY and r["sum(count)"] >= floor)
    frequent = frequent.sort("sum(count)", descending=True)
    if selection.top_k is not None:
        frequent = frequent.limit(max(selection.top_k * 4, selection.top_k + 16))  # ties are settled below
    counts = {r["sentence"]: int(r["sum(count)"]) for r in frequent.take_all()}
    return select_task_templates(counts, total_turns, top_k=selection.top_k, min_share=selection.min_share)


# ---------------------------------------------------------------- encoding


@functools.lru_cache(maxsize=4)
def _tokenizer(model_dir: str):
    """One tokenizer per worker process: Ray reuses processes across tasks."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def encode_rows(batch: dict[str, np.ndarray], model_dir: str, spec_kwargs: dict[str, Any], fmt: str) -> pa.Table:
    """Ray Data stage: render, tokenize once with offsets, segment; rows that fail get a reason."""
    from workloads.conversations import ConversationError, parse_record
    from workloads.segments import EncodeSpec, encode_conversations

    conversations = [parse_record(json.loads(raw), fmt, default_id=str(i)) for raw, i in zip(batch["raw"], batch["id"])]
    results = encode_conversations(conversations, _tokenizer(model_dir), EncodeSpec(**spec_kwargs))
    columns: dict[str, list] = {k: [] for k in ("input_ids", "segments", "images", "length", "truncated", "ok", "reason", "message")}
    for conversation, result in zip(conversations, results):
        if isinstance(result, ConversationError):
            columns["input_ids"].append([])
            columns["segments"].append([])
            columns["images"].append([])
            columns["length"].append(0)
            columns["truncated"].append(False)
            columns["ok"].append(False)
            columns["reason"].append(result.reason)
            columns["message"].append(str(result))
        else:
            columns["input_ids"].append(result.input_ids.astype(np.int32))
            columns["segments"].append(result.segments.astype(np.int8))
            columns["images"].append(list(conversation.images[: result.images_kept]))
            columns["length"].append(len(result.input_ids))
            columns["truncated"].append(bool(result.truncated))
            columns["ok"].append(True)
            columns["reason"].append("")
            columns["message"].append("")
    return pa.table(
        {
            "id": pa.array([str(x) for x in batch["id"]], pa.string()),
            "source": pa.array([str(x) for x in batch["source"]], pa.string()),
            "line": pa.array([int(x) for x in batch["line"]], pa.int64()),
            "raw": pa.array([str(x) for x in batch["raw"]], pa.string()),
            "input_ids": pa.array(columns["input_ids"], pa.list_(pa.int32())),
            "segments": pa.array(columns["segments"], pa.list_(pa.int8())),
            "images": pa.array(columns["images"], pa.list_(pa.string())),
            "length": pa.array(columns["length"], pa.int32()),
            "truncated": pa.array(columns["truncated"], pa.bool_()),
            "ok": pa.array(columns["ok"], pa.bool_()),
            "reason": pa.array(columns["reason"], pa.string()),
            "message": pa.array(columns["message"], pa.string()),
        }
    )


def _segment_totals(batch: pa.Table) -> dict[str, list]:
    from workloads.segments import Segment

    flat = batch.column("segments").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    counts = np.bincount(flat.astype(np.int64), minlength=len(Segment))
    truncated = int(np.asarray(batch.column("truncated").to_numpy(zero_copy_only=False)).sum())
    return {"segment_counts": [counts.tolist()], "truncated": [truncated], "rows": [batch.num_rows]}


def _keep(batch: pa.Table, ok: bool, columns: list[str]) -> pa.Table:
    mask = batch.column("ok")
    import pyarrow.compute as pc

    selected = batch.filter(mask if ok else pc.invert(mask))
    return selected.select(columns)


# ---------------------------------------------------------------- the whole stage


def preparation_key(cfg: ExperimentConfig, files: list[str], model_dir: str) -> str:
    """Hash of everything that determines the prepared output."""
    hasher = hashlib.sha256()
    hasher.update(f"format={PREPARE_FORMAT_VERSION}".encode())
    for f in sorted(files):
        hasher.update(storage.file_fingerprint(f).encode())
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json"):
        path = Path(model_dir, name)
        if path.exists():
            hasher.update(name.encode() + hashlib.sha256(path.read_bytes()).digest())
    data = cfg.data.model_dump(mode="json")
    data.pop("sources")
    data.pop("synthetic")
    data.pop("eval_file")
    hasher.update(json.dumps(data, sort_keys=True).encode())
    hasher.update(json.dumps(cfg.masking.task_templates.model_dump(mode="json"), sort_keys=True).encode())
    if cfg.masking.task_templates.file:
        hasher.update(storage.read_text(cfg.masking.task_templates.file).encode())
    return hasher.hexdigest()[:16]


def prepare(cfg: ExperimentConfig, model_dir: str, *, data_cpus: float | None = None, force: bool = False) -> PreparedData:
    """Prepare `cfg.data` for training with the tokenizer of `model_dir`; reuses an earlier identical run."""
    import ray

    from orchestrator.cluster import cluster_cpus
    from workloads.model import num_image_tokens
    from workloads.task_templates import TaskTemplateList
    from transformers import AutoConfig

    files = list_source_files(cfg.data.sources)
    key = preparation_key(cfg, files, model_dir)
    out = storage.join(storage.absolute(cfg.storage.path), "prepared", key)
    manifest_uri = storage.join(out, "manifest.json")
    if storage.exists(manifest_uri) and not force:
        prepared = PreparedData.load(out)
        _check_bad_share(prepared.manifest, cfg, prepared.quarantine)
        return prepared
    storage.delete_dir(out)

    cpus = data_cpus or cluster_cpus()
    task_cpus = 1.0 if cpus >= 1 else cpus
    raw = read_raw_rows(files, num_cpus=task_cpus)
    if cpus >= 2:
        raw = raw.repartition(int(cpus * 4))
    validated = raw.map_batches(
        validate_rows,
        fn_kwargs={"fmt": cfg.data.format, "image_root": cfg.data.image_root, "check_images": cfg.data.check_images},
        batch_size=1024,
        num_cpus=task_cpus,
    ).materialize()
    rows_in = validated.count()
    if rows_in == 0:
        raise PrepareError(f"data.sources: no rows found in {files}")

    good = validated.filter(expr="ok")
    if cfg.masking.task_templates.file:
        templates = TaskTemplateList.from_dict(json.loads(storage.read_text(cfg.masking.task_templates.file)))
    else:
        templates = task_template_stats(good, cfg, task_cpus, parallelism=int(cpus))

    model_config = AutoConfig.from_pretrained(model_dir)
    spec_kwargs = {
        "template": cfg.data.chat_template,
        "num_image_tokens": num_image_tokens(model_config),
        "max_length": cfg.data.max_length,
        "task_templates": templates.sentences(),
        "system_prompt": cfg.data.system_prompt,
    }
    encoded = good.map_batches(
        encode_rows,
        fn_kwargs={"model_dir": model_dir, "spec_kwargs": spec_kwargs, "fmt": cfg.data.format},
        batch_size=512,
        batch_format="numpy",
        num_cpus=task_cpus,
    ).materialize()

    quarantine_columns = QUARANTINE_SCHEMA.names
    bad_validation = validated.filter(expr="not ok").select_columns(quarantine_columns)
    bad_encoding = encoded.map_batches(
        _keep, fn_kwargs={"ok": False, "columns": quarantine_columns}, batch_format="pyarrow", num_cpus=task_cpus
    )
    quarantined = bad_validation.union(bad_encoding).materialize()
    written = encoded.map_batches(
        _keep, fn_kwargs={"ok": True, "columns": SHARD_SCHEMA.names}, batch_format="pyarrow", num_cpus=task_cpus
    ).materialize()

    fs, path = storage.filesystem(out)
    written.write_parquet(storage.filesystem(storage.join(out, "shards"))[1], filesystem=fs)
    rows_bad = quarantined.count()
    if rows_bad:
        quarantined.write_parquet(storage.filesystem(storage.join(out, "quarantine"))[1], filesystem=fs)
    storage.write_text(storage.join(out, "task_templates.json"), json.dumps(templates.to_dict(), indent=2, ensure_ascii=False))

    from workloads.segments import Segment

    totals = written.map_batches(_segment_totals, batch_format="pyarrow", batch_size=4096, num_cpus=task_cpus).take_all()
    segment_counts = np.sum([t["segment_counts"] for t in totals], axis=0) if totals else np.zeros(len(Segment))
    reasons = Counter(r["reason"] for r in quarantined.select_columns(["reason"]).take_all())
    rows_written = int(sum(t["rows"] for t in totals))
    lengths = written.select_columns(["length"]).to_pandas()["length"] if rows_written else None
    manifest = {
        "format_version": PREPARE_FORMAT_VERSION,
        "key": key,
        "path": out,
        "sources": files,
        "model": model_dir,
        "chat_template": cfg.data.chat_template,
        "max_length": cfg.data.max_length,
        "num_image_tokens": spec_kwargs["num_image_tokens"],
        "rows_in": rows_in,
        "rows_written": rows_written,
        "rows_quarantined": rows_bad,
        "quarantined_by_reason": dict(sorted(reasons.items())),
        "truncated_rows": int(sum(t["truncated"] for t in totals)),
        "tokens_total": int(segment_counts.sum()),
        "tokens_by_segment": {s.name.lower(): int(segment_counts[int(s)]) for s in Segment},
        "length_mean": float(lengths.mean()) if lengths is not None else 0.0,
        "length_max": int(lengths.max()) if lengths is not None else 0,
        "task_templates_version": templates.version,
        "task_templates": len(templates.entries),
        "ray_version": ray.__version__,
    }
    if rows_in != rows_written + rows_bad:
        raise PrepareError(f"row accounting broke: {rows_in} in, {rows_written} written, {rows_bad} quarantined")
    storage.write_text(manifest_uri, json.dumps(manifest, indent=2))
    _check_bad_share(manifest, cfg, storage.join(out, "quarantine"))
    return PreparedData(path=out, manifest=manifest)


def _check_bad_share(manifest: dict[str, Any], cfg: ExperimentConfig, quarantine: str) -> None:
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
