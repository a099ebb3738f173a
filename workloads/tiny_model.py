"""Build a tiny, randomly initialized LLaVA that loads like a hub checkpoint.

No weights can be downloaded here, yet the training loop, the data pipeline and
the evaluation must be tested against the real transformers classes and the real
``from_pretrained`` loaders. So this module writes, with ``save_pretrained``
only, a directory that ``LlavaForConditionalGeneration.from_pretrained`` and
``AutoProcessor.from_pretrained`` load as they would load
``llava-hf/llava-1.5-7b-hf``: a CLIP vision tower, a Llama or Qwen2 language
model, a tokenizer trained on the caller's corpus (``tokenizer_factory``), a
CLIP image processor, and a ``LlavaProcessor`` that expands ``<image>`` into
exactly as many placeholder tokens as the model consumes.

Two choices come from measurements on this tiny shape:
``vision_feature_layer=-1``, because a 2-layer tower's penultimate layer kept
the model at chance for 1,200 steps (the last layer learned within 150); and
``vision_feature_select_strategy="full"``, which keeps CLS, so an image takes
(image_size / patch_size)**2 + 1 tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    Qwen2Config,
)

from workloads.config import TINY_LANGUAGE_MODELS, TinyModelConfig
from workloads.tokenizer_factory import IMAGE_TOKEN, train_tokenizer

# CLIP's normalization constants, as in openai/clip-vit-large-patch14-336.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _image_processor(image_size: int):
    """A CLIP image processor that resizes straight to image_size (no crop beyond that) and normalizes.

    transformers 5 picks a torchvision backend for ``CLIPImageProcessor`` and
    falls back, with a warning, to the PIL one when torchvision is missing; ask
    for the PIL one directly then. Both save the same preprocessor_config.json.
    """
    try:
        import torchvision  # noqa: F401
        from transformers import CLIPImageProcessor as processor_class
    except ImportError:
        from transformers import CLIPImageProcessorPil as processor_class
    return processor_class(
        size={"height": image_size, "width": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_resize=True,
        do_center_crop=False,
        do_rescale=True,
        do_normalize=True,
        do_convert_rgb=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


def _text_config(spec: TinyModelConfig, vocab_size: int, special_ids: dict[str, int]):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        **special_ids,
    )
    if spec.lm == "llama":
        return LlamaConfig(**common)
    if spec.lm == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(f"unknown language model {spec.lm!r}; expected one of {TINY_LANGUAGE_MODELS}")


def build_tiny_model(
    out_dir: Path, corpus: Iterable[str], spec: TinyModelConfig | None = None, *, seed: int = 0
) -> Path:
    """Write a randomly initialized tiny LLaVA, its tokenizer and processor to ``out_dir``; returns ``out_dir``.

    `spec` is the config's `model.tiny` section (defaults when None); `seed` seeds the weights.
    """
    spec = spec or TinyModelConfig()
    if spec.image_size % spec.patch_size:
        raise ValueError(f"image_size {spec.image_size} is not a multiple of patch_size {spec.patch_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = train_tokenizer(corpus, family=spec.tokenizer_family, vocab_size=spec.vocab_size)
    special_ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    vision_config = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 4,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=_text_config(spec, len(tokenizer), special_ids),
        image_token_id=image_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_seq_length=(spec.image_size // spec.patch_size) ** 2 + 1,
        **special_ids,
    )

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id

    processor = LlavaProcessor(
        image_processor=_image_processor(spec.image_size),
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
        chat_template=tokenizer.chat_template,
    )

    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    # The processor saves its tokenizer, but write it explicitly so the
    # directory also serves AutoTokenizer alone.
    tokenizer.save_pretrained(out_dir)
    # The spec that built this directory, for the record (nothing loads it).
    (out_dir / "tiny_model_spec.json").write_text(
        json.dumps({**spec.model_dump(mode="json"), "seed": seed}, indent=2) + "\n"
    )
    return out_dir
