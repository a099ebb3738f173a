"""The locally trained tokenizers behave like the hub tokenizers they stand in for."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from workloads.tokenizer_factory import SPECIAL_TOKENS, TOKENIZER_FAMILIES, train_tokenizer

CORPUS = [
    "A red circle above a blue square.",
    "What color is the circle?\nAnswer the question using a single word or phrase.",
    "Is there a green triangle in the image? Yes",
    "USER: <image>\nDescribe the image. ASSISTANT: A small yellow star on the left.",
    "How many shapes are there? 2",
    "Héllo wörld, naïve café: ünïcode 日本語 €5.",
] * 40

SAMPLE_TEXTS = [
    "USER: <image>\nWhat color is the circle? ASSISTANT: Red</s>",
    "A purple hexagon to the right of an orange square.",
    "<|im_start|>user\n<image>\nHow many shapes are there?<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n",
    "Tabs\tand  double spaces, café 日本語 € and unseen ü∑ characters.",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
]

_BYTE_LEVEL_TO_BYTE = {char: byte for byte, char in bytes_to_unicode().items()}


@pytest.fixture(scope="module", params=TOKENIZER_FAMILIES)
def tokenizer(request):
    return train_tokenizer(CORPUS, family=request.param, vocab_size=500)


def _token_bytes(tokenizer, token: str) -> bytes:
    """The raw bytes one token stands for, read off its vocabulary string."""
    if token in SPECIAL_TOKENS:
        return token.encode()
    if _is_byte_level(tokenizer):
        return bytes(_BYTE_LEVEL_TO_BYTE[c] for c in token)
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        return bytes([int(token[3:5], 16)])
    return token.replace("▁", " ").encode()


def _is_byte_level(tokenizer) -> bool:
    return type(tokenizer.backend_tokenizer.pre_tokenizer).__name__ == "ByteLevel"


@pytest.mark.parametrize("text", SAMPLE_TEXTS)
def test_offsets_map_back_to_text(tokenizer, text):
    encoding = tokenizer([text], add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"][0], encoding["offset_mapping"][0]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert len(ids) == len(offsets) > 0

    # Tokens sharing one span (the bytes of one character) are grouped; each
    # group's bytes must spell exactly the text under its span.
    groups: list[tuple[tuple[int, int], bytes]] = []
    for token, span in zip(tokens, offsets):
        span = tuple(span)
        if groups and groups[-1][0] == span:
            groups[-1] = (span, groups[-1][1] + _token_bytes(tokenizer, token))
        else:
            groups.append((span, _token_bytes(tokenizer, token)))

    cursor = 0
    for index, ((start, end), piece) in enumerate(groups):
        assert start == cursor, f"gap or overlap before group {index}: {groups}"
        spelled = piece.decode()
        if index == 0 and not _is_byte_level(tokenizer) and not text.startswith(" "):
            spelled = spelled.removeprefix(" ")  # the ▁ that Metaspace prepends to the first word
        assert spelled == text[start:end]
        cursor = end
    assert cursor == len(text)


@pytest.mark.parametrize("text", SAMPLE_TEXTS)
def test_decode_encode_round_trip(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_special_tokens_are_single_and_never_split(tokenizer):
    assert tokenizer.bos_token == "<s>"
    assert tokenizer.eos_token == "</s>"
    assert tokenizer.unk_token == "<unk>"
    assert tokenizer.pad_token == "<pad>"
    assert tokenizer.padding_side == "right"
    for special in SPECIAL_TOKENS:
        special_id = tokenizer.convert_tokens_to_ids(special)
        assert tokenizer.encode(special, add_special_tokens=False) == [special_id]
        ids = tokenizer(f"x{special}y", add_special_tokens=False)["input_ids"]
        assert special_id in ids
        assert special in tokenizer.all_special_tokens
    assert len(set(tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)))) == len(SPECIAL_TOKENS)


def test_right_padding_uses_pad_token(tokenizer):
    batch = tokenizer(["a red circle", "a"], add_special_tokens=False, padding=True)
    short_ids, short_mask = batch["input_ids"][1], batch["attention_mask"][1]
    assert short_mask[0] == 1 and short_mask[-1] == 0
    assert short_ids[-1] == tokenizer.pad_token_id


def test_family_specific_behaviour():
    byte_bpe = train_tokenizer(CORPUS, family="byte_bpe", vocab_size=500)
    sentencepiece = train_tokenizer(CORPUS, family="sentencepiece_bpe", vocab_size=500)
    # Qwen2-like: no BOS; Llama-like: BOS prepended by default.
    assert byte_bpe("red")["input_ids"][0] != byte_bpe.bos_token_id
    assert sentencepiece("red")["input_ids"][0] == sentencepiece.bos_token_id
    # Llama-like byte fallback for characters never seen in training.
    assert "<0xE2>" in sentencepiece.convert_ids_to_tokens(sentencepiece.encode("∑", add_special_tokens=False))
    assert sentencepiece.convert_tokens_to_ids("<0x00>") == len(SPECIAL_TOKENS)
    assert len(byte_bpe) <= 500 and len(sentencepiece) <= 500


def test_save_and_auto_load_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in SAMPLE_TEXTS:
        original = tokenizer(text, return_offsets_mapping=True)
        reloaded = loaded(text, return_offsets_mapping=True)
        assert reloaded["input_ids"] == original["input_ids"]
        assert reloaded["offset_mapping"] == original["offset_mapping"]
        assert loaded.decode(reloaded["input_ids"], skip_special_tokens=True) == tokenizer.decode(
            original["input_ids"], skip_special_tokens=True
        )
    assert (loaded.bos_token, loaded.eos_token, loaded.unk_token, loaded.pad_token) == ("<s>", "</s>", "<unk>", "<pad>")
    assert loaded.padding_side == "right"
    assert loaded.chat_template == tokenizer.chat_template
    assert set(SPECIAL_TOKENS) <= set(loaded.all_special_tokens)


def test_chat_template_renders_chatml(tokenizer):
    messages = [
        {"role": "user", "content": "<image>\nWhat color is the circle?"},
        {"role": "assistant", "content": "Red"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == (
        "<|im_start|>user\n<image>\nWhat color is the circle?<|im_end|>\n<|im_start|>assistant\nRed<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")

    # Processor-style typed content: an image part renders as the placeholder.
    typed = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nDescribe the image."}]}]
    assert tokenizer.apply_chat_template(typed, tokenize=False) == (
        "<|im_start|>user\n<image>\nDescribe the image.<|im_end|>\n"
    )
    ids = tokenizer.apply_chat_template(messages, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in ids


def test_rejects_unknown_family_and_tiny_vocab():
    with pytest.raises(ValueError):
        train_tokenizer(CORPUS, family="wordpiece")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        train_tokenizer(CORPUS, family="sentencepiece_bpe", vocab_size=100)
