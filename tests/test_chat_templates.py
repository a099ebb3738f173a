"""Hand-checked renderings: exact text and exact (segment, text) pieces per template."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from workloads.chat_templates import PHI_SYSTEM, TEMPLATES, VICUNA_SYSTEM, render, render_prompt
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


def test_vicuna_v1_system_prompt_is_llava_15s():
    """LLaVA-1.5 trains (--version v1) and evaluates (--conv-mode vicuna_v1) with conv_vicuna_v1,
    not conv_llava_v1's "curious human ... the human's questions"."""
    assert VICUNA_SYSTEM == (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    )
    assert PHI_SYSTEM == VICUNA_SYSTEM  # TinyLLaVA's conv_phi_v0 uses the same sentence
    assert render(TWO_ROUNDS, "vicuna_v1").text.startswith("<s>A chat between a curious user and an artificial")


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
    assert rendered.text.startswith("A chat between a curious user and an artificial intelligence assistant. ")
    assert rendered.text.startswith(PHI_SYSTEM + " USER: <image>\nWhat animal")
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


# --- image placement: LLaVA's preprocess_multimodal moves <image> to the front of its turn ----------

IMAGE_LAST = Conversation(
    "image-last",
    (Turn("user", "What is the color of the shape?\n<image>"), Turn("assistant", "Red")),
    ("a.png",),
)


def llava_preprocess_multimodal(text: str) -> str:
    """LLaVA's rewrite of a turn holding DEFAULT_IMAGE_TOKEN (llava/train/train.py)."""
    text = text.replace("<image>", "").strip()
    text = "<image>" + "\n" + text
    return text.strip()


@pytest.mark.parametrize("placement", ["auto", "front"])
def test_image_at_the_end_moves_to_the_front_as_llava_trains_it(placement):
    rendered = render(IMAGE_LAST, "vicuna_v1", image_placement=placement)
    assert rendered.text == (
        "<s>"
        + VICUNA_SYSTEM
        + " USER: "
        + llava_preprocess_multimodal(IMAGE_LAST.turns[0].text)
        + " ASSISTANT: Red</s>"
    )
    assert rendered.text == "<s>" + VICUNA_SYSTEM + " USER: <image>\nWhat is the color of the shape? ASSISTANT: Red</s>"
    assert rendered.piece_texts()[1:4] == [
        (S.ROLE, " USER: "),
        (S.IMAGE, "<image>"),
        (S.INSTRUCTION, "\nWhat is the color of the shape?"),
    ]
    check_tiling(rendered)


def test_as_written_keeps_the_image_where_the_data_puts_it():
    rendered = render(IMAGE_LAST, "vicuna_v1", image_placement="as_written")
    assert rendered.text == "<s>" + VICUNA_SYSTEM + " USER: What is the color of the shape?\n<image> ASSISTANT: Red</s>"
    assert rendered.piece_texts()[2:4] == [(S.INSTRUCTION, "What is the color of the shape?\n"), (S.IMAGE, "<image>")]


@pytest.mark.parametrize(
    "text",
    [
        "Q?\n<image>",
        "<image>\nQ?",
        "<image>\nQ? ",
        "<image>\n Q?",
        "<image>Q?",
        "Left <image> right.",
        "  <image>  ",
        "<image>",
        "<image>\n",
        "What?<image>\n\nWhy?",
    ],
)
def test_front_placement_is_llavas_rewrite(text):
    from workloads.chat_templates import place_images

    assert place_images(text, "front") == llava_preprocess_multimodal(text)
    assert place_images(text, "as_written") == text
    assert place_images("No image here. ", "front") == "No image here. "
    conv = Conversation("p", (Turn("user", text), Turn("assistant", "A.")), ("a.png",))
    moved = Conversation("p", (Turn("user", llava_preprocess_multimodal(text)), Turn("assistant", "A.")), ("a.png",))
    assert render(conv, "qwen2", image_placement="front") == render(moved, "qwen2", image_placement="as_written")


def test_front_placement_keeps_every_image_of_a_turn():
    from workloads.chat_templates import place_images

    assert place_images("Compare <image> with <image>.", "front") == "<image>\n<image>\nCompare  with ."
    conv = Conversation("two", (Turn("user", "First <image>, then <image>?"), Turn("assistant", "No.")), ("a", "b"))
    assert [seg for seg, _ in render(conv, "qwen2", image_placement="front").piece_texts()].count(S.IMAGE) == 2


def test_auto_placement_is_front_for_the_llava_family_only():
    expected_front = "<image>\nWhat is the color of the shape?"
    for template in ("vicuna_v1", "phi"):
        assert expected_front in render(IMAGE_LAST, template).text
    for template in ("qwen2", "llama3"):
        assert "What is the color of the shape?\n<image>" in render(IMAGE_LAST, template).text
        assert expected_front in render(IMAGE_LAST, template, image_placement="front").text
    assert render(IMAGE_LAST, "plain").text == "<s><image>Red\n"
    with pytest.raises(ValueError, match="image placement"):
        render(IMAGE_LAST, "vicuna_v1", image_placement="back")


def test_placement_reaches_training_rows_and_the_config_choices():
    from workloads.chat_templates import IMAGE_PLACEMENTS
    from workloads.config import IMAGE_PLACEMENTS as CONFIG_PLACEMENTS
    from workloads.segments import EncodeSpec, encode_conversations

    assert IMAGE_PLACEMENTS == CONFIG_PLACEMENTS
    tokenizer = train_tokenizer(["What is the color of the shape? Red."] * 20, vocab_size=300)
    for placement in ("front", "as_written"):
        (row,) = encode_conversations(
            [IMAGE_LAST], tokenizer, EncodeSpec("vicuna_v1", 1, 500, image_placement=placement)
        )
        text = render(IMAGE_LAST, "vicuna_v1", tokenizer=tokenizer, image_placement=placement).text
        assert row.input_ids.tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]


# --- generation prompts: the user turn and the assistant prefix, never the answer ----------------


def test_generation_prompts_are_llavas_get_prompt():
    question = Conversation("q", (Turn("user", "<image>\nWhat is it?"),), ("a.png",))
    assert render_prompt(question, "vicuna_v1").text == "<s>" + VICUNA_SYSTEM + " USER: <image>\nWhat is it? ASSISTANT:"
    assert render_prompt(question, "phi").text == PHI_SYSTEM + " USER: <image>\nWhat is it? ASSISTANT:"
    assert render_prompt(question, "qwen2").text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_prompt(question, "llama3", system_prompt="").text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is it?"
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert render_prompt(question, "plain").text == "<s><image>"
    assert render_prompt(question, "vicuna_v1").piece_texts()[-1] == (S.ROLE, " ASSISTANT:")
    with pytest.raises(ConversationError, match="no user turn"):
        render_prompt(Conversation("a", (Turn("assistant", "Hi"),), ()), "qwen2")


@pytest.mark.parametrize("template", [t for t in TEMPLATES if t != "tokenizer"])
def test_generation_prompt_is_the_answered_rows_prefix_and_ignores_the_answer(template):
    prompt = render_prompt(TWO_ROUNDS, template, task_templates=[VQA])  # the last answer is dropped
    assert (S.RESPONSE, "It is black and white.") not in prompt.piece_texts()
    full = render(TWO_ROUNDS, template, task_templates=[VQA])
    assert full.text.startswith(prompt.text)
    assert prompt.piece_texts() == full.piece_texts()[: len(prompt.pieces) - 1] + [prompt.piece_texts()[-1]]
    check_tiling(prompt)
    other = Conversation("o", TWO_ROUNDS.turns[:3] + (Turn("assistant", "2"),), TWO_ROUNDS.images)
    assert render_prompt(other, template, task_templates=[VQA]) == prompt


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


def test_tokenizer_template_generation_prompt(chatml_tokenizer):
    question = Conversation("q", (Turn("user", "What is this?\n<image>"),), ("a.png",))
    prompt = render_prompt(question, "tokenizer", tokenizer=chatml_tokenizer, image_placement="front")
    assert prompt.text == chatml_tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\nWhat is this?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.piece_texts() == [
        (S.SYSTEM, "<|im_start|>user\n"),
        (S.IMAGE, "<image>"),
        (S.INSTRUCTION, "\nWhat is this?"),
        (S.ROLE, "<|im_end|>\n<|im_start|>assistant\n"),
    ]
    as_written = render_prompt(question, "tokenizer", tokenizer=chatml_tokenizer)  # auto: as written
    assert as_written.text.startswith("<|im_start|>user\nWhat is this?\n<image><|im_end|>")


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
    assert _fold_formatting(runs) == expected


def _fold_formatting(runs):
    """Whitespace-only tokens of the human's words are formatting (ROLE) by the segment rule: fold each such run
    back into the instruction-side run it sits in, so the runs line up with the rendered pieces again."""
    human = (S.INSTRUCTION, S.TASK_TEMPLATE)
    folded = []
    for i, (segment, text) in enumerate(runs):
        if segment == S.ROLE and not text.strip():
            after = runs[i + 1][0] if i + 1 < len(runs) else None
            if folded and folded[-1][0] in human:
                folded[-1] = (folded[-1][0], folded[-1][1] + text)
                continue
            if after in human:
                runs[i + 1] = (after, text + runs[i + 1][1])
                continue
        if folded and folded[-1][0] == segment:
            folded[-1] = (segment, folded[-1][1] + text)
        else:
            folded.append((segment, text))
    return folded
