"""Reading the configured data sources into records, the first stage of `l2t data prepare`.

Kept apart from validation and encoding because it is the only part that
knows file formats: JSONL lines, JSON array elements and Parquet rows all
become one `RAW_SCHEMA` row each (source, position, raw text, read error),
so every later stage sees one shape whatever the files were. Blocks are
re-cut to a row count (`rows_per_block`) so that one big file still spreads
over every CPU.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from orchestrator import storage

# Records as read: one row per JSONL line / JSON array element / Parquet row.
RAW_SCHEMA = pa.schema([("source", pa.string()), ("line", pa.int64()), ("raw", pa.string()), ("error", pa.string())])

# Rows per block after reading: small enough that one big file spreads over
# every CPU, large enough that per-task overhead stays negligible.
MIN_ROWS_PER_BLOCK = 512
MAX_ROWS_PER_BLOCK = 16384


class PrepareError(RuntimeError):
    """Preparation refused to go on (too many bad rows, no data).

    Defined here, with the first stage that can refuse (a source that matches
    no file), so the readers need not import the driver that imports them;
    callers catch it as `orchestrator.prepare.PrepareError`, which the driver
    raises as well.
    """


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
        rows = pq.read_table(pa.BufferReader(data)).to_pylist()
    except Exception as error:  # noqa: BLE001 - any reader failure makes the whole file unusable
        return _raw_table(source, [0], [""], [f"malformed_parquet|{source}: can't be read as Parquet: {error}"])
    raws, errors = [], []
    for number, row in enumerate(rows, start=1):
        try:
            raws.append(json.dumps(row, ensure_ascii=False, default=str))
            errors.append(None)
        except (TypeError, ValueError, RecursionError) as error:
            raws.append("")
            errors.append(f"malformed_parquet|{source}:{number}: row can't be read as a record: {error}")
    return _raw_table(source, np.arange(1, len(rows) + 1), raws, errors)


def split_files(batch: pa.Table, sources: dict[str, str]) -> Iterator[pa.Table]:
    """Ray Data stage: whole files (`path`, `bytes`) -> one row per record `{source, line, raw, error}`."""
    for path, data in zip(batch.column("path").to_pylist(), batch.column("bytes").to_pylist()):
        source = sources.get(path, path)
        split = _split_jsonl if source.endswith(".jsonl") else _split_parquet if source.endswith(".parquet") else None
        try:
            yield (split or _split_json)(source, data or b"")
        except Exception as error:  # noqa: BLE001 - a file no splitter expected is one bad row, not a dead stage
            yield _raw_table(source, [0], [""], [f"unreadable_file|{source}: can't be split into records: {error}"])


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


def local_records(files: list[str]) -> Iterator[tuple[str, int, str]]:
    """(source, line, raw JSON text) of every readable record of `files`, in this process (no Ray).

    The same splitting as `read_records`; records that can't be read are skipped (preparation
    quarantines them, callers of this only need the good ones).
    """
    for source in files:
        fs, path = storage.filesystem(source)
        with fs.open_input_file(path) as handle:
            data = handle.read()
        for table in split_files(pa.table({"path": [source], "bytes": [data]}), {}):
            for line, raw, error in zip(*(table.column(c).to_pylist() for c in ("line", "raw", "error"))):
                if error is None:
                    yield source, line, raw
