"""Hand-checked renderings: exact text and exact (segment, text) pieces per template."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from workloads.chat_templates import TEMPLATES, VICUNA_SYSTEM, render
from workloads.conversations import Conversation, ConversationError, Turn
from workloads.segment_codes import Segment
from workloads.tokenizer_factory import train_tokenizer

S = Segment
VQA = "Answer the question using a single word or phrase."

TWO_ROUNDS = Conversation(
    id="golden",
    turns=(
        Turn("user", "<image>\nWhat animal is this? " + VQA),
        Turn("assistant", "Cat"),
        Turn("user", "What color is it?"),
        Turn("assistant", "It is black and white."),
    ),
    images=("cat.jpg",),
)


def check_tiling(rendered):
    assert rendered.pieces[0].start == 0 and rendered.pieces[-1].end == len(rendered.text)
    for left, right in zip(rendered.pieces, rendered.pieces[1:]):
        assert left.end == right.start and left.segment != right.segment


def test_vicuna_v1_golden():
    rendered = render(TWO_ROUNDS, "vicuna_v1", task_templates=[VQA])
    assert rendered.text == (
        "<s>" + VICUNA_SYSTEM + " USER: <image>\nWhat animal is this? " + VQA + " ASSISTANT: Cat</s>"
        "USER: What color is it? ASSISTANT: It is black and white.</s>"
    )
    assert rendered.piece_texts() == [
        (S.SYSTEM, "<s>" + VICUNA_SYSTEM),
        (S.ROLE, " USER: "),
        (S.IMAGE, "<image>"),
        (S.INSTRUCTION, "\nWhat animal is this? "),
        (S.TASK_TEMPLATE, VQA),
        (S.ROLE, " ASSISTANT: "),
        (S.RESPONSE, "Cat"),
        (S.END_OF_TURN, "</s>"),
        (S.ROLE, "USER: "),
        (S.INSTRUCTION, "What color is it?"),
        (S.ROLE, " ASSISTANT: "),
        (S.RESPONSE, "It is black and white."),
        (S.END_OF_TURN, "</s>"),
    ]
    check_tiling(rendered)


def test_qwen2_golden():
    rendered = render(TWO_ROUNDS, "qwen2", task_templates=[VQA])
    assert rendered.text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat animal is this? " + VQA + "<|im_end|>\n"
        "<|im_start|>assistant\nCat<|im_end|>\n"
        "<|im_start|>user\nWhat color is it?<|im_end|>\n"
        "<|im_start|>assistant\nIt is black and white.<|im_end|>\n"
    )
    assert rendered.piece_texts() == [
        (S.SYSTEM, "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"),
        (S.ROLE, "<|im_start|>user\n"),
        (S.IMAGE, "<image>"),
        (S.INSTRUCTION, "\nWhat animal is this? "),
        (S.TASK_TEMPLATE, VQA),
        (S.ROLE, "<|im_end|>\n<|im_start|>assistant\n"),
        (S.RESPONSE, "Cat"),
        (S.END_OF_TURN, "<|im_end|>"),
        (S.ROLE, "\n<|im_start|>user\n"),
        (S.INSTRUCTION, "What color is it?"),
        (S.ROLE, "<|im_end|>\n<|im_start|>assistant\n"),
        (S.RESPONSE, "It is black and white."),
        (S.END_OF_TURN, "<|im_end|>"),
        (S.ROLE, "\n"),
    ]
    check_tiling(rendered)


def test_llama3_pieces():
    rendered = render(TWO_ROUNDS, "llama3", system_prompt="Be brief.")
    assert rendered.text.startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat animal"
    )
    assert rendered.piece_texts()[-3:] == [
        (S.ROLE, "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
        (S.RESPONSE, "It is black and white."),
        (S.END_OF_TURN, "<|eot_id|>"),
    ]
    check_tiling(rendered)


def test_phi_has_no_bos_and_ends_responses_with_eos():
    rendered = render(TWO_ROUNDS, "phi")
    assert rendered.text.startswith("A chat between a curious user")
    assert (S.END_OF_TURN, "</s>") in rendered.piece_texts()
    check_tiling(rendered)


def test_plain_keeps_images_and_responses_only():
    rendered = render(TWO_ROUNDS, "plain")
    assert rendered.text == "<s><image>Cat\nIt is black and white.\n"
    assert rendered.piece_texts() == [
        (S.SYSTEM, "<s>"),
        (S.IMAGE, "<image>"),
        (S.RESPONSE, "Cat"),
        (S.END_OF_TURN, "\n"),
        (S.RESPONSE, "It is black and white."),
        (S.END_OF_TURN, "\n"),
    ]


def test_system_prompt_precedence():
    data_system = Conversation("s", TWO_ROUNDS.turns, TWO_ROUNDS.images, system="From data.")
    assert "From data." in render(data_system, "qwen2", system_prompt="From config.").text
    assert "From config." in render(TWO_ROUNDS, "qwen2", system_prompt="From config.").text
    no_system = render(TWO_ROUNDS, "qwen2", system_prompt="")
    assert no_system.text.startswith("<|im_start|>user\n")


def test_image_token_override_and_tokenizer_specials():
    tokenizer = train_tokenizer(["a b c"] * 5, vocab_size=300)
    tokenizer.add_special_tokens({"bos_token": "<bos>", "eos_token": "<eos>"})
    rendered = render(TWO_ROUNDS, "vicuna_v1", tokenizer=tokenizer, image_token="<img>")
    assert rendered.text.startswith("<bos>A chat") and rendered.text.endswith("white.<eos>")
    assert (S.IMAGE, "<img>") in rendered.piece_texts()


def test_task_templates_only_match_whole_sentences():
    conv = Conversation("t", (Turn("user", "Why? Answer briefly please. Answer briefly."), Turn("assistant", "ok")), ())
    pieces = render(conv, "qwen2", task_templates=["Answer  briefly."]).piece_texts()
    assert (S.INSTRUCTION, "Why? Answer briefly please. ") in pieces
    assert (S.TASK_TEMPLATE, "Answer briefly.") in pieces


def test_unknown_template():
    with pytest.raises(ValueError, match="unknown chat template"):
        render(TWO_ROUNDS, "alpaca")
    assert "alpaca" not in TEMPLATES


@pytest.fixture(scope="module")
def chatml_tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer(["What animal is this? Cat. It is black and white."] * 20, vocab_size=320)


def test_tokenizer_template_chatml(chatml_tokenizer):
    rendered = render(TWO_ROUNDS, "tokenizer", tokenizer=chatml_tokenizer, task_templates=[VQA])
    assert rendered.text == chatml_tokenizer.apply_chat_template(
        [{"role": t.role, "content": t.text} for t in TWO_ROUNDS.turns], tokenize=False
    )
    assert rendered.piece_texts() == [
        (S.SYSTEM, "<|im_start|>user\n"),
        (S.IMAGE, "<image>"),
        (S.INSTRUCTION, "\nWhat animal is this? "),
        (S.TASK_TEMPLATE, VQA),
        (S.ROLE, "<|im_end|>\n<|im_start|>assistant\n"),
        (S.RESPONSE, "Cat"),
        (S.END_OF_TURN, "<|im_end|>"),
        (S.ROLE, "\n<|im_start|>user\n"),
        (S.INSTRUCTION, "What color is it?"),
        (S.ROLE, "<|im_end|>\n<|im_start|>assistant\n"),
        (S.RESPONSE, "It is black and white."),
        (S.END_OF_TURN, "<|im_end|>"),
        (S.ROLE, "\n"),
    ]


def test_tokenizer_template_that_trims_contents(chatml_tokenizer):
    llama3_like = (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    )
    conv = Conversation("trim", (Turn("user", "  Hi there \n"), Turn("assistant", " Hello. ")), ())
    rendered = render(conv, "tokenizer", tokenizer=_with_template(chatml_tokenizer, llama3_like))
    assert rendered.piece_texts() == [
        (S.SYSTEM, "<s><|start_header_id|>user<|end_header_id|>\n\n"),
        (S.INSTRUCTION, "Hi there"),
        (S.ROLE, "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
        (S.RESPONSE, "Hello."),
        (S.END_OF_TURN, "<|eot_id|>"),
    ]


def test_tokenizer_template_that_alters_contents_is_a_row_error(chatml_tokenizer):
    shouting = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}"
    with pytest.raises(ConversationError) as info:
        render(TWO_ROUNDS, "tokenizer", tokenizer=_with_template(chatml_tokenizer, shouting))
    assert info.value.reason == "template_mismatch" and "golden" in str(info.value)


def test_tokenizer_template_needs_a_chat_template():
    with pytest.raises(ValueError, match="chat_template"):
        render(TWO_ROUNDS, "tokenizer")


def _with_template(tokenizer, template):
    clone = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, bos_token="<s>", eos_token="</s>")
    clone.chat_template = template
    return clone


# --- the substring fast path for task templates agrees with sentence splitting -------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from workloads.chat_templates import _find_sentences, task_template_set  # noqa: E402
from workloads.task_templates import sentence_spans  # noqa: E402

FAST_TEMPLATES = ("Answer briefly.", "Why?", "Describe it", "a b", "Really?!")


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(st.sampled_from(FAST_TEMPLATES + ("Answer", "briefly", "it", "a", "b", ".", "?", "!", "x.", "y?"))),
        min_size=1,
        max_size=12,
    ),
    st.lists(st.sampled_from(["", " ", " ", "\n", " \n", "\n ", ". ", "! "]), min_size=12, max_size=12),
)
def test_fast_template_search_matches_sentence_splitting(words, separators):
    text = "".join(w + s for w, s in zip(words, separators))
    task_set = task_template_set(FAST_TEMPLATES)
    slow = [(start, end) for start, end, normalized in sentence_spans(text) if normalized in task_set]
    if "  " not in text:
        assert _find_sentences(text, task_set) == slow


def test_multi_sentence_templates_never_match():
    assert task_template_set(["One. Two.", "  Fine  one. ", ""]) == frozenset({"Fine one."})


@pytest.mark.parametrize("family", ["byte_bpe", "sentencepiece_bpe"])
def test_qwen2_golden_tokens(family):
    """Token level: in ChatML every piece boundary is a special token or a newline, so runs decode exactly."""
    from workloads.segments import EncodeSpec, encode_conversations

    tokenizer = train_tokenizer(
        ["What animal is this? Cat. It is black and white."] * 20, family=family, vocab_size=320
    )
    (row,) = encode_conversations([TWO_ROUNDS], tokenizer, EncodeSpec("qwen2", 2, 1000, task_templates=(VQA,)))
    ids, segments = row.input_ids.tolist(), row.segments.tolist()
    runs, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or segments[end] != segments[start]:
            in_context = tokenizer.decode(ids[:end])[len(tokenizer.decode(ids[:start])) :]
            runs.append((S(segments[start]), in_context))
            start = end
    expected = render(TWO_ROUNDS, "qwen2", task_templates=[VQA]).piece_texts()
    expected[2] = (S.IMAGE, "<image><image>")  # one placeholder, two image tokens
    assert runs == expected
