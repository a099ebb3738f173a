"""Token segments from offsets: property tests over random conversations, templates and tokenizer families.

What is proven for every generated row (every tokenizer family: the factory's
byte_bpe and sentencepiece_bpe, and a Qwen2-style byte-level BPE with Qwen2's
own pre-tokenizer pattern, tests/qwen2_style.py; every template):

- exact labels: every token has the segment that the rule of
  `encode_conversations` gives it, recomputed here character by character
  (any reply character -> RESPONSE; else a visible character of the human's
  words -> that character's segment; else whitespace holding the human's
  characters -> ROLE; else the first visible, or first, character's
  segment), and no token holds the visible text of two segments;
- encoding a row again through special_tokens.respell (every special token
  kept as the template's) gives exactly the batched tokenization: the
  sentinel-split encoding cuts the text where the tokenizer itself does;
- decoding the whole row gives back the rendered text exactly (for
  sentencepiece_bpe, up to the one leading space that Llama-style decoders
  always drop);
- decoding each run of same-segment tokens gives back that segment's text.
  Normalization, and why: whitespace at a piece boundary travels with the
  neighbouring token (" The" carries the space after "ASSISTANT:"), so run
  texts are compared with whitespace runs collapsed to one space and
  stripped, and whitespace-only runs are folded into their neighbour (the
  human's whitespace-only tokens are ROLE by the rule, so a ROLE run of
  whitespace folds back into the instruction it sits in).
  Metaspace's decoder drops the leading space of every decode call, so each
  run is also decoded in context (decode(ids[:end]) minus decode(ids[:start]));
  alone it must equal that, up to that one space for sentencepiece_bpe;
- weights: every response and end-of-turn token has λ_A in every mode,
  nothing else is weighted in `response` mode, no system, role, image or
  task-template token is weighted in `l2t`, no system or role token in
  `l2t_no_system`, every instruction-side token in `l2t_full`, images never;
- lengths agree, image blocks have `num_image_tokens` tokens, and every
  returned row has a trained token.
"""

from __future__ import annotations

import random
import string

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qwen2_style import train_qwen2_style

from workloads.chat_templates import TEMPLATES, render
from workloads.conversations import Conversation, ConversationError, Turn, parse_messages
from workloads.segment_codes import MASKING_MODES, Segment, token_weights
from workloads.segments import EncodedRow, EncodeSpec, encode_conversations, image_token_id, segment_tokens
from workloads.special_tokens import SpecialTokens, respell
from workloads.tokenizer_factory import TOKENIZER_FAMILIES, train_tokenizer

TASKS = ("Answer the question using a single word or phrase.", "Describe the image briefly.")
ALPHABET = string.ascii_letters + string.digits + "éüßçñ日本語中文😀🎉" + ".,;:!?'\"-()[]/@#$%&*+=_~|"
SEPARATORS = [" ", " ", " ", "  ", "\n", "\n\n", "\t", ". ", "? ", "! ", "\u00a0", " \n"]
LAMBDA_I, LAMBDA_A = 0.25, 1.75


def corpus(n: int = 600) -> list[str]:
    """Training text shaped like the rendered conversations, so real merges happen at boundaries."""
    rng = random.Random(0)
    words = [
        "the",
        "cat",
        "is",
        "on",
        "a",
        "mat",
        "What",
        "color",
        "image",
        "USER",
        "ASSISTANT",
        "system",
        "user",
        "assistant",
        "answer",
        "question",
        "describe",
        "photo",
        "3.5",
        "12",
        "dog",
        "Yes",
        "No",
    ]
    texts = []
    for _ in range(n):
        parts = [rng.choice(words + ["".join(rng.choices(ALPHABET, k=rng.randint(1, 6)))]) for _ in range(12)]
        texts.append("".join(p + rng.choice(SEPARATORS) for p in parts))
    texts += list(TASKS) * 20
    texts += ["USER: What is it? ASSISTANT: A cat.</s>", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"] * 20
    return texts


FAMILIES = (*TOKENIZER_FAMILIES, "qwen2_bpe")


def make_tokenizers() -> dict:
    texts = corpus()
    made = {family: train_tokenizer(texts, family=family, vocab_size=2000) for family in TOKENIZER_FAMILIES}
    made["qwen2_bpe"] = train_qwen2_style(texts)
    return made


@pytest.fixture(scope="module")
def tokenizers() -> dict:
    return make_tokenizers()


# --- random conversations -----------------------------------------------------------------------

words = st.text(alphabet=ALPHABET, min_size=1, max_size=8)
separators = st.sampled_from(SEPARATORS)


@st.composite
def turn_text(draw, allow_tasks: bool) -> str:
    items = draw(st.lists(st.one_of(words, st.sampled_from(TASKS)) if allow_tasks else words, min_size=1, max_size=8))
    text = draw(st.sampled_from(["", " ", "\n"]))
    for item in items:
        text += item + draw(separators)
    return text if draw(st.booleans()) else text.rstrip()


@st.composite
def conversations(draw) -> Conversation:
    rounds = draw(st.integers(1, 3))
    users = [draw(turn_text(allow_tasks=True)) for _ in range(rounds)]
    n_images = draw(st.integers(0, 2))
    for _ in range(n_images):
        i = draw(st.integers(0, rounds - 1))
        where = draw(st.sampled_from(["start", "end", "middle"]))
        if where == "start":
            users[i] = "\x01\n" + users[i]
        elif where == "end":
            users[i] = users[i] + " \x01"
        else:
            cut = draw(st.integers(0, len(users[i])))
            users[i] = users[i][:cut] + "\x01" + users[i][cut:]
    users = [user.replace("\x01", "<image>") for user in users]
    messages = []
    system = draw(st.one_of(st.none(), turn_text(allow_tasks=False)))
    if system is not None:
        messages.append({"role": "system", "content": system})
    for user in users:
        messages += [
            {"role": "user", "content": user},
            {"role": "assistant", "content": draw(turn_text(allow_tasks=False))},
        ]
    return parse_messages({"id": "h", "messages": messages, "images": [f"{i}.jpg" for i in range(n_images)]})


# --- helpers ------------------------------------------------------------------------------------


def normalized(text: str) -> str:
    return " ".join(text.split())


def comparable_runs(runs: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Fold whitespace-only runs into the previous one, merge equal neighbours, normalize whitespace."""
    folded: list[list] = []
    for segment, text in runs:
        if not text.strip() and folded:
            folded[-1][1] += text
        elif folded and folded[-1][0] == segment:
            folded[-1][1] += text
        else:
            folded.append([segment, text])
    merged: list[list] = []
    for segment, text in folded:
        if merged and merged[-1][0] == segment:
            merged[-1][1] += text
        else:
            merged.append([segment, text])
    return [(segment, normalized(text)) for segment, text in merged if text.strip()]


def token_runs(ids: np.ndarray, segments: np.ndarray) -> list[tuple[int, int, int]]:
    runs, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or segments[i] != segments[start]:
            runs.append((int(segments[start]), start, i))
            start = i
    return runs


def spec_for(template: str, images: int = 1, max_length: int = 100_000) -> EncodeSpec:
    return EncodeSpec(template=template, num_image_tokens=images, max_length=max_length, task_templates=TASKS)


def encode_one(conv, tokenizer, spec) -> EncodedRow:
    (row,) = encode_conversations([conv], tokenizer, spec)
    assert isinstance(row, EncodedRow), row
    return row


INSTRUCTION_SIDE = (Segment.INSTRUCTION, Segment.TASK_TEMPLATE)


def rule_segment(text: str, char_segment: np.ndarray, start: int, end: int) -> int:
    """The labeling rule of `encode_conversations`, character by character."""
    span = range(start, end)
    if any(char_segment[c] == Segment.RESPONSE for c in span):
        return Segment.RESPONSE
    visible = [c for c in span if not text[c].isspace()]
    human = [c for c in visible if char_segment[c] in INSTRUCTION_SIDE]
    if human:
        return int(char_segment[human[0]])
    if visible:
        return int(char_segment[visible[0]])
    if any(char_segment[c] in INSTRUCTION_SIDE for c in span):
        return Segment.ROLE
    return int(char_segment[min(start, len(text) - 1)])


def char_segments(rendered) -> np.ndarray:
    char_segment = np.empty(len(rendered.text), dtype=np.int8)
    for piece in rendered.pieces:
        char_segment[piece.start : piece.end] = piece.segment
    return char_segment


# --- the properties -----------------------------------------------------------------------------

CASES = [(family, template) for family in FAMILIES for template in TEMPLATES]


@pytest.mark.parametrize("family,template", CASES)
@settings(max_examples=40, deadline=None)
@given(conv=conversations())
def test_segments_are_exact(tokenizers, family, template, conv):
    tokenizer = tokenizers[family]
    rendered = render(conv, template, tokenizer=tokenizer, task_templates=TASKS)
    row = encode_one(conv, tokenizer, spec_for(template))
    ids, segments = row.input_ids, row.segments
    assert ids.dtype == np.int32 and segments.dtype == np.int8 and len(ids) == len(segments)
    assert not row.truncated

    # The batched fast path gives the same ids as the plain transformers call, and so does the
    # re-encoding that spells content specials as text, on a row that has none.
    plain = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    assert list(ids) == plain["input_ids"]
    again = respell(
        rendered.text, plain["input_ids"], plain["offset_mapping"], [], False, SpecialTokens(tokenizer), "h"
    )
    assert again == (plain["input_ids"], [tuple(o) for o in plain["offset_mapping"]])
    check_labels(tokenizer, family, template, conv, rendered, row, plain["offset_mapping"])


def check_labels(tokenizer, family, template, conv, rendered, row, offsets) -> None:
    """Exact labels, decodes, end-of-turn markers, weights and images of one encoded row (images=1)."""
    ids, segments = row.input_ids, row.segments
    char_segment = char_segments(rendered)
    for (start, end), segment in zip(offsets, segments):
        assert segment == rule_segment(rendered.text, char_segment, start, end), (rendered.text[start:end], segment)
        visible = {int(char_segment[c]) for c in range(start, end) if not rendered.text[c].isspace()}
        assert visible <= {int(segment)}, (rendered.text[start:end], segment)

    # Whole-row decode is exact; segment runs decode to their pieces' text.
    decoded = tokenizer.decode(ids)
    assert decoded == rendered.text or (family == "sentencepiece_bpe" and " " + decoded == rendered.text)
    expected = comparable_runs([(int(p.segment), rendered.text[p.start : p.end]) for p in rendered.pieces])
    run_texts = []
    for segment, a, z in token_runs(ids, segments):
        alone = tokenizer.decode(ids[a:z])
        in_context = tokenizer.decode(ids[:z])[len(tokenizer.decode(ids[:a])) :]
        if family == "sentencepiece_bpe":  # the decoder drops one leading space per call
            assert alone == in_context or " " + alone == in_context
        else:
            assert alone == in_context
        run_texts.append((segment, in_context))
    assert comparable_runs(run_texts) == expected

    # Each end-of-turn marker that is a token of its own follows its response as END_OF_TURN.
    end_pieces = [p for p in rendered.pieces if p.segment == Segment.END_OF_TURN]
    if template != "plain":
        assert len(end_pieces) == sum(t.role == "assistant" for t in conv.turns)
        assert int((segments == Segment.END_OF_TURN).sum()) == len(end_pieces)

    check_weights(segments)
    assert row.images_kept == len(conv.images) == int((segments == Segment.IMAGE).sum())


def check_weights(segments: np.ndarray) -> None:
    trained_by_response = np.isin(segments, [Segment.RESPONSE, Segment.END_OF_TURN])
    assert (segments == Segment.RESPONSE).any(), "a returned row always has a trained response token"
    for mode in MASKING_MODES:
        weights = token_weights(segments, mode, LAMBDA_I, LAMBDA_A)
        assert weights.shape == segments.shape
        assert np.all(weights[trained_by_response] == np.float32(LAMBDA_A))
        assert np.all(weights[segments == Segment.IMAGE] == 0)
        assert weights.sum() > 0
        if mode == "response":
            assert np.all(weights[~trained_by_response] == 0)
        if mode == "l2t":
            template_tokens = np.isin(segments, [Segment.SYSTEM, Segment.ROLE, Segment.TASK_TEMPLATE])
            assert np.all(weights[template_tokens] == 0)
            assert np.all(weights[segments == Segment.INSTRUCTION] == np.float32(LAMBDA_I))
        if mode == "l2t_no_system":
            assert np.all(weights[np.isin(segments, [Segment.SYSTEM, Segment.ROLE])] == 0)
            instruction = np.isin(segments, [Segment.INSTRUCTION, Segment.TASK_TEMPLATE])
            assert np.all(weights[instruction] == np.float32(LAMBDA_I))
        if mode == "l2t_full":
            instruction = np.isin(segments, [Segment.SYSTEM, Segment.ROLE, Segment.INSTRUCTION, Segment.TASK_TEMPLATE])
            assert np.all(weights[instruction] == np.float32(LAMBDA_I))


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=40, deadline=None)
@given(
    conv=conversations(), template=st.sampled_from(TEMPLATES), block=st.integers(1, 5), max_length=st.integers(1, 120)
)
def test_image_expansion_and_truncation(tokenizers, family, conv, template, block, max_length):
    tokenizer = tokenizers[family]
    image_id = image_token_id(tokenizer)
    full = encode_one(conv, tokenizer, spec_for(template, images=1))
    expanded = encode_one(conv, tokenizer, spec_for(template, images=block))
    repeats = np.where(full.input_ids == image_id, block, 1)
    assert np.array_equal(expanded.input_ids, np.repeat(full.input_ids, repeats))
    assert np.array_equal(expanded.segments, np.repeat(full.segments, repeats))

    (result,) = encode_conversations([conv], tokenizer, spec_for(template, images=block, max_length=max_length))
    if len(expanded.input_ids) <= max_length:
        assert isinstance(result, EncodedRow) and not result.truncated
        return
    if isinstance(result, ConversationError):
        assert result.reason == "no_trained_tokens"
        # Rejected only when the kept prefix really holds no response token.
        assert not (expanded.segments[:max_length] == Segment.RESPONSE).any()
        return
    n = len(result.input_ids)
    assert result.truncated and n <= max_length
    assert np.array_equal(result.input_ids, expanded.input_ids[:n])
    assert np.array_equal(result.segments, expanded.segments[:n])
    image_tokens = int((result.input_ids == image_id).sum())
    assert image_tokens == result.images_kept * block, "no image block is cut"
    assert n == max_length or expanded.input_ids[n] == image_id, "cut early only before an image block"
    assert (result.segments == Segment.RESPONSE).any()


# --- deterministic cases ------------------------------------------------------------------------


def test_truncation_cuts_before_an_image_block(tokenizers):
    tokenizer = tokenizers["byte_bpe"]
    conv = Conversation(
        "two-images",
        (
            Turn("user", "<image>\nFirst. <image>\nSecond?"),
            Turn("assistant", "Both cats."),
            Turn("user", "Sure?"),
            Turn("assistant", "Yes."),
        ),
        ("a.jpg", "b.jpg"),
    )
    full = encode_one(conv, tokenizer, spec_for("plain", images=10))
    # plain: <s> [10 image] [10 image] response ...
    assert list(full.segments[:21]) == [Segment.SYSTEM] + [Segment.IMAGE] * 20
    cut_inside_second_block = encode_conversations([conv], tokenizer, spec_for("plain", images=10, max_length=15))
    assert isinstance(cut_inside_second_block[0], ConversationError)  # only <s> and one image would remain
    assert cut_inside_second_block[0].reason == "no_trained_tokens"
    assert "two-images" in str(cut_inside_second_block[0])

    vicuna_full = encode_one(conv, tokenizer, spec_for("vicuna_v1", images=10))
    second_block = np.flatnonzero(vicuna_full.segments == Segment.IMAGE)[10]
    after_first_response = int(np.flatnonzero(vicuna_full.segments == Segment.END_OF_TURN)[0]) + 1
    assert second_block < after_first_response  # both images are in the first user turn
    spec = spec_for("vicuna_v1", images=10, max_length=int(second_block) + 5)
    (row,) = encode_conversations([conv], tokenizer, spec)
    assert isinstance(row, ConversationError)  # the response comes after the second image: nothing to train
    long_enough = spec_for("vicuna_v1", images=10, max_length=after_first_response)
    (row,) = encode_conversations([conv], tokenizer, long_enough)
    assert isinstance(row, EncodedRow) and row.truncated and row.images_kept == 2


def test_one_bad_row_does_not_sink_the_batch(tokenizers):
    tokenizer = tokenizers["sentencepiece_bpe"]
    good = Conversation("good", (Turn("user", "<image>\nHi"), Turn("assistant", "Hello")), ("x.jpg",))
    too_long = Conversation("long", (Turn("user", "word " * 200), Turn("assistant", "ok")), ())
    shouting = Conversation("bad", (Turn("user", "Hi"), Turn("assistant", "Hello")), ())
    rows = encode_conversations(
        [good, too_long, good, shouting] * 3, tokenizer, spec_for("qwen2", images=4, max_length=64)
    )
    kinds = [type(r).__name__ if not isinstance(r, ConversationError) else r.reason for r in rows]
    assert kinds == ["EncodedRow", "no_trained_tokens", "EncodedRow", "EncodedRow"] * 3


def test_template_errors_are_returned_per_row(tokenizers):
    from transformers import PreTrainedTokenizerFast

    base = tokenizers["byte_bpe"]
    shouting = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, bos_token="<s>", eos_token="</s>")
    shouting.chat_template = "{% for m in messages %}{{ m['content'] | upper }}\n{% endfor %}"
    upper_safe = Conversation("ok", (Turn("user", "HI"), Turn("assistant", "YO")), ())
    lower = Conversation("lower", (Turn("user", "hi"), Turn("assistant", "yo")), ())
    rows = encode_conversations([upper_safe, lower], shouting, spec_for("tokenizer"))
    assert isinstance(rows[0], EncodedRow)
    assert isinstance(rows[1], ConversationError) and rows[1].reason == "template_mismatch"


def test_image_in_system_prompt_is_rejected(tokenizers):
    conv = Conversation("sys", (Turn("user", "Hi"), Turn("assistant", "Hello")), (), system="See <image> here.")
    (row,) = encode_conversations([conv], tokenizers["byte_bpe"], spec_for("qwen2"))
    assert isinstance(row, ConversationError) and row.reason == "image_placeholder_mismatch"


def test_segment_tokens_single_row(tokenizers):
    tokenizer = tokenizers["byte_bpe"]
    conv = Conversation("one", (Turn("user", "<image>\nWhat is it?"), Turn("assistant", "A cat.")), ("c.jpg",))
    spec = spec_for("vicuna_v1", images=3)
    row = segment_tokens(render(conv, "vicuna_v1", tokenizer=tokenizer), tokenizer, spec)
    batch_row = encode_one(conv, tokenizer, spec)
    assert np.array_equal(row.input_ids, batch_row.input_ids) and np.array_equal(row.segments, batch_row.segments)


def test_image_token_must_be_special(tokenizers):
    with pytest.raises(ValueError, match="single"):
        encode_conversations([], tokenizers["byte_bpe"], EncodeSpec("qwen2", 4, 128, image_token="<picture>"))


def test_spec_validation():
    with pytest.raises(ValueError):
        EncodeSpec("qwen2", -1, 128)  # 0 is "per image" (workloads/families.py)
    with pytest.raises(ValueError):
        EncodeSpec("qwen2", 4, 0)
    assert EncodeSpec("qwen2", 4, 128, task_templates=["a"]).task_templates == ("a",)


def test_a_token_straddling_two_pieces_goes_to_its_first_visible_character():
    """The documented rule, on a tokenizer built to merge across a sentence boundary ("a.\\nb")."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {c: i for i, c in enumerate(chars)}
    merged = ["a.", "a.\n", "a.\nb"]
    vocab.update({m: len(vocab) + i for i, m in enumerate(merged)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "."), ("a.", "\n"), ("a.\n", "b")]))
    backend.add_special_tokens(["<image>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")

    conv = Conversation("straddle", (Turn("user", "a.\nb"), Turn("assistant", "ok")), ())
    spec = EncodeSpec("qwen2", 1, 512, task_templates=("a.",), system_prompt="")
    pieces = render(conv, "qwen2", task_templates=spec.task_templates, system_prompt="").piece_texts()
    assert (Segment.TASK_TEMPLATE, "a.") in pieces and (Segment.INSTRUCTION, "\nb") in pieces
    row = encode_one(conv, tokenizer, spec)
    straddling = row.input_ids == vocab["a.\nb"]
    assert straddling.sum() == 1
    assert row.segments[straddling][0] == Segment.TASK_TEMPLATE
    assert not (row.segments == Segment.INSTRUCTION).any()


@pytest.mark.parametrize("template", ["vicuna_v1", "tokenizer"])
def test_results_do_not_depend_on_chunking(tokenizers, template):
    """Chunks overlap rendering with tokenization on a helper thread; the rows must be the same."""
    rng = random.Random(3)
    texts = corpus(200)
    convs = []
    for i in range(300):
        image = rng.random() < 0.5
        user = ("<image>\n" if image else "") + rng.choice(texts)[:80] + " " + rng.choice(TASKS)
        turns = (Turn("user", user), Turn("assistant", rng.choice(texts)[:60] + "x"))
        if i % 50 == 7:
            turns = (Turn("user", "word " * 400), Turn("assistant", "late"))  # too long: no_trained_tokens
        convs.append(Conversation(f"r{i}", turns, ("i.jpg",) if image else ()))
    tokenizer = tokenizers["byte_bpe"]
    spec = spec_for(template, images=3, max_length=256)
    whole = encode_conversations(convs, tokenizer, spec, chunk_rows=10_000)
    for chunk_rows in (1, 7, 64):
        chunked = encode_conversations(convs, tokenizer, spec, chunk_rows=chunk_rows)
        assert len(chunked) == len(whole)
        for a, b in zip(whole, chunked):
            assert type(a) is type(b)
            if isinstance(a, EncodedRow):
                assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.segments, b.segments)
                assert (a.truncated, a.images_kept) == (b.truncated, b.images_kept)
            else:
                assert (a.reason, str(a)) == (b.reason, str(b))
    assert sum(isinstance(r, ConversationError) for r in whole) == 6
