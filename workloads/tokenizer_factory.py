"""Train small fast tokenizers locally, shaped like the real ones the project meets.

Nothing can be downloaded from a model hub here, yet the masking code (token
segments from offset mappings, see docs/design.md) must be exercised against the two
tokenizer families that real LLaVA-style models use:

- ``byte_bpe``: byte-level BPE as in GPT-2 / Qwen2 (ByteLevel pre-tokenizer and
  decoder, no prefix space, no BOS added).
- ``sentencepiece_bpe``: Llama-2 style BPE (Metaspace ``▁`` pre-tokenizer with
  ``prepend_scheme="first"``, ``byte_fallback`` to ``<0x00>``..``<0xFF>``,
  ``<unk>``, and a post-processor that prepends ``<s>`` like Llama).

Both are trained with the ``tokenizers`` library on whatever corpus the caller
passes and wrapped in a ``transformers.PreTrainedTokenizerFast`` with special
tokens, right padding and a ChatML chat template, so that they survive a
``save_pretrained`` / ``AutoTokenizer.from_pretrained`` round trip like a hub
tokenizer would.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Literal

import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from workloads.config import TOKENIZER_FAMILIES

TokenizerFamily = Literal["byte_bpe", "sentencepiece_bpe"]

UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
IMAGE_TOKEN = "<image>"

# Order fixes the ids: <unk>=0, <s>=1, </s>=2 as in Llama, then the rest.
SPECIAL_TOKENS: tuple[str, ...] = (
    UNK_TOKEN,
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    IMAGE_TOKEN,
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)

METASPACE = "▁"
BYTE_FALLBACK_TOKENS: tuple[str, ...] = tuple(f"<0x{b:02X}>" for b in range(256))

# ChatML. Message content may be a plain string or a list of typed parts (the
# form processors' apply_chat_template uses); an image part renders as <image>.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] }}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<image>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


def train_tokenizer(
    texts: Iterable[str],
    *,
    family: TokenizerFamily = "byte_bpe",
    vocab_size: int = 2000,
) -> transformers.PreTrainedTokenizerFast:
    """Train a BPE tokenizer of the given family on ``texts``.

    ``vocab_size`` counts everything: special tokens, the 256 byte tokens and
    the learned merges (a small corpus may yield fewer).
    """
    if family == "byte_bpe":
        backend = _train_byte_bpe(texts, vocab_size)
    elif family == "sentencepiece_bpe":
        backend = _train_sentencepiece_bpe(texts, vocab_size)
    else:
        raise ValueError(f"unknown tokenizer family {family!r}; expected one of {TOKENIZER_FAMILIES}")

    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)],
        padding_side="right",
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _train_byte_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    minimum = len(SPECIAL_TOKENS) + 256
    if vocab_size < minimum:
        raise ValueError(f"byte_bpe needs vocab_size >= {minimum}, got {vocab_size}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    # trim_offsets=False: a token's offsets cover its leading space too, so the
    # spans of consecutive tokens tile the text with no gaps.
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return backend


def _train_sentencepiece_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    minimum = len(SPECIAL_TOKENS) + len(BYTE_FALLBACK_TOKENS) + 1
    if vocab_size < minimum:
        raise ValueError(f"sentencepiece_bpe needs vocab_size >= {minimum}, got {vocab_size}")
    metaspace = pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="first", split=True)
    backend = Tokenizer(models.BPE(unk_token=UNK_TOKEN, byte_fallback=True, fuse_unk=True))
    backend.pre_tokenizer = metaspace
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(BYTE_FALLBACK_TOKENS),
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    backend = _with_byte_fallback_tokens(backend)
    backend.pre_tokenizer = metaspace
    # Llama-2's decoder: ▁ back to spaces, <0xNN> back to bytes, drop the one
    # space that the pre-tokenizer prepended.
    backend.decoder = decoders.Sequence(
        [decoders.Replace(METASPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    bos_id = backend.token_to_id(BOS_TOKEN)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0",
        pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return backend


def _with_byte_fallback_tokens(backend: Tokenizer) -> Tokenizer:
    """Put <0x00>..<0xFF> in the BPE vocab right after the special tokens, as Llama has them.

    The BPE trainer cannot be asked for them, so the trained vocab is
    renumbered: specials keep ids 0..10, bytes take the next 256 ids, learned
    tokens follow (merges name tokens by string, so they need no change).
    """
    spec = json.loads(backend.to_str())
    trained_vocab: dict[str, int] = spec["model"]["vocab"]
    ordered = list(SPECIAL_TOKENS) + list(BYTE_FALLBACK_TOKENS)
    seen = set(ordered)
    ordered += [tok for tok, _ in sorted(trained_vocab.items(), key=lambda kv: kv[1]) if tok not in seen]
    spec["model"]["vocab"] = {tok: i for i, tok in enumerate(ordered)}
    spec["added_tokens"] = [
        {**added, "id": spec["model"]["vocab"][added["content"]]} for added in spec.get("added_tokens", [])
    ]
    return Tokenizer.from_str(json.dumps(spec))
