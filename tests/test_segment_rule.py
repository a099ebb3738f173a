"""The segment rule on the rows that showed each failure of the old key-character rule (regression).

Old rule: a token went by its first non-whitespace character (whitespace-only
tokens by their first character). It lost a reply's first token to ROLE when
byte-level BPE merged the template's "\\n" with the reply's ("\\n\\n", Qwen2's
pattern), gave the newline that starts the user's text to SYSTEM (`tokenizer`
template) or INSTRUCTION, and trained whitespace-only tokens inside the
human's text ("<image>\\n", between sentences) as INSTRUCTION. Each test below
says what the old rule gave; tests/test_segments.py checks the rule itself on
random rows.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_segments import FAMILIES, LAMBDA_A, LAMBDA_I, TASKS, comparable_runs, encode_one, make_tokenizers

from workloads.chat_templates import render
from workloads.conversations import Conversation, Turn
from workloads.segment_codes import Segment, token_weights
from workloads.segments import EncodeSpec


@pytest.fixture(scope="module")
def tokenizers() -> dict:
    return make_tokenizers()


def labelled(tokenizer, conv, template: str, task_templates=()) -> tuple[str, list[tuple[int, int, Segment]]]:
    """The rendered text and (start, end, segment) of every token of the encoded row (no system prompt)."""
    spec = EncodeSpec(template, 1, 4096, task_templates=task_templates, system_prompt="")
    row = encode_one(conv, tokenizer, spec)
    text = render(conv, template, tokenizer=tokenizer, task_templates=task_templates, system_prompt="").text
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert len(offsets) == len(row.segments)
    return text, [(a, z, Segment(int(s))) for (a, z), s in zip(offsets, row.segments)]


def token_at(tokens, position: int) -> tuple[int, int, Segment]:
    """The token whose span holds character `position`."""
    (token,) = [t for t in tokens if t[0] <= position < t[1]]
    return token


@pytest.mark.parametrize("template", ["qwen2", "tokenizer"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_reply_that_starts_with_a_newline_is_trained_from_its_first_token(tokenizers, family, template):
    """Qwen2's pattern makes "\\n\\n" one token of "assistant\\n" + "\\nA cat."; it went by its first
    character to ROLE and carried no loss in response mode. It holds the reply's first character: RESPONSE."""
    tokenizer = tokenizers[family]
    conv = Conversation("reply-nl", (Turn("user", "What is it?"), Turn("assistant", "\nA cat.")), ())
    text, tokens = labelled(tokenizer, conv, template)
    reply = text.index("\nA cat.")
    start, end, segment = token_at(tokens, reply)
    assert segment == Segment.RESPONSE
    if family == "qwen2_bpe":
        assert text[start:end] == "\n\n"  # the token that the old rule gave to ROLE
    for a, z, segment in tokens:  # every token with a reply character is trained, the template's newline before is not
        assert (segment == Segment.RESPONSE) == (a < reply + len("\nA cat.") and z > reply), text[a:z]
    weights = token_weights(np.array([s for _, _, s in tokens], dtype=np.int8), "response", LAMBDA_I, LAMBDA_A)
    assert weights[tokens.index((start, end, Segment.RESPONSE))] == np.float32(LAMBDA_A)


@pytest.mark.parametrize("template", ["qwen2", "tokenizer", "vicuna_v1"])
@pytest.mark.parametrize("family", FAMILIES)
def test_an_instruction_that_starts_with_a_newline(tokenizers, family, template):
    """The newline that starts the user's text is formatting (ROLE), never SYSTEM: the `tokenizer` template's
    text before the first message is SYSTEM, and "user\\n" + "\\n" made a "\\n\\n" token that went to SYSTEM
    by its first character (byte_bpe's lone "\\n" went to INSTRUCTION). Its first word is INSTRUCTION."""
    tokenizer = tokenizers[family]
    conv = Conversation("instr-nl", (Turn("user", "\nWhat is it?"), Turn("assistant", "A cat.")), ())
    text, tokens = labelled(tokenizer, conv, template)
    newline = text.index("\nWhat is it?")
    start, end, segment = token_at(tokens, newline)
    assert segment == (Segment.ROLE if not text[start:end].strip() else Segment.INSTRUCTION), text[start:end]
    if family == "qwen2_bpe":  # "user\n" + "\n" in ChatML, " USER: " + "\n" in vicuna_v1
        assert text[start:end] == ("\n\n" if template != "vicuna_v1" else " \n") and segment == Segment.ROLE
    assert token_at(tokens, newline + 1)[2] == Segment.INSTRUCTION  # "What"
    assert not [t for t in tokens if t[2] == Segment.SYSTEM and t[1] > newline]


@pytest.mark.parametrize("template", ["qwen2", "vicuna_v1", "llama3"])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_newline_after_an_image_is_formatting(tokenizers, family, template):
    """LLaVA's "<image>\\n" + question: the "\\n" token was INSTRUCTION (trained in l2t); it is ROLE now.
    A tokenizer that glues it to the question ("\\nWhat", sentencepiece) keeps that token INSTRUCTION."""
    tokenizer = tokenizers[family]
    conv = Conversation("image-nl", (Turn("user", "<image>\nWhat is it?"), Turn("assistant", "A cat.")), ("c.jpg",))
    text, tokens = labelled(tokenizer, conv, template)
    image = text.index("<image>")
    assert token_at(tokens, image) == (image, image + len("<image>"), Segment.IMAGE)
    start, end, segment = token_at(tokens, image + len("<image>"))
    if text[start:end] == "\n":
        assert segment == Segment.ROLE
    else:
        assert family == "sentencepiece_bpe" and text[start:end].startswith("\nWhat") and segment == Segment.INSTRUCTION
    assert family == "sentencepiece_bpe" or text[start:end] == "\n"
    assert token_at(tokens, text.index("What"))[2] == Segment.INSTRUCTION


@pytest.mark.parametrize("template", ["qwen2", "vicuna_v1", "tokenizer"])
@pytest.mark.parametrize("family", FAMILIES)
def test_whitespace_between_sentences_is_formatting(tokenizers, family, template):
    """Two spaces and a newline between the human's sentences, and the newline before a task template:
    whitespace-only tokens there were INSTRUCTION, they are ROLE; the sentences keep their segments."""
    tokenizer = tokenizers[family]
    user = "Look at the cat.  What is it?\n" + TASKS[0]
    conv = Conversation("sentences", (Turn("user", user), Turn("assistant", "A cat.")), ())
    text, tokens = labelled(tokenizer, conv, template, task_templates=TASKS)
    base = text.index(user)
    blank = [(a, z, s) for a, z, s in tokens if base <= a < base + len(user) and not text[a:z].strip()]
    assert blank, "the tokenizer makes no whitespace-only token here"
    assert all(s == Segment.ROLE for _, _, s in blank), [(text[a:z], s) for a, z, s in blank]
    assert any(text[a:z] == "\n" for a, z, _ in blank) or family == "sentencepiece_bpe"
    for word, segment in (
        ("Look", Segment.INSTRUCTION),
        ("What", Segment.INSTRUCTION),
        ("Answer", Segment.TASK_TEMPLATE),
    ):
        assert token_at(tokens, text.index(word))[2] == segment, word
    run_texts = comparable_runs([(int(s), text[a:z]) for a, z, s in tokens])
    assert (Segment.INSTRUCTION, "Look at the cat. What is it?") in run_texts
    assert (Segment.TASK_TEMPLATE, TASKS[0]) in run_texts
