"""Validation of raw records: parse, check, normalize, and give every bad row a reason.

This is the gate of preparation. A record that passes comes out as columns
(`turns` alternating user/assistant, `images`, `system`, and the instruction
`sentences` for the task-template statistics), so no later stage parses JSON
again; one that fails keeps its raw text, a reason and a message naming the
row, and ends in the quarantine. The per-block summaries (rows, bad rows by
reason, user turns) are what the driver adds up for the manifest.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc

from orchestrator.images import ImageChecker

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


DEFAULT_MAX_ROW_BYTES = 1_048_576
QUARANTINED_RAW_CHARS = 10_000
"""Raw text kept in the quarantine of a row too large to use (its start, enough to find it)."""


def validate_rows(
    batch: pa.Table,
    fmt: str,
    image_root: str | None,
    check_images: str | bool,
    image_filesystem=None,
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES,
) -> pa.Table:
    """Ray Data stage: parse each raw record, check its images, normalize it; bad rows get a reason.

    Output: VALIDATED_SCHEMA. Good rows carry the conversation as columns
    (`turns` alternate user/assistant, `images`, `system`) so later stages
    never parse JSON again; every row keeps its raw text for the quarantine.
    It never raises for a row: whatever one row does (deep nesting, lone
    surrogates, odd paths) ends as that row's reason.
    """
    checker = ImageChecker(image_root, check_images, image_filesystem)
    parsed = _parse_records(batch, fmt, max_row_bytes)
    if checker.check_images and checker.s3:
        checker.prefetch([image for _, c in parsed if not isinstance(c, Exception) for image in c.images])

    columns: dict[str, list] = {name: [] for name in ("id", "ok", "reason", "message", "turns", "images", "system")}
    columns["sentences"] = []
    for row_id, conversation in parsed:
        row_id, problem, fields = _validated_row(checker, row_id, conversation)
        columns["id"].append(row_id)
        columns["ok"].append(problem is None)
        columns["reason"].append(problem[0] if problem else "")
        columns["message"].append(_text(problem[1]) if problem else "")
        for name, value in zip(("turns", "images", "system", "sentences"), fields):
            columns[name].append(value)
    raw = batch.column("raw")
    too_large = pc.greater(pc.binary_length(raw), max_row_bytes)
    if pc.any(too_large).as_py():
        raw = pc.if_else(too_large, pc.utf8_slice_codeunits(raw, 0, QUARANTINED_RAW_CHARS), raw)
    return _validated_table(batch.set_column(batch.column_names.index("raw"), "raw", raw), columns)


_NO_FIELDS = ([], [], None, [])


def _validated_row(checker: ImageChecker, row_id: str, conversation) -> tuple[str, tuple | None, tuple]:
    """(row id, (reason, message) or None, (turns, images, system, sentences)) of one parsed record."""
    from workloads.task_templates import instruction_sentences

    row_id = _text(row_id)
    if isinstance(conversation, Exception):
        return row_id, (conversation.reason, str(conversation)), _NO_FIELDS
    try:
        row_id = _text(conversation.id)
        problem = _unicode_problem(conversation) or _image_problem(checker, conversation)
        if problem:
            return row_id, problem, _NO_FIELDS
        fields = ([t.text for t in conversation.turns], list(conversation.images), conversation.system)
        return row_id, None, (*fields, instruction_sentences(conversation))
    except Exception as error:  # noqa: BLE001 - a row that breaks a check is that row's problem, not the stage's
        problem = ("invalid_row", f"row {row_id!r}: can't be validated: {type(error).__name__}: {error}")
        return row_id, problem, _NO_FIELDS


def _text(value: str) -> str:
    """`value` as text Arrow can store (lone surrogates from JSON escapes replaced)."""
    if value.isascii():
        return value
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return value.encode("utf-8", "replace").decode("utf-8")


def _unicode_problem(conversation) -> tuple[str, str] | None:
    """(invalid_text, message) when a turn, image path or system prompt holds a lone surrogate (a JSON
    escape like \\ud800 that is no character): it can't be stored, tokenized or opened."""
    strings = [t.text for t in conversation.turns] + list(conversation.images) + [conversation.system or ""]
    for text in strings:
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as error:
                return ("invalid_text", f"row {_text(conversation.id)!r}: text that is not Unicode: {error}")
    return None


def _parse_records(batch: pa.Table, fmt: str, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> list[tuple[str, object]]:
    """(row id, `Conversation` or `ConversationError`) per raw record, read errors included."""
    from workloads.conversations import ConversationError

    sources = batch.column("source").to_pylist()
    lines = batch.column("line").to_pylist()
    raws = batch.column("raw").to_pylist()
    errors = batch.column("error").to_pylist() if "error" in batch.column_names else [None] * len(raws)
    sizes = pc.binary_length(batch.column("raw")).to_pylist()
    parsed: list[tuple[str, object]] = []
    for source, line, raw, read_error, size in zip(sources, lines, raws, errors, sizes):
        default_id = f"{os.path.basename(source)}:{line}"
        if read_error:
            reason, _, message = read_error.partition("|")
            parsed.append((default_id, ConversationError(reason, message)))
        elif (size or 0) > max_row_bytes:
            message = f"{default_id}: {size:,} bytes, above data.max_row_bytes={max_row_bytes:,}"
            parsed.append((default_id, ConversationError("row_too_large", message)))
        else:
            parsed.append(_parse_one(raw or "", fmt, default_id))
    return parsed


def _parse_one(raw: str, fmt: str, default_id: str) -> tuple[str, object]:
    from workloads.conversations import ConversationError, parse_record

    try:
        record = json.loads(raw)
    except (ValueError, RecursionError) as error:  # JSONDecodeError, a 5,000-digit number, deep nesting
        return default_id, ConversationError("malformed_json", f"{default_id}: not valid JSON: {error}")
    row_id = default_id
    try:
        if isinstance(record, dict) and record.get("id") is not None:
            row_id = str(record["id"])
        return row_id, parse_record(record, fmt, default_id=default_id)
    except ConversationError as error:
        return row_id, error
    except Exception as error:  # noqa: BLE001 - an odd record is a bad row, never a failed stage
        return row_id, ConversationError("invalid_row", f"row {row_id!r}: {type(error).__name__}: {error}")


def _image_problem(checker: ImageChecker, conversation) -> tuple[str, str] | None:
    """(reason, message naming the row) for the first unusable image of a parsed conversation."""
    for image in conversation.images:
        problem = checker.check(image)
        if problem:
            return (problem[0], f"row {conversation.id!r}: {problem[1]}")
    return None


def _validated_table(batch: pa.Table, columns: dict[str, list]) -> pa.Table:
    string_list = pa.list_(pa.string())
    return pa.table(
        {
            "id": pa.array(columns["id"], pa.string()),
            "source": batch.column("source"),
            "line": batch.column("line"),
            "raw": batch.column("raw"),
            "ok": pa.array(columns["ok"], pa.bool_()),
            "reason": pa.array(columns["reason"], pa.string()),
            "message": pa.array(columns["message"], pa.string()),
            "turns": pa.array(columns["turns"], string_list),
            "images": pa.array(columns["images"], string_list),
            "system": pa.array(columns["system"], pa.string()),
            "sentences": pa.array(columns["sentences"], string_list),
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
    """Bad rows (`ok` false) of a block by reason."""
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


def total_reasons(summaries: list[dict]) -> Counter:
    """Bad rows by reason over all blocks, from their summaries (`_validation_summary`, `_encoding_summary`)."""
    reasons: Counter = Counter()
    for summary in summaries:
        reasons.update(summary["reasons"])
    return reasons


def reasons_text(reasons: Counter) -> str:
    """`reason: count, ...` in reason order, for progress lines."""
    return ", ".join(f"{reason}: {count:,}" for reason, count in sorted(reasons.items()))


# ---------------------------------------------------------------- duplicate ids
# Validation runs block by block, so ids repeated across blocks are found in one global pass over the small
# `id` column of the good rows (a few MB for LLaVA-665K), counted on the driver.


def _good_ids(batch: pa.Table) -> pa.Table:
    return pa.table({"id": batch.filter(batch.column("ok")).column("id")})


def duplicate_ids(ds, num_cpus: float) -> dict[str, int]:
    """{id: occurrences} of the ids that more than one good row of the validated dataset `ds` carries."""
    import ray

    refs = ds.map_batches(_good_ids, batch_size=None, batch_format="pyarrow", num_cpus=num_cpus).to_arrow_refs()
    tables = [table for table in ray.get(refs) if table.num_rows]
    if not tables:
        return {}
    counts = pc.value_counts(pa.concat_tables(tables).column("id").combine_chunks())
    values, occurrences = counts.field("values"), counts.field("counts")
    repeated = pc.greater(occurrences, 1)
    return dict(zip(values.filter(repeated).to_pylist(), occurrences.filter(repeated).to_pylist()))


def _occurrences(batch: pa.Table, ids: list[str]) -> pa.Table:
    keep = pc.and_(batch.column("ok"), pc.is_in(batch.column("id"), value_set=pa.array(ids, pa.string())))
    return batch.filter(keep).select(["id", "source", "line"])


def first_occurrences(ds, ids, files: list[str], num_cpus: float) -> dict[str, list]:
    """{id: [source, line]} of the first good row (in `files` order, then line order) carrying each of `ids`."""
    import ray

    refs = ds.map_batches(
        _occurrences, fn_kwargs={"ids": list(ids)}, batch_size=None, batch_format="pyarrow", num_cpus=num_cpus
    ).to_arrow_refs()
    rank = {source: i for i, source in enumerate(files)}
    first: dict[str, tuple] = {}
    for table in ray.get(refs):
        for row_id, source, line in zip(*(table.column(c).to_pylist() for c in ("id", "source", "line"))):
            key = (rank.get(source, len(rank)), source, line)
            if row_id not in first or key < first[row_id]:
                first[row_id] = key
    return {row_id: [source, line] for row_id, (_, source, line) in first.items()}


def mark_duplicates(batch: pa.Table, first: dict[str, list]) -> pa.Table:
    """Ray Data stage: a good row whose id a row before it carries becomes bad (`duplicate_id`)."""
    rows = zip(*(batch.column(c).to_pylist() for c in ("ok", "id", "source", "line")))
    duplicate = [bool(ok and row_id in first and first[row_id] != [source, line]) for ok, row_id, source, line in rows]
    if not any(duplicate):
        return batch
    columns = {name: batch.column(name).to_pylist() for name in ("ok", "reason", "message", "turns", "images")}
    columns.update({name: batch.column(name).to_pylist() for name in ("id", "system", "sentences")})
    for i in (i for i, d in enumerate(duplicate) if d):
        source, line = first[columns["id"][i]]
        columns["ok"][i], columns["reason"][i] = False, "duplicate_id"
        columns["message"][i] = (
            f"row {columns['id'][i]!r}: duplicate id, first at {os.path.basename(source)}:{line} "
            "(data.duplicate_ids=quarantine)"
        )
        columns["turns"][i], columns["images"][i], columns["system"][i], columns["sentences"][i] = [], [], None, []
    return _validated_table(batch, columns)


def duplicate_report(counts: dict[str, int], mode: str) -> tuple[dict, str | None]:
    """(the manifest's `duplicate_ids`, a warning naming a few of them or None) for `duplicate_ids` counts."""
    extra = sum(counts.values()) - len(counts)
    examples = [row_id[:80] for row_id in sorted(counts, key=lambda k: (-counts[k], k))[:5]]
    summary = {"mode": mode, "ids": len(counts), "extra_rows": extra, "examples": examples}
    if not counts:
        return summary, None
    done = "quarantined as duplicate_id" if mode == "quarantine" else "kept: data.duplicate_ids=quarantine drops them"
    return summary, (
        f"{len(counts):,} ids are carried by more than one row ({extra:,} rows beyond the first, {done}), "
        f"e.g. {', '.join(map(repr, examples))}"
    )
