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


def validate_rows(
    batch: pa.Table, fmt: str, image_root: str | None, check_images: bool, image_filesystem=None
) -> pa.Table:
    """Ray Data stage: parse each raw record, check its images, normalize it; bad rows get a reason.

    Output: VALIDATED_SCHEMA. Good rows carry the conversation as columns
    (`turns` alternate user/assistant, `images`, `system`) so later stages
    never parse JSON again; every row keeps its raw text for the quarantine.
    """
    from workloads.task_templates import instruction_sentences

    checker = ImageChecker(image_root, check_images, image_filesystem)
    parsed = _parse_records(batch, fmt)
    if check_images and checker.s3:
        checker.prefetch([image for _, c in parsed if not isinstance(c, Exception) for image in c.images])

    columns: dict[str, list] = {name: [] for name in ("id", "ok", "reason", "message", "turns", "images", "system")}
    columns["sentences"] = []
    for row_id, conversation in parsed:
        if isinstance(conversation, Exception):
            problem = (conversation.reason, str(conversation))
        else:
            row_id = conversation.id
            problem = _image_problem(checker, conversation)
        columns["id"].append(row_id)
        columns["ok"].append(problem is None)
        columns["reason"].append(problem[0] if problem else "")
        columns["message"].append(problem[1] if problem else "")
        good = problem is None
        columns["turns"].append([turn.text for turn in conversation.turns] if good else [])
        columns["images"].append(list(conversation.images) if good else [])
        columns["system"].append(conversation.system if good else None)
        columns["sentences"].append(instruction_sentences(conversation) if good else [])
    return _validated_table(batch, columns)


def _parse_records(batch: pa.Table, fmt: str) -> list[tuple[str, object]]:
    """(row id, `Conversation` or `ConversationError`) per raw record, read errors included."""
    from workloads.conversations import ConversationError, parse_record

    sources = batch.column("source").to_pylist()
    lines = batch.column("line").to_pylist()
    raws = batch.column("raw").to_pylist()
    errors = batch.column("error").to_pylist() if "error" in batch.column_names else [None] * len(raws)
    parsed: list[tuple[str, object]] = []
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
    return parsed


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
