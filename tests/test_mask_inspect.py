"""Mask inspection outputs: JSON keeps every token, HTML is a standalone page with a legend."""

from __future__ import annotations

import json

import pytest

from workloads.conversations import Conversation, Turn
from workloads.mask_inspect import inspect_rows, to_html, to_json, to_rich_text
from workloads.segments import EncodeSpec, encode_conversations
from workloads.tokenizer_factory import train_tokenizer

VQA = "Answer the question using a single word or phrase."
CONV = Conversation(
    "sample-1",
    (Turn("user", "<image>\nWhat is it? " + VQA), Turn("assistant", "Cat & <b>dog</b>")),
    ("a.jpg",),
)


@pytest.fixture(scope="module", params=["byte_bpe", "sentencepiece_bpe"])
def inspected(request):
    tokenizer = train_tokenizer(["What is it? Cat and dog. " + VQA] * 30, family=request.param, vocab_size=400)
    spec = EncodeSpec("vicuna_v1", num_image_tokens=5, max_length=512, task_templates=(VQA,))
    (row,) = encode_conversations([CONV], tokenizer, spec)
    return row, inspect_rows([(CONV.id, row)], tokenizer, "l2t", 0.5, 2.0)


def test_json_keeps_every_token(inspected):
    row, rows = inspected
    data = json.loads(to_json(rows))
    assert len(data) == 1 and data[0]["id"] == "sample-1"
    tokens = data[0]["tokens"]
    assert len(tokens) == len(row.input_ids)
    assert set(tokens[0]) == {"text", "id", "segment", "weight"}
    assert sum(t["segment"] == "image" for t in tokens) == 5
    weights = {t["segment"]: t["weight"] for t in tokens}
    assert weights == {
        "system": 0.0,
        "role": 0.0,
        "image": 0.0,
        "instruction": 0.5,
        "task_template": 0.0,
        "response": 2.0,
        "end_of_turn": 2.0,
    }
    response = "".join(t["text"] for t in tokens if t["segment"] == "response")
    assert response.strip() == "Cat & <b>dog</b>"


def test_html_is_a_standalone_page_with_legend(inspected):
    _, rows = inspected
    page = to_html(rows)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<script" not in page and "http" not in page  # nothing external
    assert "Legend" in page
    for name in ("system", "role", "image", "instruction", "task_template", "response", "end_of_turn"):
        assert f"seg-{name}" in page
    assert "&lt;image&gt;×5" in page  # the image block collapsed
    assert "&lt;" in page and "<b>" not in page  # token text escaped
    assert 'title="response · weight 2' in page


def test_rich_text(inspected):
    _, rows = inspected
    text = to_rich_text(rows)
    plain = text.plain
    assert "legend:" in plain and "sample-1" in plain and "<image>×5" in plain
    assert any("dim" in str(span.style) for span in text.spans)
