"""A Qwen2-style tokenizer for tests: byte-level BPE behind Qwen2's own pre-tokenizer pattern.

The factory's byte_bpe family (workloads/tokenizer_factory.py) pre-tokenizes
with GPT-2's pattern, which keeps the newline before a word apart from the
newlines before it; Qwen2's makes one pre-token of a run of newlines, and
that is where a reply starting with "\\n" met the template's "\\n"."""

from __future__ import annotations

from workloads.tokenizer_factory import CHATML_TEMPLATE, SPECIAL_TOKENS

# Qwen2's pre-tokenizer pattern (its tokenizer.json): "\s*[\r\n]+" makes a run of newlines one pre-token, so
# "<|im_start|>assistant\n" + "\nThe" tokenizes the two newlines as one token "\n\n".
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def train_qwen2_style(texts: list[str], vocab_size: int = 2000):
    """Byte-level BPE set up as Qwen2's tokenizer.json is: NFC, Split(pattern, isolated) then ByteLevel."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<unk>", "<s>", "</s>", "<pad>")],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer
