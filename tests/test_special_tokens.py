"""Content never yields a special token (workloads/special_tokens.py), on every tokenizer family and template.

Before: a reply quoting "</s>" tokenized the quote as the EOS id (end of
sequence trained mid-answer), a user typing "<|im_end|>" closed their own
turn. Now special-token text in the human's or the assistant's words is
spelled as text, the template's own special tokens (BOS/EOS, ChatML markers,
image placeholders) stay single special ids, every segment still decodes to
its text, and rows without such text never reach the re-encoding.
"""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_segments import FAMILIES, TASKS, char_segments, check_labels, conversations, make_tokenizers, spec_for

from workloads.chat_templates import TEMPLATES, render
from workloads.conversations import Conversation, ConversationError, Turn
from workloads.segment_codes import Segment
from workloads.segments import EncodedRow, EncodeSpec, encode_conversations
from workloads.special_tokens import SENTINEL, SpecialTokens, respell
from workloads.tokenizer_factory import SPECIAL_TOKENS

CONTENT = (Segment.INSTRUCTION, Segment.TASK_TEMPLATE, Segment.RESPONSE)
QUOTED = ("</s>", "<s>", "<|im_end|>", "<|im_start|>", "<|eot_id|>", "<pad>", "<unk>", "<|end_header_id|>")
SPECIAL_PATTERN = re.compile("|".join(re.escape(t) for t in sorted(SPECIAL_TOKENS, key=len, reverse=True)))


@pytest.fixture(scope="module")
def tokenizers() -> dict:
    return make_tokenizers()


def template_specials(rendered) -> list[tuple[int, int, str]]:
    """Special-token strings in the template's pieces (system, role, image, end of turn), in order."""
    found = []
    for piece in rendered.pieces:
        if piece.segment not in CONTENT:
            text = rendered.text[piece.start : piece.end]
            found += [
                (piece.start + m.start(), piece.start + m.end(), m.group()) for m in SPECIAL_PATTERN.finditer(text)
            ]
    return found


def encoded_with_offsets(tokenizer, rendered, row: EncodedRow) -> list[tuple[int, int]]:
    """Offsets of the row's tokens: the plain tokenization respelled where a special lands on content."""
    plain = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    char_segment = char_segments(rendered)
    specials = SpecialTokens(tokenizer)
    flags = np.isin(plain["input_ids"], tokenizer.all_special_ids)
    on_content = [
        i
        for i, (a, z) in enumerate(plain["offset_mapping"])
        if flags[i] and any(char_segment[c] in CONTENT for c in range(a, z))
    ]
    if not on_content:
        assert list(row.input_ids) == plain["input_ids"]
        return plain["offset_mapping"]
    ids, offsets = respell(rendered.text, plain["input_ids"], plain["offset_mapping"], on_content, False, specials, "")
    assert list(row.input_ids) == ids
    return offsets


def check_no_special_on_content(tokenizer, rendered, row: EncodedRow, offsets) -> None:
    flags = np.isin(row.input_ids, tokenizer.all_special_ids)
    assert not (flags & np.isin(row.segments, CONTENT)).any(), "a special token on content"
    # The template's specials, and only they, are special ids: one token each, spanning exactly the string.
    found = [
        (a, z, tokenizer.convert_ids_to_tokens(int(i))) for (a, z), i, f in zip(offsets, row.input_ids, flags) if f
    ]
    assert found == template_specials(rendered)


@st.composite
def quoting_conversations(draw) -> Conversation:
    """Random conversations with special-token strings written into user and assistant turns."""
    conv = draw(conversations())
    turns = []
    for turn in conv.turns:
        text = turn.text
        for _ in range(draw(st.integers(0, 2))):
            chunks = text.split("<image>")  # never cut a placeholder
            k = draw(st.integers(0, len(chunks) - 1))
            cut = draw(st.integers(0, len(chunks[k])))
            chunks[k] = chunks[k][:cut] + draw(st.sampled_from(QUOTED)) + chunks[k][cut:]
            text = "<image>".join(chunks)
        turns.append(Turn(turn.role, text))
    return replace(conv, turns=tuple(turns))


@pytest.mark.parametrize("family,template", [(f, t) for f in FAMILIES for t in TEMPLATES])
@settings(max_examples=25, deadline=None)
@given(conv=quoting_conversations())
def test_content_specials_are_text(tokenizers, family, template, conv):
    tokenizer = tokenizers[family]
    rendered = render(conv, template, tokenizer=tokenizer, task_templates=TASKS)
    (row,) = encode_conversations([conv], tokenizer, spec_for(template))
    assert isinstance(row, EncodedRow), row
    offsets = encoded_with_offsets(tokenizer, rendered, row)
    check_no_special_on_content(tokenizer, rendered, row, offsets)
    check_labels(tokenizer, family, template, conv, rendered, row, offsets)


QUOTING = Conversation(
    "quoting",
    (Turn("user", "Type <|im_end|> to stop.<|im_start|>system"), Turn("assistant", "It ends with </s> here.")),
    (),
)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_reply_quoting_eos_and_a_user_typing_im_end(tokenizers, family):
    """qwen2: before, the user's "<|im_end|>"/"<|im_start|>" and the reply's "</s>" were special ids."""
    tokenizer = tokenizers[family]
    spec = EncodeSpec("qwen2", 1, 4096, system_prompt="")
    rendered = render(QUOTING, "qwen2", tokenizer=tokenizer, system_prompt="")
    plain = tokenizer(rendered.text, add_special_tokens=False)["input_ids"]
    im_end, eos = tokenizer.convert_tokens_to_ids(["<|im_end|>", "</s>"])
    assert plain.count(im_end) == 3 and plain.count(eos) == 1  # the old encoding: the template has two <|im_end|>

    (row,) = encode_conversations([QUOTING], tokenizer, spec)
    assert isinstance(row, EncodedRow), row
    ids = row.input_ids.tolist()
    assert ids.count(im_end) == 2 and eos not in ids
    assert tokenizer.convert_ids_to_tokens(ids[:1]) == ["<|im_start|>"]
    offsets = encoded_with_offsets(tokenizer, rendered, row)
    check_no_special_on_content(tokenizer, rendered, row, offsets)
    for segment, text in ((Segment.INSTRUCTION, QUOTING.turns[0].text), (Segment.RESPONSE, QUOTING.turns[1].text)):
        decoded = tokenizer.decode(row.input_ids[row.segments == segment])  # without the ROLE whitespace tokens
        assert decoded.split() == text.split() or "".join(decoded.split()) == "".join(text.split())
    assert tokenizer.decode(row.input_ids) in (rendered.text, rendered.text[1:])


@pytest.mark.parametrize("template", ["vicuna_v1", "llama3", "tokenizer", "plain"])
def test_the_templates_own_specials_stay(tokenizers, template):
    tokenizer = tokenizers["sentencepiece_bpe"]
    conv = Conversation("q", (Turn("user", "<image>\nSay </s>"), Turn("assistant", "</s> and <s>")), ("a.jpg",))
    rendered = render(conv, template, tokenizer=tokenizer)
    (row,) = encode_conversations([conv], tokenizer, spec_for(template, images=3))
    assert isinstance(row, EncodedRow), row
    image = row.input_ids == tokenizer.convert_tokens_to_ids("<image>")
    assert image.sum() == 3 and (row.segments[image] == Segment.IMAGE).all()
    response = tokenizer.decode(row.input_ids[row.segments == Segment.RESPONSE])
    assert response.strip() == "</s> and <s>"
    expected = [s for _, _, s in template_specials(rendered)]
    flags = np.isin(row.input_ids, tokenizer.all_special_ids)
    shown = tokenizer.convert_ids_to_tokens(row.input_ids[flags & ~image].tolist())
    assert shown == [s for s in expected if s != "<image>"]


def test_rows_without_special_text_never_reach_the_re_encoding(tokenizers, monkeypatch):
    import workloads.segments as segments

    def refuse(*args, **kwargs):
        raise AssertionError("re-encoded a row without special-token text in its content")

    monkeypatch.setattr(segments, "respell", refuse)
    conv = Conversation("clean", (Turn("user", "<image>\nWhat is <this>?"), Turn("assistant", "A cat.")), ("a",))
    rows = encode_conversations([conv] * 40, tokenizers["byte_bpe"], spec_for("qwen2"), chunk_rows=8)
    assert all(isinstance(r, EncodedRow) for r in rows)


def test_mixed_batches_chunking_and_truncation(tokenizers):
    """Rows re-encoded in a batch are the rows encoded alone, whatever the chunking; truncation still applies."""
    tokenizer = tokenizers["qwen2_bpe"]
    rows = [
        QUOTING,
        Conversation("plain", (Turn("user", "Hi"), Turn("assistant", "Hello")), ()),
        Conversation("long", (Turn("user", "</s> " * 60), Turn("assistant", "late")), ()),
        replace(QUOTING, id="again"),
    ]
    spec = spec_for("qwen2", max_length=80)
    alone = [encode_conversations([r], tokenizer, spec)[0] for r in rows]
    assert [type(r).__name__ if isinstance(r, EncodedRow) else r.reason for r in alone] == [
        "EncodedRow",
        "EncodedRow",
        "no_trained_tokens",
        "EncodedRow",
    ]
    for chunk_rows in (1, 3, 100):
        batch = encode_conversations(rows, tokenizer, spec, chunk_rows=chunk_rows)
        for a, b in zip(alone, batch):
            assert type(a) is type(b)
            if isinstance(a, EncodedRow):
                assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.segments, b.segments)
    eos = tokenizer.convert_tokens_to_ids("</s>")
    (cut,) = encode_conversations([rows[2]], tokenizer, spec_for("qwen2", max_length=400))
    assert isinstance(cut, EncodedRow) and eos not in cut.input_ids.tolist()


def test_an_image_token_in_a_reply_is_still_a_placeholder_mismatch(tokenizers):
    conv = Conversation("stray", (Turn("user", "Hi"), Turn("assistant", "See <image> and </s>")), ())
    (row,) = encode_conversations([conv], tokenizers["byte_bpe"], spec_for("qwen2"))
    assert isinstance(row, ConversationError) and row.reason == "image_placeholder_mismatch"


def test_respell_refuses_what_it_cannot_do(tokenizers):
    tokenizer = tokenizers["byte_bpe"]
    specials = SpecialTokens(tokenizer)
    text = "a</s>b"
    plain = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = plain["input_ids"], plain["offset_mapping"]
    refused = respell(text, ids, offsets, [1], True, specials, "r1")
    assert isinstance(refused, ConversationError) and refused.reason == "special_token_in_content"
    assert "r1" in str(refused) and "</s>" in str(refused)
    with_sentinel = respell(text + SENTINEL, ids, offsets, [1], False, specials, "r2")
    assert isinstance(with_sentinel, ConversationError) and with_sentinel.reason == "special_token_in_content"
    spelled, _ = respell(text, ids, offsets, [1], False, specials, "r3")
    assert tokenizer.convert_tokens_to_ids("</s>") not in spelled and tokenizer.decode(spelled) == text
    assert specials.backend.encode_special_tokens is False  # the shared backend is never changed


def test_unknown_characters_stay_unknown_and_literal_unk_is_text():
    """Without byte fallback the model itself gives <unk> for a character it cannot spell: that is not
    special-token text (the row is kept, the <unk> stays); the literal "<unk>" typed by the user is text."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.add_special_tokens(["<unk>", "<image>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    conv = Conversation("unk", (Turn("user", "日本 <unk>?"), Turn("assistant", "ok 語")), ())
    spec = EncodeSpec("qwen2", 1, 512, system_prompt="")
    (row,) = encode_conversations([conv], tokenizer, spec)
    assert isinstance(row, EncodedRow), row
    unknown = row.input_ids == tokenizer.unk_token_id
    assert unknown.sum() == 3  # 日, 本, 語: the model's own unknowns, on content
    assert set(row.segments[unknown].tolist()) == {Segment.INSTRUCTION, Segment.RESPONSE}
    instruction = tokenizer.convert_ids_to_tokens(row.input_ids[row.segments == Segment.INSTRUCTION].tolist())
    assert instruction == ["<unk>", "<unk>", "<", "u", "n", "k", ">", "?"]  # the space between is ROLE
