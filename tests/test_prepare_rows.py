"""Row validation and encoding as Ray Data calls them, without starting Ray."""

import json

import numpy as np
import pytest
from PIL import Image

from orchestrator.prepare import check_image, encode_rows, validate_rows


def _batch(lines, source="data.jsonl"):
    return {
        "source": np.array([source] * len(lines), dtype=object),
        "line": np.arange(1, len(lines) + 1),
        "raw": np.array(lines, dtype=object),
    }


def _llava(row_id, image=None, turns=(("human", "<image>\nWhat color?"), ("gpt", "Red"))):
    record = {"id": row_id, "conversations": [{"from": f, "value": v} for f, v in turns]}
    if image is not None:
        record["image"] = image
    return json.dumps(record)


@pytest.fixture()
def image_root(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(root / "ok.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    (tmp_path / "outside.png").write_bytes((root / "ok.png").read_bytes())
    return root


def test_each_bad_row_gets_its_own_reason(image_root):
    lines = [
        _llava("good", "ok.png"),
        '{"id": "broken", "conversations": [',
        _llava("missing", "nope.png"),
        _llava("escape", "../outside.png"),
        _llava("passwd", "../../etc/passwd"),
        _llava("absolute", "/etc/passwd"),
        _llava("corrupt", "corrupt.png"),
        _llava("order", "ok.png", turns=(("gpt", "Red"), ("human", "<image>\nWhat color?"))),
        _llava("empty", "ok.png", turns=()),
    ]
    out = validate_rows(_batch(lines), fmt="auto", image_root=str(image_root), check_images=True)
    reasons = dict(zip(out["id"], out["reason"]))
    assert reasons == {
        "good": "",
        "data.jsonl:2": "malformed_json",
        "missing": "missing_image",
        "escape": "image_outside_root",
        "passwd": "image_outside_root",
        "absolute": "image_outside_root",
        "corrupt": "corrupt_image",
        "order": "wrong_role_order",
        "empty": "empty_conversation",
    }
    assert out["ok"] == [True] + [False] * 8
    for row_id, message in zip(out["id"][1:], out["message"][1:]):
        assert row_id in message, "every message names its row"
    assert out["raw"] == lines, "bad rows keep their raw text for the quarantine"


def test_check_image_accepts_a_good_image(image_root):
    assert check_image("ok.png", str(image_root)) is None
    assert check_image("ok.png", None)[0] == "no_image_root"


def test_encode_rows_rejects_rows_with_no_trained_token(tiny_model_dir):
    from transformers import AutoConfig

    from workloads.model import num_image_tokens

    long_question = "<image>\n" + " ".join(["What color is the shape?"] * 30)
    batch = _batch([_llava("short", "ok.png"), _llava("long", "ok.png", turns=(("human", long_question), ("gpt", "Red")))])
    batch["id"] = np.array(["short", "long"], dtype=object)
    spec = {
        "template": "vicuna_v1",
        "num_image_tokens": num_image_tokens(AutoConfig.from_pretrained(tiny_model_dir)),
        "max_length": 64,
        "task_templates": (),
    }
    table = encode_rows(batch, model_dir=tiny_model_dir, spec_kwargs=spec, fmt="auto").to_pylist()
    short, long = table
    assert short["ok"] and short["length"] == len(short["input_ids"]) == len(short["segments"]) <= 64
    assert short["images"] == ["ok.png"]
    assert not long["ok"] and long["reason"] == "no_trained_tokens" and "long" in long["message"]
