"""Sentence splitting, counting, selection and the versioned task-template file."""

from __future__ import annotations

import json

import pytest

from workloads.conversations import Conversation, Turn
from workloads.task_templates import (
    TaskTemplateList,
    count_sentences,
    instruction_sentences,
    select_task_templates,
    sentence_spans,
    split_sentences,
)

VQA = "Answer the question using a single word or phrase."


def conv(*user_texts, conv_id="c"):
    turns = []
    for text in user_texts:
        turns += [Turn("user", text), Turn("assistant", "ok")]
    return Conversation(conv_id, tuple(turns), ())


def test_split_on_punctuation_newlines_and_image():
    text = "<image>\nWhat is  the\tcolor of 3.5 cats? " + VQA + "\nReally?! Yes.Then no"
    assert split_sentences(text) == [
        "What is the color of 3.5 cats?",
        VQA,
        "Really?!",
        "Yes.Then no",
    ]


def test_split_at_image_placeholder_and_empty():
    assert split_sentences("Look<image>here.") == ["Look", "here."]
    assert split_sentences("  \n <image>\n") == []


def test_sentence_spans_point_into_the_raw_text():
    text = "  Describe   this.\n\n" + VQA + "  "
    spans = sentence_spans(text)
    assert [text[s:e] for s, e, _ in spans] == ["Describe   this.", VQA]
    assert [n for _, _, n in spans] == ["Describe this.", VQA]


def test_instruction_sentences_dedup_within_a_turn_only():
    c = conv(f"Q1? {VQA} {VQA}", f"Q2? {VQA}")
    assert instruction_sentences(c) == ["Q1?", VQA, "Q2?", VQA]


def test_count_sentences_counts_user_turns():
    counts, user_turns = count_sentences([conv(f"<image>\nA? {VQA}", f"B? {VQA}"), conv("Describe the image.")])
    assert user_turns == 3
    assert counts[VQA] == 2 and counts["A?"] == 1 and counts["Describe the image."] == 1


def test_select_top_k_and_min_share():
    counts = {VQA: 50, "Describe the image.": 20, "What is it?": 20, "Rare.": 1}
    top = select_task_templates(counts, 100, top_k=2)
    assert top.sentences() == (VQA, "Describe the image.")  # ties broken by text
    assert [e.share for e in top.entries] == [0.5, 0.2]
    frequent = select_task_templates(counts, 100, min_share=0.2)
    assert frequent.sentences() == (VQA, "Describe the image.", "What is it?")
    both = select_task_templates(counts, 100, top_k=1, min_share=0.01)
    assert both.sentences() == (VQA,)
    assert len(select_task_templates(counts, 100).entries) == 4
    assert select_task_templates({}, 0).entries == []


def test_version_is_stable_and_content_sensitive():
    counts = {VQA: 5, "B.": 3}
    first = select_task_templates(counts, 10)
    same = select_task_templates(dict(reversed(list(counts.items()))), 10)
    assert first.version == same.version and len(first.version) == 16
    assert select_task_templates({VQA: 5, "B.": 4}, 10).version != first.version
    assert select_task_templates(counts, 11).version != first.version


def test_save_load_roundtrip(tmp_path):
    original = select_task_templates({VQA: 5, "Décris l'image.": 3}, 10, top_k=5)
    path = tmp_path / "task_templates.json"
    original.save(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["format_version"] == 1 and data["total_instructions"] == 10
    assert data["version"] == original.version
    assert data["entries"][0] == {"sentence": VQA, "count": 5, "share": 0.5}
    loaded = TaskTemplateList.load(path)
    assert loaded == original and loaded.sentences() == original.sentences()


def test_load_rejects_edited_content_unless_version_removed(tmp_path):
    path = tmp_path / "t.json"
    select_task_templates({VQA: 5}, 10).save(path)
    data = json.loads(path.read_text())
    data["entries"].append({"sentence": "Extra.", "count": 1, "share": 0.1})
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="does not match"):
        TaskTemplateList.load(path)
    del data["version"]
    path.write_text(json.dumps(data))
    assert TaskTemplateList.load(path).sentences() == (VQA, "Extra.")
    data["format_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="format_version"):
        TaskTemplateList.load(path)


def test_from_sentences_normalizes():
    templates = TaskTemplateList.from_sentences(["  Answer  briefly. ", "Answer briefly."])
    assert templates.sentences() == ("Answer briefly.",)
