"""A LLaVA JSONL file that mixes good rows with every kind of bad row l2t must quarantine (tests only).

`write_mixed_file(folder)` writes `images/` (the image root, with good,
broken and escaping images), `outside/` (files the data points at but must
never be read) and `mixed.jsonl`, and returns a `MixedFile` that says, for
every bad row, the quarantine id it gets and its reason. Good rows are
interleaved with the bad ones so that bad rows sit in every block.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

QUESTION = "<image>\nWhat color is the shape?"
MAX_ROW_BYTES = 65_536
"""`data.max_row_bytes` the mixed file is meant to be prepared with (its huge row is twice that)."""


def _png(color=(200, 30, 30), size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, "PNG")
    return buffer.getvalue()


def garbage_png(size: int = 32) -> bytes:
    """A PNG whose every chunk CRC is right but whose pixel data is not zlib: `verify()` passes, decoding fails."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"not zlib " * 40) + chunk(b"IEND", b"")


def llava(row_id, image=None, turns=(("human", QUESTION), ("gpt", "Red.")), **extra) -> dict:
    record = {"id": row_id, "conversations": [{"from": f, "value": v} for f, v in turns], **extra}
    if image is not None:
        record["image"] = image
    return record


@dataclass
class MixedFile:
    path: Path
    image_root: Path
    outside: Path
    good: list[str] = field(default_factory=list)
    """Ids of the rows that must be written, in file order."""
    bad: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Quarantine id -> (kind, reason), one per bad row."""

    @property
    def kinds(self) -> set[str]:
        return {kind for kind, _ in self.bad.values()}


def _images(root: Path, outside: Path) -> None:
    root.mkdir(parents=True)
    outside.mkdir(parents=True)
    for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]):
        (root / f"ok{i}.png").write_bytes(_png(color))
    (root / "sub").mkdir()
    (root / "sub" / "deep.png").write_bytes(_png((90, 90, 90)))
    os.symlink(root / "ok0.png", root / "inner-link.png")  # a symlink that stays inside: fine
    (outside / "secret.png").write_bytes(_png((1, 2, 3)))  # decodes: only confinement keeps it out
    os.symlink(outside / "secret.png", root / "escape-link.png")
    os.symlink(outside, root / "escape-dir")
    (root / "garbage.png").write_bytes(garbage_png())
    full = _png((10, 20, 30), size=64)
    (root / "truncated.png").write_bytes(full[: len(full) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_text("this is not an image\n")
    (root / "folder.png").mkdir()
    os.symlink("loop.png", root / "loop.png")


SURROGATE_ROW = (
    b'{"id": "surrogate", "image": "ok0.png", "conversations": [{"from": "human", "value": "<image>\\nWhat \\ud800?"}, '
    b'{"from": "gpt", "value": "Red."}]}'
)
HUGE_ROW = json.dumps(llava("huge", "ok0.png", turns=(("human", QUESTION), ("gpt", "x" * 2 * MAX_ROW_BYTES)))).encode()
EXPLICIT_IDS = {"lone_surrogate": "surrogate"}
"""Kinds written as raw bytes whose quarantine id is their record's id (else `file:line`)."""


def _bad_records() -> list[tuple[str, str, object]]:
    """(kind, reason, the record: a dict/list/str for json.dumps, or bytes for the raw line)."""
    two_turns = (("human", "<image>\n<image>\nWhat color?"), ("gpt", "Red."))
    long_question = "<image>\n" + " ".join(["Describe every detail of the shape and its color."] * 200)
    return [
        ("invalid_utf8", "malformed_json", b'{"id": "utf8", "conversations": "\xff\xfe\xfd"}'),
        ("nul_in_path", "invalid_image_path", llava("nul", "ok0.png\x00.txt")),
        ("newline_in_path", "invalid_image_path", llava("newline", "ok0\n.png")),
        ("empty_path", "invalid_image_path", llava("empty-path", "")),
        ("garbage_png", "corrupt_image", llava("garbage", "garbage.png")),
        ("truncated_png", "corrupt_image", llava("truncated", "truncated.png")),
        ("empty_file", "corrupt_image", llava("empty-file", "empty.png")),
        ("not_an_image", "corrupt_image", llava("text", "text.png")),
        ("symlink_escape", "image_outside_root", llava("link-escape", "escape-link.png")),
        ("symlinked_dir_escape", "image_outside_root", llava("dir-escape", "escape-dir/secret.png")),
        ("symlink_loop", "invalid_image_path", llava("loop", "loop.png")),
        ("absolute_path", "image_outside_root", llava("absolute", "/etc/passwd")),
        ("dotdot_path", "image_outside_root", llava("dotdot", "../outside/secret.png")),
        ("url_path", "image_outside_root", llava("url", "http://example.com/x.png")),
        ("missing_image", "missing_image", llava("missing", "nope.png")),
        ("image_is_a_folder", "missing_image", llava("folder", "folder.png")),
        (
            "wrong_role_order",
            "wrong_role_order",
            llava("order", "ok0.png", turns=(("gpt", "Red."), ("human", QUESTION))),
        ),
        ("no_assistant_turn", "wrong_role_order", llava("no-answer", "ok0.png", turns=(("human", QUESTION),))),
        (
            "system_not_first",
            "wrong_role_order",
            llava("system-late", "ok0.png", turns=(("human", QUESTION), ("system", "Be brief."), ("gpt", "Red."))),
        ),
        ("empty_turns", "empty_conversation", llava("no-turns", "ok0.png", turns=())),
        ("blank_turn", "empty_turn", llava("blank", "ok0.png", turns=(("human", QUESTION), ("gpt", "   ")))),
        ("placeholder_count", "image_placeholder_mismatch", llava("placeholders", "ok0.png", turns=two_turns)),
        (
            "image_in_response",
            "image_in_response",
            llava("image-reply", "ok0.png", turns=(("human", QUESTION), ("gpt", "<image> Red."))),
        ),
        ("unknown_role", "unknown_role", llava("role", "ok0.png", turns=(("human", QUESTION), ("robot", "Red.")))),
        ("missing_conversations", "missing_field", {"id": "no-conversations", "image": "ok0.png"}),
        ("conversations_not_a_list", "bad_type", {"id": "not-list", "conversations": "hello"}),
        ("turn_not_an_object", "bad_type", {"id": "turn-type", "conversations": ["hello", "there"]}),
        ("value_not_a_string", "bad_type", llava("value-type", "ok0.png", turns=(("human", QUESTION), ("gpt", 42)))),
        ("image_not_a_string", "bad_type", llava("image-type", 7)),
        ("non_dict_json", "bad_type", "just a string"),
        ("json_array_in_jsonl", "bad_type", [llava("in-array-1", "ok0.png"), llava("in-array-2", "ok1.png")]),
        ("null_json", "bad_type", None),
        ("truncated_json", "malformed_json", b'{"id": "cut", "conversations": [{"from": "human"'),
        ("raw_nul_byte", "malformed_json", b'{"id": "nul-byte",\x00 "conversations": []}'),
        ("deep_nesting", "malformed_json", b"[" * 5000 + b"]" * 5000),
        ("huge_integer", "malformed_json", b'{"id": ' + b"9" * 5000 + b', "conversations": []}'),
        ("lone_surrogate", "invalid_text", SURROGATE_ROW),
        ("huge_row", "row_too_large", HUGE_ROW),
        (
            "no_trained_tokens",
            "no_trained_tokens",
            llava("too-long", "ok1.png", turns=(("human", long_question), ("gpt", "Red."))),
        ),
    ]


def write_mixed_file(folder: Path, good_rows: int = 60) -> MixedFile:
    """Images, the outside folder and `mixed.jsonl`: `good_rows` good rows with every bad kind among them."""
    folder = Path(folder)
    mixed = MixedFile(folder / "mixed.jsonl", folder / "images", folder / "outside")
    _images(mixed.image_root, mixed.outside)
    good_images = ["ok0.png", "ok1.png", "ok2.png", "ok3.png", "sub/deep.png", "inner-link.png", "sub/../ok2.png"]
    good = [llava(f"good-{i}", good_images[i % len(good_images)]) for i in range(good_rows)]
    good.append(llava("text-only", turns=(("human", "Why is the sky blue?"), ("gpt", "Rayleigh scattering."))))
    good.insert(0, llava("dup-1", "ok1.png"))  # its second occurrence comes later, among the bad rows
    bad = _bad_records()
    bad.append(("duplicate_id", "duplicate_id", llava("dup-1", "ok2.png")))  # after the first dup-1
    lines: list[bytes] = []
    step = max(1, len(good) // len(bad))
    while good or bad:
        for record in good[:step]:
            lines.append(json.dumps(record).encode())
            mixed.good.append(record["id"])
        del good[:step]
        if bad:
            kind, reason, record = bad.pop(0)
            raw = record if isinstance(record, bytes) else json.dumps(record).encode()
            row_id = record.get("id") if isinstance(record, dict) else EXPLICIT_IDS.get(kind)
            key = str(row_id) if row_id is not None else f"{mixed.path.name}:{len(lines) + 1}"
            mixed.bad[key] = (kind, reason)
            lines.append(raw)
    mixed.path.write_bytes(b"\n".join(lines) + b"\n")
    return mixed


@dataclass
class RowsOut:
    """What preparation's row functions made of some files, in this process: rows in, written, quarantined."""

    rows_in: int
    written: list[str]
    quarantined: list[dict]
    """QUARANTINE_SCHEMA rows: id, source, line, reason, message, raw."""

    @property
    def reasons(self) -> dict[str, str]:
        return {row["id"]: row["reason"] for row in self.quarantined}


def encode_spec(model_dir: str, max_length: int = 128) -> dict:
    from transformers import AutoConfig

    from workloads.model import num_image_tokens

    return {
        "template": "vicuna_v1",
        "num_image_tokens": num_image_tokens(AutoConfig.from_pretrained(model_dir)),
        "max_length": max_length,
        "task_templates": (),
    }


def prepare_rows(
    files: dict[str, bytes],
    model_dir: str,
    image_root: str | None,
    check_images="decode",
    max_row_bytes: int = MAX_ROW_BYTES,
    first: dict | None = None,
) -> RowsOut:
    """`split_files` -> `validate_rows` (-> `mark_duplicates` with `first`) -> `encode_rows` on Arrow tables, no
    Ray: what each Ray Data task of `l2t data prepare` runs, on `files` ({source name: bytes})."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from orchestrator.encoding import encode_rows
    from orchestrator.readers import split_files
    from orchestrator.validation import QUARANTINE_SCHEMA, mark_duplicates, validate_rows

    batch = pa.table({"path": list(files), "bytes": pa.array(list(files.values()), pa.binary())})
    records = pa.concat_tables(list(split_files(batch, {})))
    validated = validate_rows(records, "auto", image_root, check_images, max_row_bytes=max_row_bytes)
    if first is not None:
        validated = mark_duplicates(validated, first)
    good = validated.filter(validated.column("ok"))
    encoded = encode_rows(good, model_dir=model_dir, spec_kwargs=encode_spec(model_dir))
    written = encoded.filter(encoded.column("ok"))
    quarantined = [
        table.filter(pc.invert(table.column("ok"))).select(QUARANTINE_SCHEMA.names).to_pylist()
        for table in (validated, encoded)
    ]
    return RowsOut(records.num_rows, written.column("id").to_pylist(), quarantined[0] + quarantined[1])
