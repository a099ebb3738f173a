"""`l2t data prepare`: validate, count task templates, tokenize and segment with Ray Data.

Preparation runs once for a whole sweep. Its output folder is keyed by a hash
of everything that determines it (data files, tokenizer, chat template,
length limit, image checks, template selection), so preparing again is a
no-op and every trial reads the same shards. Segments are stored, not
weights: the λ values and masking mode are applied by the training step.

Nothing is lost: every row that can't be used lands in `quarantine/` with a
reason and is counted in the manifest; the run fails only when the bad share
exceeds `data.max_bad_fraction` (which is not part of the hash: a stricter or
looser limit judges the same output). The manifest is written last, so a
folder without one is an interrupted preparation and is redone.

The stages, each a Ray Data execution of tasks (no actors: an actor holding a
whole CPU starves the other stages on a 2-core machine):

1. read + validate (materialized): every file is read once and split into
   records (JSONL lines, JSON array elements, Parquet rows) with their
   position, blocks are re-cut to a fixed row count so that one big file
   still spreads over all CPUs, every record is parsed, checked (schema, role
   order, placeholders, images under the image root) and normalized into
   columns (`turns`, `images`, `system`, `sentences`), so no later stage
   parses JSON again;
2. task-template statistics: validation already split every user turn into
   sentences (`task_templates.instruction_sentences`); Arrow value counts per
   block, `groupby("sentence").sum()` across blocks, and only the sentences
   frequent enough to be selected come back to the driver;
3. encode (materialized): render, tokenize once with offsets, segment
   (`workloads.segments.encode_conversations`), compact Arrow columns;
4. write: shards (good rows) and quarantine (rows that failed validation or
   encoding) as Parquet, task_templates.json, manifest.json last.

Progress goes to `progress` (stderr by default): a line per stage with rows,
rate and time, and a live line every few seconds during the long stages.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import posixpath
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from orchestrator import storage
from orchestrator.config import ExperimentConfig

PREPARE_FORMAT_VERSION = 2

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
        ("line", pa.int64()),  # JSONL: line number; JSON array / Parquet: record number (1-based)
        ("reason", pa.string()),
        ("message", pa.string()),
        ("raw", pa.string()),
    ]
)
# Records as read: one row per JSONL line / JSON array element / Parquet row.
RAW_SCHEMA = pa.schema([("source", pa.string()), ("line", pa.int64()), ("raw", pa.string()), ("error", pa.string())])
# Validated records: the quarantine columns plus the normalized conversation.
VALIDATED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("line", pa.int64()),
        ("raw", pa.string()),
        ("ok", pa.bool_()),
        ("reason", pa.string()),
        ("message", pa.string()),
        ("turns", pa.list_(pa.string())),  # user, assistant, user, ... (validated order)
        ("images", pa.list_(pa.string())),
        ("system", pa.string()),
        ("sentences", pa.list_(pa.string())),  # instruction sentences, for the task-template statistics
    ]
)
ENCODED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("line", pa.int64()),
        ("raw", pa.string()),  # kept only for rows that failed encoding (for the quarantine)
        ("input_ids", pa.list_(pa.int32())),
        ("segments", pa.list_(pa.int8())),
        ("images", pa.list_(pa.string())),
        ("length", pa.int32()),
        ("truncated", pa.bool_()),
        ("ok", pa.bool_()),
        ("reason", pa.string()),
        ("message", pa.string()),
    ]
)

# Rows per block after reading: small enough that one big file spreads over
# every CPU, large enough that per-task overhead stays negligible.
MIN_ROWS_PER_BLOCK = 512
MAX_ROWS_PER_BLOCK = 16384
PROGRESS_EVERY_S = 10.0

Progress = Callable[[str], None]


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
            found = (
                sorted(str(p) for p in Path().glob(source))
                if not os.path.isabs(source)
                else sorted(str(p) for p in Path("/").glob(source.lstrip("/")))
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
        files.extend(storage.absolute(f) for f in found)
    return files


_WHITESPACE = re.compile(r"\s*")


def _raw_table(source: str, lines: list[int] | np.ndarray, raws, errors=None) -> pa.Table:
    n = len(raws)
    return pa.table(
        {
            "source": pa.array([source] * n, pa.string()) if n else pa.array([], pa.string()),
            "line": pa.array(np.asarray(lines, dtype=np.int64)),
            "raw": raws if isinstance(raws, pa.Array) else pa.array(raws, pa.string()),
            "error": pa.array(errors if errors is not None else [None] * n, pa.string()),
        },
        schema=RAW_SCHEMA,
    )


def _split_jsonl(source: str, data: bytes) -> pa.Table:
    """One row per non-blank line; `line` is the 1-based line number in the file."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    pieces = data.split(b"\n")
    line = np.arange(1, len(pieces) + 1, dtype=np.int64)
    errors = None
    try:
        raws = pa.array(pieces, pa.binary()).cast(pa.string())
    except pa.ArrowInvalid:  # invalid UTF-8 somewhere: decode line by line, flag the bad ones
        texts, errors = [], []
        for i, piece in enumerate(pieces):
            try:
                texts.append(piece.decode("utf-8"))
                errors.append(None)
            except UnicodeDecodeError as error:
                texts.append(piece.decode("utf-8", errors="replace"))
                errors.append(f"malformed_json|{source}:{i + 1}: not valid UTF-8: {error}")
        raws = pa.array(texts, pa.string())
    raws = pc.utf8_rtrim(raws, characters="\r")
    keep = pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(raws)), 0)
    table = _raw_table(source, line, raws, errors)
    return table.filter(keep)


def _split_json(source: str, data: bytes) -> pa.Table:
    """One row per element of a top-level JSON array (or one row for a single object).

    Elements are cut out of the text as written (no re-serialization). A syntax
    error ends the file: the rest becomes one malformed row that says where.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        return _raw_table(
            source,
            [1],
            [data[:2000].decode("utf-8", "replace")],
            [f"malformed_json|{source}: not valid UTF-8: {error}"],
        )
    decoder = json.JSONDecoder()
    raws: list[str] = []
    errors: list[str | None] = []
    position = _WHITESPACE.match(text, 0).end()
    if position == len(text):
        return _raw_table(source, [], [])
    if text[position] != "[":  # a single record
        try:
            _, end = decoder.raw_decode(text, position)
            if _WHITESPACE.match(text, end).end() != len(text):
                raise json.JSONDecodeError("extra data after the top-level value", text, end)
            raws.append(text[position:end])
            errors.append(None)
        except json.JSONDecodeError as error:
            raws.append(text[position : position + 2000])
            errors.append(f"malformed_json|{source}: not valid JSON: {error}")
        return _raw_table(source, [1], raws, errors)
    position = _WHITESPACE.match(text, position + 1).end()
    closed = position < len(text) and text[position] == "]"
    while not closed:
        try:
            _, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raws.append(text[position : position + 2000])
            errors.append(
                f"malformed_json|{source}: not valid JSON at record {len(raws)} "
                f"(the rest of the file, {len(text) - position} characters, can't be read): {error}"
            )
            break
        raws.append(text[position:end])
        errors.append(None)
        position = _WHITESPACE.match(text, end).end()
        if position < len(text) and text[position] == ",":
            position = _WHITESPACE.match(text, position + 1).end()
        elif position < len(text) and text[position] == "]":
            closed = True
        else:
            raws.append(text[position : position + 2000])
            errors.append(f"malformed_json|{source}: expected ',' or ']' after record {len(raws) - 1}")
            break
    if closed:
        rest = _WHITESPACE.match(text, position + 1).end()
        if rest < len(text):
            raws.append(text[rest : rest + 2000])
            errors.append(f"malformed_json|{source}: extra data after the top-level array")
    return _raw_table(source, np.arange(1, len(raws) + 1), raws, errors)


def _split_parquet(source: str, data: bytes) -> pa.Table:
    """One row per Parquet row, as JSON text (the validation stage parses records from JSON)."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except Exception as error:  # noqa: BLE001 - any reader failure makes the whole file unusable
        return _raw_table(source, [0], [""], [f"malformed_parquet|{source}: can't be read as Parquet: {error}"])
    rows = table.to_pylist()
    raws = [json.dumps(row, ensure_ascii=False, default=str) for row in rows]
    return _raw_table(source, np.arange(1, len(rows) + 1), raws)


def split_files(batch: pa.Table, sources: dict[str, str]) -> Iterator[pa.Table]:
    """Ray Data stage: whole files (`path`, `bytes`) -> one row per record `{source, line, raw, error}`."""
    for path, data in zip(batch.column("path").to_pylist(), batch.column("bytes").to_pylist()):
        source = sources.get(path, path)
        if source.endswith(".jsonl"):
            yield _split_jsonl(source, data)
        elif source.endswith(".parquet"):
            yield _split_parquet(source, data)
        else:
            yield _split_json(source, data)


def read_records(files: list[str], rows_per_block: int, num_cpus: float):
    """A Ray Dataset of `{source, line, raw, error}`, one row per record, in blocks of `rows_per_block` rows."""
    import ray.data

    groups: dict[bool, list[str]] = {}
    for f in files:
        groups.setdefault(storage.is_s3(f), []).append(f)
    parts = []
    for group in groups.values():
        fs, _ = storage.filesystem(group[0])
        paths = [storage.filesystem(f)[1] for f in group]
        ds = ray.data.read_binary_files(paths, include_paths=True, filesystem=fs, num_cpus=num_cpus)
        parts.append(
            ds.map_batches(
                split_files,
                fn_kwargs={"sources": dict(zip(paths, group))},
                batch_size=1,
                batch_format="pyarrow",
                num_cpus=num_cpus,
            )
        )
    records = parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
    # strict: not fused with the split before it, so that one big file becomes many validation tasks
    return records.repartition(target_num_rows_per_block=rows_per_block, strict=True)


def rows_per_block(files: list[str], cpus: float) -> int:
    """Block size from the input size: about four blocks per CPU, within [MIN, MAX]_ROWS_PER_BLOCK."""
    total_bytes = 0
    for f in files:
        fs, path = storage.filesystem(f)
        total_bytes += fs.get_file_info(path).size or 0
    estimated_rows = total_bytes / 256  # LLaVA rows are 250 B (short VQA) to a few kB
    return int(min(MAX_ROWS_PER_BLOCK, max(MIN_ROWS_PER_BLOCK, math.ceil(estimated_rows / max(1.0, 4 * cpus)))))


# ---------------------------------------------------------------- validation


class ImageChecker:
    """Checks image paths of rows: inside the image root (always), present and decodable (`check_images`).

    A path that is absolute or climbs out with `..` is refused without
    touching any file system; with `check_images` the path is also resolved
    (symlinks included) and must stay inside the root, exist and decode. Each
    distinct path is checked once per checker. S3 roots are checked on a few
    threads (each check is a round trip).
    """

    def __init__(self, image_root: str | None, check_images: bool, filesystem=None):
        self.image_root = image_root
        self.check_images = check_images
        self.s3 = image_root is not None and storage.is_s3(image_root)
        self.filesystem = filesystem
        if self.s3 and filesystem is None:
            self.filesystem = storage.filesystem(image_root)[0]
        self.root = None if image_root is None or self.s3 else Path(image_root).resolve()
        self.s3_root = image_root[len("s3://") :].rstrip("/") if self.s3 else ""
        self._seen: dict[str, tuple[str, str] | None] = {}

    def prefetch(self, images: list[str]) -> None:
        """Check many paths at once (threads for S3); results are cached for `check`."""
        todo = [image for image in dict.fromkeys(images) if image not in self._seen]
        if not (self.s3 and self.check_images and len(todo) > 1):
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(16, len(todo)), thread_name_prefix="l2t-image-check") as pool:
            for image, result in zip(todo, pool.map(self._check, todo)):
                self._seen[image] = result

    def check(self, image: str) -> tuple[str, str] | None:
        """(reason, message) when the image can't be used, else None."""
        if image not in self._seen:
            self._seen[image] = self._check(image)
        return self._seen[image]

    def _check(self, image: str) -> tuple[str, str] | None:
        lexical = posixpath.normpath(image.replace("\\", "/")) if image else ""
        if not image or image.startswith(("/", "\\")) or "://" in image or re.match(r"^[A-Za-z]:", image):
            return ("image_outside_root", f"image {image!r} is not a relative path under data.image_root")
        if lexical == ".." or lexical.startswith("../"):
            return ("image_outside_root", f"image {image!r} escapes data.image_root")
        if not self.check_images:
            return None
        if self.image_root is None:
            return ("no_image_root", f"image {image!r} given but data.image_root is not set")
        if self.s3:
            return self._check_s3(lexical)
        resolved = (self.root / image).resolve()
        if not resolved.is_relative_to(self.root):
            return ("image_outside_root", f"image {image!r} resolves outside data.image_root ({self.root})")
        if not resolved.is_file():
            return ("missing_image", f"image {image!r} not found under {self.root}")
        return _decode_problem(image, lambda: open(resolved, "rb"))

    def _check_s3(self, image: str) -> tuple[str, str] | None:
        import pyarrow.fs as pafs

        path = posixpath.join(self.s3_root, image)
        try:
            if self.filesystem.get_file_info(path).type != pafs.FileType.File:
                return ("missing_image", f"image {image!r} not found under {self.image_root}")
        except OSError as error:
            return ("missing_image", f"image {image!r} can't be reached under {self.image_root}: {error}")
        return _decode_problem(image, lambda: self.filesystem.open_input_file(path))


def _decode_problem(image: str, opener) -> tuple[str, str] | None:
    from PIL import Image

    try:
        with opener() as handle, Image.open(handle) as img:
            img.verify()
    except Exception as error:  # PIL raises a zoo of types for bad bytes
        return ("corrupt_image", f"image {image!r} can't be decoded: {type(error).__name__}: {error}")
    return None


def check_image(image: str, image_root: str | None, filesystem=None) -> tuple[str, str] | None:
    """(reason, message) when one image can't be used: outside the root, missing, corrupt."""
    return ImageChecker(image_root, True, filesystem).check(image)


def validate_rows(
    batch: pa.Table, fmt: str, image_root: str | None, check_images: bool, image_filesystem=None
) -> pa.Table:
    """Ray Data stage: parse each raw record, check its images, normalize it; bad rows get a reason.

    Output: VALIDATED_SCHEMA. Good rows carry the conversation as columns
    (`turns` alternate user/assistant, `images`, `system`) so later stages
    never parse JSON again; every row keeps its raw text for the quarantine.
    """
    from workloads.conversations import ConversationError, parse_record
    from workloads.task_templates import instruction_sentences

    checker = ImageChecker(image_root, check_images, image_filesystem)
    sources = batch.column("source").to_pylist()
    lines = batch.column("line").to_pylist()
    raws = batch.column("raw").to_pylist()
    errors = batch.column("error").to_pylist() if "error" in batch.column_names else [None] * len(raws)

    parsed: list = []
    for source, line, raw, read_error in zip(sources, lines, raws, errors):
        default_id = f"{os.path.basename(source)}:{line}"
        if read_error:
            reason, _, message = read_error.partition("|")
            parsed.append((default_id, ConversationError(reason, message)))
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as error:
            parsed.append((default_id, ConversationError("malformed_json", f"{default_id}: not valid JSON: {error}")))
            continue
        row_id = default_id
        if isinstance(record, dict) and record.get("id") is not None:
            row_id = str(record["id"])
        try:
            parsed.append((row_id, parse_record(record, fmt, default_id=default_id)))
        except ConversationError as error:
            parsed.append((row_id, error))
    if check_images and checker.s3:
        checker.prefetch([image for _, c in parsed if not isinstance(c, Exception) for image in c.images])

    ids, ok, reasons, messages, turns, images, systems, sentences = [], [], [], [], [], [], [], []
    for row_id, conversation in parsed:
        problem = None
        if not isinstance(conversation, Exception):
            row_id = conversation.id
            for image in conversation.images:
                problem = checker.check(image)
                if problem:
                    problem = (problem[0], f"row {row_id!r}: {problem[1]}")
                    break
        else:
            problem = (conversation.reason, str(conversation))
        ids.append(row_id)
        if problem:
            ok.append(False)
            reasons.append(problem[0])
            messages.append(problem[1])
            turns.append([])
            images.append([])
            systems.append(None)
            sentences.append([])
        else:
            ok.append(True)
            reasons.append("")
            messages.append("")
            turns.append([turn.text for turn in conversation.turns])
            images.append(list(conversation.images))
            systems.append(conversation.system)
            sentences.append(instruction_sentences(conversation))
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "source": batch.column("source"),
            "line": batch.column("line"),
            "raw": batch.column("raw"),
            "ok": pa.array(ok, pa.bool_()),
            "reason": pa.array(reasons, pa.string()),
            "message": pa.array(messages, pa.string()),
            "turns": pa.array(turns, pa.list_(pa.string())),
            "images": pa.array(images, pa.list_(pa.string())),
            "system": pa.array(systems, pa.string()),
            "sentences": pa.array(sentences, pa.list_(pa.string())),
        },
        schema=VALIDATED_SCHEMA,
    )


def conversations_of(batch: pa.Table) -> list:
    """The validated rows of a VALIDATED_SCHEMA table as `Conversation`s (no parsing, no checks)."""
    from workloads.conversations import ASSISTANT, USER, Conversation, Turn

    roles = (USER, ASSISTANT)
    return [
        Conversation(
            id=row_id,
            turns=tuple(Turn(roles[i % 2], text) for i, text in enumerate(texts)),
            images=tuple(images),
            system=system,
        )
        for row_id, texts, images, system in zip(
            batch.column("id").to_pylist(),
            batch.column("turns").to_pylist(),
            batch.column("images").to_pylist(),
            batch.column("system").to_pylist(),
        )
    ]


def _reason_counts(batch: pa.Table) -> dict[str, int]:
    bad = batch.filter(pc.invert(batch.column("ok"))).column("reason")
    if len(bad) == 0:
        return {}
    counts = pc.value_counts(bad)
    return {str(v): int(c) for v, c in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())}


def _validation_summary(batch: pa.Table) -> pa.Table:
    """One row per block: rows, bad rows by reason, user turns of the good rows."""
    good_turns = batch.filter(batch.column("ok")).column("turns")
    user_turns = (
        int(pc.sum(pc.divide(pc.add(pc.list_value_length(good_turns), 1), 2)).as_py() or 0) if len(good_turns) else 0
    )
    summary = {"rows": batch.num_rows, "reasons": _reason_counts(batch), "user_turns": user_turns}
    return pa.table({"summary": [json.dumps(summary)]})


# ---------------------------------------------------------------- task templates


def sentence_counts(batch: pa.Table) -> pa.Table:
    """Ray Data stage: per block, in how many user turns each instruction sentence occurs.

    Validation already split the user turns into sentences
    (`task_templates.instruction_sentences`, one count per turn), so this is
    an Arrow value count: the map-side half of the aggregation.
    """
    flat = pc.list_flatten(batch.column("sentences"))
    if len(flat) == 0:
        return pa.table({"sentence": pa.array([], pa.string()), "count": pa.array([], pa.int64())})
    counts = pc.value_counts(flat)
    return pa.table({"sentence": counts.field("values"), "count": pc.cast(counts.field("counts"), pa.int64())})


def task_template_stats(rows, cfg: ExperimentConfig, total_turns: int, num_cpus: float, partitions: int = 1):
    """Distributed sentence count over all user turns (Ray Data groupby-sum), then the top-k / min-share selection.

    Only sentences that can be selected come back to the driver: those in at
    least `min_share` of the user turns (and at least 2), or, without a share
    limit, the most frequent ones.
    """
    from ray.data.expressions import col

    from workloads.task_templates import select_task_templates

    selection = cfg.masking.task_templates
    if total_turns == 0 or selection.top_k == 0:
        return select_task_templates({}, total_turns, top_k=selection.top_k, min_share=selection.min_share)
    totals = (
        rows.map_batches(sentence_counts, batch_size=None, batch_format="pyarrow", num_cpus=num_cpus)
        .groupby("sentence", num_partitions=max(1, partitions))
        .sum("count")
    )
    floor = max(2, math.ceil((selection.min_share or 0.0) * total_turns))
    frequent = totals.filter(expr=col("sum(count)") >= floor)
    if selection.min_share is None and selection.top_k is not None:
        frequent = frequent.sort("sum(count)", descending=True).limit(max(selection.top_k * 4, selection.top_k + 16))
    counts = {r["sentence"]: int(r["sum(count)"]) for r in frequent.take_all()}
    return select_task_templates(counts, total_turns, top_k=selection.top_k, min_share=selection.min_share)


# ---------------------------------------------------------------- encoding


@functools.lru_cache(maxsize=4)
def _tokenizer(model_dir: str):
    """One tokenizer per worker process: Ray reuses processes across tasks.

    Ray runs one task per CPU, so the Rust tokenizer must not start a thread
    pool of its own on top (TOKENIZERS_PARALLELISM=false).
    """
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _list_array(arrays: list[np.ndarray], dtype) -> pa.Array:
    """A list<dtype> Arrow array from numpy arrays, with one copy."""
    lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = (
        np.concatenate(arrays).astype(dtype.to_pandas_dtype(), copy=False)
        if arrays
        else np.zeros(0, dtype.to_pandas_dtype())
    )
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, dtype))


def encode_rows(batch: pa.Table, model_dir: str, spec_kwargs: dict[str, Any]) -> pa.Table:
    """Ray Data stage: render, tokenize once with offsets, segment; rows that fail get a reason.

    Input: good rows of VALIDATED_SCHEMA. Output: ENCODED_SCHEMA, `raw` kept
    only for failed rows.
    """
    from workloads.conversations import ConversationError
    from workloads.segments import EncodeSpec, encode_conversations

    conversations = conversations_of(batch)
    results = encode_conversations(conversations, _tokenizer(model_dir), EncodeSpec(**spec_kwargs))
    empty_ids, empty_segments = np.zeros(0, np.int32), np.zeros(0, np.int8)
    input_ids, segments, images, truncated, ok, reasons, messages = [], [], [], [], [], [], []
    failed = np.zeros(len(results), dtype=bool)
    for i, (conversation, result) in enumerate(zip(conversations, results)):
        if isinstance(result, ConversationError):
            failed[i] = True
            input_ids.append(empty_ids)
            segments.append(empty_segments)
            images.append([])
            truncated.append(False)
            ok.append(False)
            reasons.append(result.reason)
            messages.append(str(result))
        else:
            input_ids.append(result.input_ids)
            segments.append(result.segments)
            images.append(list(conversation.images[: result.images_kept]))
            truncated.append(bool(result.truncated))
            ok.append(True)
            reasons.append("")
            messages.append("")
    raw = batch.column("raw")
    if not failed.any():
        raw = pa.array([""] * batch.num_rows, pa.string())
    else:
        raw = pc.if_else(pa.array(failed), raw, pa.scalar("", pa.string()))
    return pa.table(
        {
            "id": batch.column("id"),
            "source": batch.column("source"),
            "line": batch.column("line"),
            "raw": raw,
            "input_ids": _list_array(input_ids, pa.int32()),
            "segments": _list_array(segments, pa.int8()),
            "images": pa.array(images, pa.list_(pa.string())),
            "length": pa.array(np.fromiter(map(len, input_ids), np.int32, count=len(input_ids))),
            "truncated": pa.array(truncated, pa.bool_()),
            "ok": pa.array(ok, pa.bool_()),
            "reason": pa.array(reasons, pa.string()),
            "message": pa.array(messages, pa.string()),
        },
        schema=ENCODED_SCHEMA,
    )


def _encoding_summary(batch: pa.Table) -> pa.Table:
    """One row per block: written rows, tokens per segment, truncations, lengths, failures by reason."""
    from workloads.segment_codes import Segment

    good = batch.filter(batch.column("ok"))
    flat = pc.list_flatten(good.column("segments")).to_numpy(zero_copy_only=False)
    lengths = good.column("length").to_numpy(zero_copy_only=False)
    summary = {
        "rows": good.num_rows,
        "segment_counts": np.bincount(flat.astype(np.int64), minlength=len(Segment)).tolist(),
        "truncated": int(pc.sum(pc.cast(good.column("truncated"), pa.int64())).as_py() or 0),
        "length_sum": int(lengths.sum()),
        "length_max": int(lengths.max()) if len(lengths) else 0,
        "reasons": _reason_counts(batch),
    }
    return pa.table({"summary": [json.dumps(summary)]})


def _summaries(ds, fn, num_cpus: float) -> list[dict]:
    rows = ds.map_batches(fn, batch_size=None, batch_format="pyarrow", num_cpus=num_cpus).take_all()
    return [json.loads(r["summary"]) for r in rows]


# ---------------------------------------------------------------- progress


def stderr_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _rate(rows: int, seconds: float) -> str:
    return f"{rows / seconds:,.0f} rows/s" if seconds > 0 else "-"


def _materialize(ds, stage: str, progress: Progress | None, schema: pa.Schema, total: int | None = None):
    """Execute `ds` into the object store (like `ds.materialize()`), reporting rows done every PROGRESS_EVERY_S seconds."""
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
            eta = ""
            if total and rows:
                eta = f", about {max(0.0, elapsed * (total - rows) / rows):.0f} s left"
            progress(f"[prepare] {stage}: {done}, {_rate(rows, elapsed)}{eta}")
    # Public API: a dataset over the executed blocks (their metadata is read back by small tasks).
    return ray.data.from_arrow_refs(refs) if refs else ray.data.from_arrow(schema.empty_table())


# ---------------------------------------------------------------- the whole stage


def preparation_inputs(cfg: ExperimentConfig, files: list[str], model_dir: str) -> dict[str, Any]:
    """Everything that determines the prepared output (what the folder key hashes)."""
    tokenizer_files = {}
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "config.json",
        "chat_template.jinja",
    ):
        path = Path(model_dir, name)
        if path.exists():
            tokenizer_files[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    data = cfg.data.model_dump(mode="json")
    for key in ("sources", "synthetic", "eval_file", "max_bad_fraction"):
        data.pop(key)
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
    return _key(preparation_inputs(cfg, files, model_dir))


def _key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def prepare(
    cfg: ExperimentConfig,
    model_dir: str,
    *,
    data_cpus: float | None = None,
    force: bool = False,
    progress: Progress | None = stderr_progress,
) -> PreparedData:
    """Prepare `cfg.data` for training with the tokenizer of `model_dir`; reuses an earlier identical run.

    `progress` receives human-readable status lines (None: silent). Ray Data's
    own progress bars are turned off meanwhile, so the two don't interleave.
    """
    from ray.data import DataContext

    files = list_source_files(cfg.data.sources)
    inputs = preparation_inputs(cfg, files, model_dir)
    key = _key(inputs)
    out = storage.join(storage.absolute(cfg.storage.path), "prepared", key)
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


def _prepare(cfg, model_dir, files, inputs, key, out, data_cpus, progress) -> dict[str, Any]:
    import ray
    from ray.data.expressions import col
    from transformers import AutoConfig

    from orchestrator.cluster import cluster_cpus
    from workloads.model import num_image_tokens
    from workloads.segment_codes import Segment
    from workloads.task_templates import TaskTemplateList

    say = progress or (lambda message: None)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    cpus = data_cpus or cluster_cpus()
    task_cpus = 1.0 if cpus >= 1 else cpus
    block_rows = rows_per_block(files, cpus)
    image_filesystem = (
        storage.filesystem(cfg.data.image_root)[0]
        if cfg.data.image_root and storage.is_s3(cfg.data.image_root)
        else None
    )

    # 1. read + validate
    say(f"[prepare] read and validate {len(files)} file(s) on {cpus:g} CPUs -> {out}")
    stage = time.perf_counter()
    validated = _materialize(
        read_records(files, block_rows, task_cpus).map_batches(
            validate_rows,
            fn_kwargs={
                "fmt": cfg.data.format,
                "image_root": cfg.data.image_root,
                "check_images": cfg.data.check_images,
                "image_filesystem": image_filesystem,
            },
            batch_size=None,
            batch_format="pyarrow",
            num_cpus=task_cpus,
        ),
        "read and validate",
        progress,
        VALIDATED_SCHEMA,
    )
    summaries = _summaries(validated, _validation_summary, task_cpus)
    rows_in = sum(s["rows"] for s in summaries)
    validation_reasons: Counter = Counter()
    for s in summaries:
        validation_reasons.update(s["reasons"])
    rows_valid = rows_in - sum(validation_reasons.values())
    total_turns = sum(s["user_turns"] for s in summaries)
    timings["read_validate_s"] = time.perf_counter() - stage
    if rows_in == 0:
        raise PrepareError(f"data.sources: no rows found in {files}")
    say(
        f"[prepare] validated {rows_in:,} rows in {timings['read_validate_s']:.1f} s "
        f"({_rate(rows_in, timings['read_validate_s'])}): {rows_valid:,} good"
        + (f", {rows_in - rows_valid:,} bad ({_reasons_text(validation_reasons)})" if rows_in > rows_valid else "")
    )
    good = validated.filter(expr=col("ok"))

    # 2. task-template statistics
    stage = time.perf_counter()
    if cfg.masking.task_templates.file:
        templates = TaskTemplateList.from_dict(json.loads(storage.read_text(cfg.masking.task_templates.file)))
        origin = f"from {cfg.masking.task_templates.file}"
    else:
        templates = task_template_stats(validated, cfg, total_turns, task_cpus, partitions=max(1, int(cpus)))
        origin = f"from {total_turns:,} user turns"
    timings["template_stats_s"] = time.perf_counter() - stage
    top = f"; top: {templates.entries[0].sentence!r} ({templates.entries[0].share:.1%})" if templates.entries else ""
    say(f"[prepare] task templates: {len(templates.entries)} {origin} in {timings['template_stats_s']:.1f} s{top}")

    # 3. encode
    stage = time.perf_counter()
    say(
        f"[prepare] tokenize and segment {rows_valid:,} rows ({cfg.data.chat_template}, max_length {cfg.data.max_length}, {Path(model_dir).name})"
    )
    model_config = AutoConfig.from_pretrained(model_dir)
    spec_kwargs = {
        "template": cfg.data.chat_template,
        "num_image_tokens": num_image_tokens(model_config),
        "max_length": cfg.data.max_length,
        "task_templates": templates.sentences(),
        "system_prompt": cfg.data.system_prompt,
    }
    encoded = _materialize(
        good.map_batches(
            encode_rows,
            fn_kwargs={"model_dir": model_dir, "spec_kwargs": spec_kwargs},
            batch_size=None,
            batch_format="pyarrow",
            num_cpus=task_cpus,
        ),
        "tokenize and segment",
        progress,
        ENCODED_SCHEMA,
        total=rows_valid,
    )
    totals = _summaries(encoded, _encoding_summary, task_cpus)
    timings["encode_s"] = time.perf_counter() - stage
    rows_written = sum(t["rows"] for t in totals)
    encoding_reasons: Counter = Counter()
    for t in totals:
        encoding_reasons.update(t["reasons"])
    say(
        f"[prepare] tokenized and segmented {rows_valid:,} rows in {timings['encode_s']:.1f} s "
        f"({_rate(rows_valid, timings['encode_s'])})"
        + (
            f"; {sum(encoding_reasons.values()):,} failed ({_reasons_text(encoding_reasons)})"
            if encoding_reasons
            else ""
        )
    )

    # 4. write
    stage = time.perf_counter()
    fs, _ = storage.filesystem(out)
    encoded.filter(expr=col("ok")).select_columns(SHARD_SCHEMA.names).write_parquet(
        storage.filesystem(storage.join(out, "shards"))[1], filesystem=fs
    )
    reasons = validation_reasons + encoding_reasons
    rows_bad = sum(reasons.values())
    if rows_bad:
        parts = []
        if validation_reasons:
            parts.append(validated.filter(expr=~col("ok")).select_columns(QUARANTINE_SCHEMA.names))
        if encoding_reasons:
            parts.append(encoded.filter(expr=~col("ok")).select_columns(QUARANTINE_SCHEMA.names))
        quarantined = parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
        quarantined.write_parquet(storage.filesystem(storage.join(out, "quarantine"))[1], filesystem=fs)
    storage.write_text(
        storage.join(out, "task_templates.json"), json.dumps(templates.to_dict(), indent=2, ensure_ascii=False)
    )
    timings["write_s"] = time.perf_counter() - stage
    timings["total_s"] = time.perf_counter() - started
    say(
        f"[prepare] wrote {rows_written:,} rows of shards"
        + (f" and {rows_bad:,} quarantined rows" if rows_bad else "")
        + f" in {timings['write_s']:.1f} s"
    )

    if rows_in != rows_written + rows_bad:
        raise PrepareError(f"row accounting broke: {rows_in} in, {rows_written} written, {rows_bad} quarantined")
    segment_counts = np.sum([t["segment_counts"] for t in totals], axis=0) if totals else np.zeros(len(Segment), int)
    length_sum = sum(t["length_sum"] for t in totals)
    return {
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
        "quarantined_at_validation": sum(validation_reasons.values()),
        "quarantined_at_encoding": sum(encoding_reasons.values()),
        "truncated_rows": int(sum(t["truncated"] for t in totals)),
        "tokens_total": int(segment_counts.sum()),
        "tokens_by_segment": {s.name.lower(): int(segment_counts[int(s)]) for s in Segment},
        "length_mean": length_sum / rows_written if rows_written else 0.0,
        "length_max": max((t["length_max"] for t in totals), default=0),
        "user_turns": total_turns,
        "task_templates_version": templates.version,
        "task_templates": len(templates.entries),
        "inputs": inputs,
        "num_cpus": cpus,
        "rows_per_block": block_rows,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "ray_version": ray.__version__,
    }


def _reasons_text(reasons: Counter) -> str:
    return ", ".join(f"{reason}: {count:,}" for reason, count in sorted(reasons.items()))


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
