"""Build a tiny, randomly initialized LLaVA (or LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL) that loads like a hub checkpoint.

No weights can be downloaded here, yet the training loop, the data pipeline and
the evaluation must be tested against the real transformers classes and the real
``from_pretrained`` loaders. So this module writes, with ``save_pretrained``
only, a directory that ``LlavaForConditionalGeneration.from_pretrained`` and
``AutoProcessor.from_pretrained`` load as they would load
``llava-hf/llava-1.5-7b-hf``: a CLIP vision tower, a Llama or Qwen2 language
model, a tokenizer trained on the caller's corpus (``tokenizer_factory``), a
CLIP image processor, and a ``LlavaProcessor`` that expands ``<image>`` into
exactly as many placeholder tokens as the model consumes.

`model.tiny.family` picks the family (workloads/families.py): `llava` (the
above), `llava_next` (the same CLIP tower and LM in a
``LlavaNextForConditionalGeneration`` with AnyRes pinpoints of 1x2, 2x1 and 2x2
tiles and a ``LlavaNextProcessor``) or `qwen2_vl` (a
``Qwen2VLForConditionalGeneration``: its own patch-merging vision tower, an
M-RoPE LM, a ``Qwen2VLProcessor`` whose resizing keeps images between one
merged patch and twice ``image_size`` a side) or `qwen2_5_vl` (the same in a
``Qwen2_5_VLForConditionalGeneration``, whose tower uses window attention).

Two choices come from measurements on this tiny shape:
``vision_feature_layer=-1``, because a 2-layer tower's penultimate layer kept
the model at chance for 1,200 steps (the last layer learned within 150); and
``vision_feature_select_strategy="full"``, which keeps CLS, so an image takes
(image_size / patch_size)**2 + 1 tokens. LLaVA-NeXT's unpadding needs the
CLS dropped ("default"); its tiles then take (image_size / patch_size)**2 each.
"""

from __future__ import annotations

import functools
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
from workloads.families import IMAGE_WRAPS, TINY_FAMILIES
from workloads.tokenizer_factory import IMAGE_TOKEN, train_tokenizer

QWEN2_VL_TOKENS = ("<|image_pad|>", "<|video_pad|>", *IMAGE_WRAPS["<|image_pad|>"])
"""The special tokens Qwen2-VL's processor and model use, added to the tiny tokenizer for `qwen2_vl`."""

# CLIP's normalization constants, as in openai/clip-vit-large-patch14-336.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _processor_class(name: str):
    """transformers 5 picks a torchvision backend for image processors and falls back, with a warning, to
    the PIL one when torchvision is missing; ask for the PIL one directly then. Both save the same
    preprocessor_config.json."""
    import transformers

    try:
        import torchvision  # noqa: F401

        return getattr(transformers, name)
    except ImportError:
        return getattr(transformers, name + "Pil")


def _image_processor(image_size: int):
    """A CLIP image processor that resizes straight to image_size (no crop beyond that) and normalizes."""
    return _processor_class("CLIPImageProcessor")(
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


def _clip_config(spec: TinyModelConfig) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 4,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )


def _llava(spec: TinyModelConfig, tokenizer, special_ids: dict[str, int]):
    config = LlavaConfig(
        vision_config=_clip_config(spec),
        text_config=_text_config(spec, len(tokenizer), special_ids),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_seq_length=(spec.image_size // spec.patch_size) ** 2 + 1,
        **special_ids,
    )
    processor = LlavaProcessor(
        image_processor=_image_processor(spec.image_size),
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
        chat_template=tokenizer.chat_template,
    )
    return LlavaForConditionalGeneration(config), processor


def _llava_next(spec: TinyModelConfig, tokenizer, special_ids: dict[str, int]):
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor

    side = spec.image_size
    pinpoints = [[side, 2 * side], [2 * side, side], [2 * side, 2 * side]]  # (height, width), as LLaVA-NeXT's
    config = LlavaNextConfig(
        vision_config=_clip_config(spec),
        text_config=_text_config(spec, len(tokenizer), special_ids),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=pinpoints,
        **special_ids,
    )
    image_processor = _processor_class("LlavaNextImageProcessor")(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        image_grid_pinpoints=pinpoints,
        do_pad=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
        chat_template=tokenizer.chat_template,
    )
    return LlavaNextForConditionalGeneration(config), processor


def _qwen2_vl(spec: TinyModelConfig, tokenizer, special_ids: dict[str, int], family: str = "qwen2_vl"):
    """Qwen2-VL, or with `family="qwen2_5_vl"` Qwen2.5-VL: its tower's RMSNorm / SwiGLU blocks, window
    attention over windows of 2x2 merged patches, full attention in the last block."""
    import transformers

    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN2_VL_TOKENS)})
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN2_VL_TOKENS}
    head_dim = spec.text_hidden // spec.text_heads
    if head_dim % 8:
        raise ValueError(f"{family}: text_hidden / text_heads = {head_dim} must be a multiple of 8 (M-RoPE sections)")
    quarter = head_dim // 8  # M-RoPE splits each head's rotary half into temporal, height and width sections
    text = _text_config(spec, len(tokenizer), special_ids).to_dict()
    text.update(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [
        2 * quarter, quarter, quarter]})  # fmt: skip
    merge = 2
    vision = dict(
        depth=spec.vision_layers,
        num_heads=spec.vision_heads,
        patch_size=spec.patch_size,
        spatial_merge_size=merge,
        temporal_patch_size=2,
    )
    if family == "qwen2_5_vl":
        vision.update(
            hidden_size=spec.vision_hidden,
            intermediate_size=spec.vision_hidden * 4,
            out_hidden_size=spec.text_hidden,
            window_size=2 * spec.patch_size * merge,
            fullatt_block_indexes=[spec.vision_layers - 1],
        )
        config_class, model_class = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
    else:
        vision.update(embed_dim=spec.vision_hidden, hidden_size=spec.text_hidden)
        config_class, model_class = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    config = config_class(
        text_config={k: v for k, v in text.items() if k not in ("model_type", "architectures", "transformers_version")},
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        **special_ids,
    )
    factor = spec.patch_size * merge
    image_processor = _processor_class("Qwen2VLImageProcessor")(
        size={"shortest_edge": factor * factor, "longest_edge": (2 * spec.image_size) ** 2},
        patch_size=spec.patch_size,
        merge_size=merge,
        temporal_patch_size=2,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    return model_class(config), _qwen2_vl_processor(image_processor, tokenizer, family)


def _qwen2_vl_processor(image_processor, tokenizer, family: str):
    """A `Qwen2VLProcessor` where torchvision is installed; else the image processor alone: the processor's
    constructor demands a video processor, which needs torchvision. l2t loads a model's tokenizer and image
    processor apart (AutoTokenizer, AutoImageProcessor) for every family, so the folder serves it either way."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor

    try:
        from transformers import Qwen2VLVideoProcessor

        video_processor = Qwen2VLVideoProcessor(patch_size=image_processor.patch_size, merge_size=2)
    except ImportError:
        return image_processor
    processor_class = Qwen2_5_VLProcessor if family == "qwen2_5_vl" else Qwen2VLProcessor
    return processor_class(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor)


_BUILDERS = {
    "llava": _llava,
    "llava_next": _llava_next,
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": functools.partial(_qwen2_vl, family="qwen2_5_vl"),
}


def build_tiny_model(
    out_dir: Path, corpus: Iterable[str], spec: TinyModelConfig | None = None, *, seed: int = 0
) -> Path:
    """Write a randomly initialized tiny model of `spec.family`, its tokenizer and processor to ``out_dir``;
    returns ``out_dir``.

    `spec` is the config's `model.tiny` section (defaults when None); `seed` seeds the weights.
    """
    spec = spec or TinyModelConfig()
    if spec.image_size % spec.patch_size:
        raise ValueError(f"image_size {spec.image_size} is not a multiple of patch_size {spec.patch_size}")
    if spec.family not in _BUILDERS:
        raise ValueError(f"unknown tiny family {spec.family!r}; expected one of {TINY_FAMILIES}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = train_tokenizer(corpus, family=spec.tokenizer_family, vocab_size=spec.vocab_size)
    special_ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    torch.manual_seed(seed)
    model, processor = _BUILDERS[spec.family](spec, tokenizer, special_ids)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id

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
