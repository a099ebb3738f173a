"""Parsing LLaVA and messages records, and one test per validation reason code."""

from __future__ import annotations

import pickle

import pytest

from workloads.conversations import Conversation, ConversationError, Turn, parse_llava, parse_messages, parse_record


def llava(conversations, image="cat.jpg", **extra):
    record = {"id": "row-7", "conversations": conversations, **extra}
    if image is not None:
        record["image"] = image
    return record


def human(text):
    return {"from": "human", "value": text}


def gpt(text):
    return {"from": "gpt", "value": text}


def test_llava_single_image():
    conv = parse_record(llava([human("<image>\nWhat is it?"), gpt("A cat."), human("Color?"), gpt("Black.")]))
    assert conv == Conversation(
        id="row-7",
        turns=(
            Turn("user", "<image>\nWhat is it?"),
            Turn("assistant", "A cat."),
            Turn("user", "Color?"),
            Turn("assistant", "Black."),
        ),
        images=("cat.jpg",),
        system=None,
    )


def test_llava_text_only_and_numeric_id_and_extra_keys():
    record = {"id": 12, "conversations": [human("Hi"), gpt("Hello")], "source": "sharegpt", "extra": [1, 2]}
    conv = parse_llava(record)
    assert conv.id == "12" and conv.images == () and len(conv.turns) == 2


def test_llava_image_list():
    conv = parse_record(llava([human("<image> and <image>: same?"), gpt("No.")], image=["a.jpg", "b.jpg"]))
    assert conv.images == ("a.jpg", "b.jpg")


def test_llava_one_image_without_placeholder_gets_one_prepended():
    conv = parse_record(llava([human("What is it?"), gpt("A cat."), human("Sure?"), gpt("Yes.")]))
    assert conv.turns[0].text == "<image>\nWhat is it?"
    assert conv.turns[2].text == "Sure?"


def test_llava_leading_system_turn():
    conv = parse_record(llava([{"from": "system", "value": "Be brief."}, human("<image>Hi"), gpt("Hello")]))
    assert conv.system == "Be brief." and conv.turns[0].role == "user"


def test_messages_string_content_and_system():
    record = {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "<image>What is it?"},
            {"role": "assistant", "content": "A dog."},
        ],
        "images": ["dog.png"],
        "id": "m1",
    }
    conv = parse_messages(record)
    assert conv.system == "You are terse."
    assert conv.turns == (Turn("user", "<image>What is it?"), Turn("assistant", "A dog."))
    assert conv.images == ("dog.png",)


def test_messages_parts_become_text_with_placeholders():
    record = {
        "id": "m2",
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A dog."}]},
        ],
        "images": ["dog.png"],
    }
    conv = parse_record(record)
    assert conv.turns[0].text == "<image>\nWhat is it?"
    assert conv.turns[1].text == "A dog."


def test_messages_inline_image_paths_when_no_images_key():
    record = {
        "id": "m3",
        "messages": [
            {"role": "user", "content": [{"type": "image", "image": "x.jpg"}, {"type": "text", "text": "Hi"}]},
            {"role": "assistant", "content": "Hello"},
        ],
    }
    assert parse_record(record).images == ("x.jpg",)


def test_missing_id_gets_stable_hash_or_default():
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    first, second = parse_record(record), parse_record(dict(record))
    assert first.id == second.id and first.id.startswith("sha1:")
    assert parse_record(record, default_id="line-3").id == "line-3"


def test_error_pickles_with_reason():
    error = ConversationError("empty_turn", "row 'x': empty")
    restored = pickle.loads(pickle.dumps(error))
    assert restored.reason == "empty_turn" and str(restored) == "row 'x': empty"


def reason_of(record, fmt="auto"):
    with pytest.raises(ConversationError) as info:
        parse_record(record, fmt)
    assert "row-7" in str(info.value) or "r9" in str(info.value), "the message names the row"
    return info.value.reason


def test_reason_missing_field():
    assert reason_of({"id": "row-7", "image": "a.jpg"}) == "missing_field"
    assert reason_of(llava([{"from": "human"}, gpt("x")])) == "missing_field"


def test_reason_bad_type():
    assert reason_of(llava("not a list")) == "bad_type"
    assert reason_of(llava([human("<image>Hi"), gpt("x")], image=3)) == "bad_type"
    assert reason_of(llava([human(["Hi"]), gpt("x")])) == "bad_type"


def test_reason_empty_conversation():
    assert reason_of(llava([])) == "empty_conversation"
    assert reason_of(llava([{"from": "system", "value": "hi"}])) == "empty_conversation"


def test_reason_unknown_role():
    assert reason_of(llava([{"from": "robot", "value": "beep"}, gpt("x")])) == "unknown_role"


def test_reason_wrong_role_order():
    assert reason_of(llava([gpt("x"), human("<image>Hi")])) == "wrong_role_order"
    assert reason_of(llava([human("<image>Hi"), human("again"), gpt("x")])) == "wrong_role_order"
    assert reason_of(llava([human("<image>Hi"), gpt("x"), human("dangling")])) == "wrong_role_order"
    late_system = llava([human("<image>Hi"), {"from": "system", "value": "s"}, gpt("x")])
    assert reason_of(late_system) == "wrong_role_order"


def test_reason_empty_turn():
    assert reason_of(llava([human("<image>Hi"), gpt("  \n")])) == "empty_turn"


def test_reason_image_placeholder_mismatch():
    assert reason_of(llava([human("<image><image>Hi"), gpt("x")])) == "image_placeholder_mismatch"
    assert reason_of(llava([human("Hi"), gpt("x")], image=["a.jpg", "b.jpg"])) == "image_placeholder_mismatch"
    assert reason_of(llava([human("<image>Hi"), gpt("x")], image=None)) == "image_placeholder_mismatch"


def test_reason_image_in_response():
    assert reason_of(llava([human("<image>Hi"), gpt("look: <image>")])) == "image_in_response"


def test_messages_errors_name_the_row():
    record = {"id": "r9", "messages": [{"role": "user", "content": "Hi"}, {"role": "critic", "content": "x"}]}
    assert reason_of(record, "messages") == "unknown_role"
    record = {
        "id": "r9",
        "messages": [{"role": "user", "content": [{"type": "audio"}]}, {"role": "assistant", "content": "x"}],
    }
    assert reason_of(record) == "bad_type"


def test_unknown_format_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown conversation format"):
        parse_record({"conversations": []}, fmt="csv")
