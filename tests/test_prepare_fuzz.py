"""Fuzzing preparation's row functions: whatever the bytes and records, nothing raises and no row is lost.

`split_files` -> `validate_rows` -> `encode_rows` run in this process on Arrow tables, as each Ray Data
task runs them (no Ray). Every input row is written or quarantined with a reason, and the counts add up.
"""

from __future__ import annotations

import json

import pytest
from bad_rows import garbage_png, prepare_rows
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

IMAGE_NAMES = ["ok.png", "garbage.png", "missing.png", "../ok.png", "/etc/passwd", "ok.png\x00", "", "sub/../ok.png"]
ROLES = ["human", "gpt", "user", "assistant", "system", "robot", "HUMAN", ""]
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-images")
    Image.new("RGB", (32, 32), (10, 200, 10)).save(root / "ok.png")
    (root / "garbage.png").write_bytes(garbage_png())
    return str(root)


texts = st.text(max_size=40) | st.sampled_from(["<image>", "<image>\nWhat is it?", "A red circle.", "  ", "</s>"])
turns = st.lists(
    st.fixed_dictionaries({"from": st.sampled_from(ROLES) | st.text(max_size=5), "value": texts | st.integers()}),
    max_size=5,
)
ids = st.none() | st.text(max_size=12) | st.integers() | st.sampled_from(["a", "a", "b"])
images = (
    st.none() | st.sampled_from(IMAGE_NAMES) | st.text(max_size=10) | st.lists(st.sampled_from(IMAGE_NAMES), max_size=3)
)


@st.composite
def llava_records(draw):
    record = {"conversations": draw(turns | st.text(max_size=5) | st.none())}
    if (row_id := draw(ids)) is not None:
        record["id"] = row_id
    if (image := draw(images)) is not None:
        record["image"] = image
    return draw(st.sampled_from([record, [record], "text", 3, None])) if draw(st.integers(0, 9)) == 0 else record


def _check(out):
    assert out.rows_in == len(out.written) + len(out.quarantined), "every row is written or quarantined"
    assert all(row["reason"] and row["message"] and row["line"] >= 0 for row in out.quarantined)


@FUZZ
@given(records=st.lists(llava_records(), max_size=12), mode=st.sampled_from(["decode", "header", "off"]))
def test_generated_llava_rows_are_written_or_quarantined(records, mode, image_root, tiny_model_dir):
    data = "\n".join(json.dumps(r) for r in records).encode()
    out = prepare_rows({"rows.jsonl": data}, tiny_model_dir, image_root, mode)
    _check(out)
    assert out.rows_in == len(records), "one row per line"
    array = prepare_rows({"rows.json": json.dumps(records).encode()}, tiny_model_dir, image_root, mode)
    _check(array)
    assert array.rows_in == len(records)
    assert sorted(array.written) == sorted(out.written), "a JSON array and JSONL of the same records agree"


@FUZZ
@given(
    lines=st.lists(
        st.binary(max_size=60)
        | st.sampled_from([b'{"id": "x", "conversations": [{"from": "human", "value": "\\ud800"}]}', b"\xff", b"[[["]),
        max_size=10,
    ),
    suffix=st.sampled_from(["jsonl", "json", "parquet"]),
)
def test_raw_bytes_never_break_a_stage(lines, suffix, image_root, tiny_model_dir):
    out = prepare_rows({f"raw.{suffix}": b"\n".join(lines)}, tiny_model_dir, image_root)
    _check(out)
