"""Reading, validation, template counting and encoding as Ray Data calls them, without starting Ray."""

import json
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from orchestrator.encoding import ENCODED_SCHEMA, encode_rows
from orchestrator.images import check_image
from orchestrator.prepare import preparation_key
from orchestrator.readers import rows_per_block, split_files
from orchestrator.template_stats import sentence_counts
from orchestrator.validation import VALIDATED_SCHEMA, conversations_of, validate_rows


def _batch(lines, source="data.jsonl", errors=None):
    return pa.table(
        {
            "source": pa.array([source] * len(lines), pa.string()),
            "line": pa.array(np.arange(1, len(lines) + 1), pa.int64()),
            "raw": pa.array(lines, pa.string()),
            "error": pa.array(errors or [None] * len(lines), pa.string()),
        }
    )


def _llava(row_id, image=None, turns=(("human", "<image>\nWhat color?"), ("gpt", "Red"))):
    record = {"id": row_id, "conversations": [{"from": f, "value": v} for f, v in turns]}
    if image is not None:
        record["image"] = image
    return json.dumps(record)


def _split(path, data: bytes) -> pa.Table:
    tables = list(split_files(pa.table({"path": [path], "bytes": pa.array([data], pa.binary())}), sources={}))
    return pa.concat_tables(tables)


@pytest.fixture()
def image_root(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(root / "ok.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    (tmp_path / "outside.png").write_bytes((root / "ok.png").read_bytes())
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    return root


def test_each_bad_row_gets_its_own_reason(image_root):
    lines = [
        _llava("good", "ok.png"),
        '{"id": "broken", "conversations": [',
        _llava("missing", "nope.png"),
        _llava("escape", "../outside.png"),
        _llava("passwd", "../../etc/passwd"),
        _llava("absolute", "/etc/passwd"),
        _llava("symlink", "link.png"),
        _llava("corrupt", "corrupt.png"),
        _llava("order", "ok.png", turns=(("gpt", "Red"), ("human", "<image>\nWhat color?"))),
        _llava("empty", "ok.png", turns=()),
        _llava("placeholders", "ok.png", turns=(("human", "<image>\n<image>\nWhat color?"), ("gpt", "Red"))),
        "[1, 2, 3]",
    ]
    out = validate_rows(_batch(lines), fmt="auto", image_root=str(image_root), check_images=True)
    assert out.schema == VALIDATED_SCHEMA
    out = out.to_pydict()
    reasons = dict(zip(out["id"], out["reason"]))
    assert reasons == {
        "good": "",
        "data.jsonl:2": "malformed_json",
        "missing": "missing_image",
        "escape": "image_outside_root",
        "passwd": "image_outside_root",
        "absolute": "image_outside_root",
        "symlink": "image_outside_root",
        "corrupt": "corrupt_image",
        "order": "wrong_role_order",
        "empty": "empty_conversation",
        "placeholders": "image_placeholder_mismatch",
        "data.jsonl:12": "bad_type",
    }
    assert out["ok"] == [True] + [False] * 11
    for row_id, message in zip(out["id"][1:], out["message"][1:]):
        assert row_id in message, "every message names its row"
    assert out["raw"] == lines, "every row keeps its raw text for the quarantine"
    assert out["turns"][0] == ["<image>\nWhat color?", "Red"] and out["images"][0] == ["ok.png"]
    assert all(turns == [] for turns in out["turns"][1:]), "bad rows carry no conversation"


def test_without_image_checks_paths_need_not_exist_but_must_stay_inside(tmp_path):
    lines = [
        _llava("absent", "images/never-written.png"),
        _llava("escape", "../secrets.png"),
        _llava("absolute", "/etc/passwd"),
        _llava("url", "s3://other-bucket/x.png"),
        _llava("inner-dots", "images/../images/x.png"),
    ]
    for root in (str(tmp_path), None):
        out = validate_rows(_batch(lines), fmt="auto", image_root=root, check_images=False).to_pydict()
        assert dict(zip(out["id"], out["reason"])) == {
            "absent": "",
            "escape": "image_outside_root",
            "absolute": "image_outside_root",
            "url": "image_outside_root",
            "inner-dots": "",
        }


def test_messages_format_and_read_errors_are_validated():
    messages = {
        "id": "m1",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": "A circle."},
        ],
        "images": ["a.png"],
    }
    lines = [json.dumps(messages), "", _llava("text-only", turns=(("human", "Why?"), ("gpt", "Because.")))]
    errors = [None, "malformed_json|data.jsonl:2: not valid UTF-8: boom", None]
    out = validate_rows(_batch(lines, errors=errors), fmt="auto", image_root=None, check_images=False).to_pydict()
    assert out["reason"] == ["", "malformed_json", ""]
    assert out["turns"][0] == ["<image>\nWhat is it?", "A circle."]
    assert out["system"][0] == "Be brief." and out["images"][0] == ["a.png"]
    assert "UTF-8" in out["message"][1]
    strict = validate_rows(_batch([json.dumps(messages)]), fmt="llava", image_root=None, check_images=False)
    assert strict.column("reason").to_pylist() == ["missing_field"], "format=llava refuses a messages row"


def test_check_image_accepts_a_good_image(image_root):
    assert check_image("ok.png", str(image_root)) is None
    assert check_image("ok.png", None)[0] == "no_image_root"


def test_jsonl_split_keeps_line_numbers_and_flags_bad_utf8():
    data = b'\xef\xbb\xbf{"a": 1}\r\n\n   \n{"b": 2}\n\xff\xfe not utf8\n{"c": 3}'
    table = _split("/x/data.jsonl", data).to_pydict()
    assert table["line"] == [1, 4, 5, 6]
    assert table["raw"][0] == '{"a": 1}' and table["raw"][1] == '{"b": 2}'
    assert table["error"][0] is None and table["error"][2].startswith("malformed_json|")
    assert table["source"] == ["/x/data.jsonl"] * 4


def test_json_array_split_cuts_records_as_written():
    records = [{"id": "a", "x": [1, 2, {"y": "]"}]}, {"id": "b", "s": "a, b"}]
    text = "[\n  " + ",\n  ".join(json.dumps(r) for r in records) + "\n]\n"
    table = _split("/x/data.json", text.encode()).to_pydict()
    assert [json.loads(r) for r in table["raw"]] == records
    assert table["line"] == [1, 2] and table["error"] == [None, None]

    single = _split("/x/one.json", json.dumps(records[0]).encode()).to_pydict()
    assert single["raw"] == [json.dumps(records[0])]
    assert _split("/x/empty.json", b"[]").num_rows == 0

    trailing = _split("/x/trailing.json", b'[{"id": "a"}] {"id": "b"}').to_pydict()
    assert trailing["error"][0] is None and "extra data" in trailing["error"][1]
    assert _split("/x/comma.json", b'[{"id": "a"},]').column("error").to_pylist()[1].startswith("malformed_json|")

    broken = _split("/x/broken.json", b'[{"id": "a"}, {"id": "b", oops}, {"id": "c"}]').to_pydict()
    assert broken["line"] == [1, 2] and broken["error"][0] is None
    assert broken["error"][1].startswith("malformed_json|") and "record 2" in broken["error"][1]


def test_parquet_split_numbers_rows(tmp_path):
    rows = [json.loads(_llava(f"p{i}", "ok.png")) for i in range(5)]
    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)
    table = _split(str(path), path.read_bytes()).to_pydict()
    assert table["line"] == [1, 2, 3, 4, 5]
    assert [json.loads(r)["id"] for r in table["raw"]] == [f"p{i}" for i in range(5)]
    out = validate_rows(pa.table({k: table[k] for k in ("source", "line", "raw", "error")}), "auto", None, False)
    assert out.column("ok").to_pylist() == [True] * 5
    assert (
        _split(str(tmp_path / "bad.parquet"), b"not parquet")
        .column("error")[0]
        .as_py()
        .startswith("malformed_parquet|")
    )


def test_sentence_counts_match_the_single_process_statistics(synthetic_data):
    from workloads.conversations import parse_record
    from workloads.task_templates import count_sentences

    lines = synthetic_data.train_file.read_text().splitlines()
    validated = validate_rows(_batch(lines), "auto", None, False)
    table = sentence_counts(validated)
    counts, _ = count_sentences(parse_record(json.loads(line)) for line in lines)
    assert dict(zip(table.column("sentence").to_pylist(), table.column("count").to_pylist())) == dict(counts)
    assert [c.turns for c in conversations_of(validated)] == [parse_record(json.loads(x)).turns for x in lines]


def _encode_spec(model_dir, max_length):
    from transformers import AutoConfig

    from workloads.model import num_image_tokens

    return {
        "template": "vicuna_v1",
        "num_image_tokens": num_image_tokens(AutoConfig.from_pretrained(model_dir)),
        "max_length": max_length,
        "task_templates": (),
    }


def test_encode_rows_rejects_rows_with_no_trained_token(tiny_model_dir):
    from workloads.segment_codes import Segment

    long_question = "<image>\n" + " ".join(["What color is the shape?"] * 30)
    lines = [_llava("short", "ok.png"), _llava("long", "ok.png", turns=(("human", long_question), ("gpt", "Red")))]
    validated = validate_rows(_batch(lines), "auto", None, False)
    table = encode_rows(validated, model_dir=tiny_model_dir, spec_kwargs=_encode_spec(tiny_model_dir, 64))
    assert table.schema == ENCODED_SCHEMA
    short, long = table.to_pylist()
    assert short["ok"] and short["length"] == len(short["input_ids"]) == len(short["segments"]) <= 64
    assert short["images"] == ["ok.png"] and Segment.RESPONSE in short["segments"]
    assert short["raw"] == "", "good rows do not carry their raw text further"
    assert not long["ok"] and long["reason"] == "no_trained_tokens" and "long" in long["message"]
    assert long["raw"] == lines[1] and long["input_ids"] == []


def test_encode_rows_matches_encode_conversations(tiny_model_dir, synthetic_data):
    from transformers import AutoTokenizer

    from workloads.segments import EncodeSpec, encode_conversations

    lines = synthetic_data.train_file.read_text().splitlines()[:50]
    validated = validate_rows(_batch(lines), "auto", None, False)
    spec = _encode_spec(tiny_model_dir, 128)
    table = encode_rows(validated, model_dir=tiny_model_dir, spec_kwargs=spec)
    expected = encode_conversations(
        conversations_of(validated), AutoTokenizer.from_pretrained(tiny_model_dir), EncodeSpec(**spec)
    )
    for row, exact in zip(table.to_pylist(), expected):
        assert row["input_ids"] == exact.input_ids.tolist() and row["segments"] == exact.segments.tolist()
        assert row["length"] == len(exact.input_ids) and row["truncated"] == exact.truncated


def test_preparation_key_tracks_what_determines_the_output(tmp_path, tiny_model_dir):
    from conftest import experiment_config

    data = tmp_path / "d.jsonl"
    data.write_text(_llava("a") + "\n")
    base = {"sources": [str(data)], "synthetic": None}
    key = lambda **d: preparation_key(experiment_config(tmp_path, data={**base, **d}), [str(data)], tiny_model_dir)  # noqa: E731
    assert key() == key(max_bad_fraction=0.5), "the bad-row limit judges the output, it does not change it"
    assert key() != key(check_images=False)
    assert key() != key(max_length=64)
    assert key() != key(chat_template="qwen2")
    before = key()
    data.write_text(_llava("a") + "\n" + _llava("b") + "\n")
    assert key() != before, "changed data, new folder"


def test_rows_per_block_spreads_one_big_file(tmp_path):
    small = tmp_path / "small.jsonl"
    small.write_text(_llava("a") + "\n")
    assert rows_per_block([str(small)], 2) == 512
    big = tmp_path / "big.jsonl"
    with open(big, "wb") as handle:
        handle.truncate(170_000_000)  # LLaVA-665K-sized JSONL of short rows
    assert rows_per_block([str(big)], 2) == 16384
    assert rows_per_block([str(big)], 64) < 16384


def test_s3_filesystem_carries_the_endpoint_but_never_the_keys(monkeypatch):
    """Ray Tune pickles the storage filesystem into tuner.pkl on the storage path: keys must not ride along."""
    from orchestrator import storage

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:5999")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    fs, path = storage.filesystem("s3://bucket/prefix/")
    assert path == "bucket/prefix"
    options = fs.__reduce__()[1][0]
    assert options["endpoint_override"] == "127.0.0.1:5999" and options["scheme"] == "http"
    assert options["region"] == "us-east-1"
    assert not options.get("access_key") and not options.get("secret_key")
    pickled = pickle.dumps(fs)
    assert b"testing-secret" not in pickled and b"testing-key" not in pickled
    assert pickle.loads(pickled).__reduce__()[1][0]["endpoint_override"] == "127.0.0.1:5999"
