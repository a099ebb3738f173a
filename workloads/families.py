"""Model families: what differs between LLaVA, LLaVA-NeXT and Qwen2-VL, in one place.

l2t trains any image-text model whose image placeholders become image features
inside the model's own forward. What changes from one family to the next is
listed here and nowhere else: the transformers model and processor classes,
the default chat template, the image token, which parameters are the vision
tower and which the connector, what the model needs besides the pixels to
place each image (`image_grid`), and how many tokens an image takes.

- `llava` (`LlavaForConditionalGeneration`): every image is resized to the
  tower's square, so it takes a fixed count (`workloads.model.num_image_tokens`).
- `llava_next` (`LlavaNextForConditionalGeneration`, AnyRes): the image is cut
  into tiles of the best grid among `image_grid_pinpoints` plus a base view;
  the tiles' features are unpadded to the image's aspect ratio and each row of
  them ends with an `image_newline` feature. Its count depends on the size.
- `qwen2_vl` / `qwen2_5_vl` (Qwen2-VL's dynamic resolution, M-RoPE): the image
  is resized to multiples of patch x merge (`smart_resize`) and every merge x
  merge block of patches is one token; the pixels travel as flattened patches
  with `image_grid_thw`, and the positions of image tokens are 3-D (the model
  computes them from `mm_token_type_ids`). Its image pad token sits between
  `<|vision_start|>` and `<|vision_end|>` (chat_templates.py writes them).

`image_token_count` computes an image's count from its size alone, with the
model's own arithmetic, so preparation reads only image headers (PIL's
``Image.open(path).size`` does not decode pixels); the tests check it against
what transformers' processors and models expand each image to.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

FAMILY_NAMES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
"""Families l2t trains, by the `model_type` of the checkpoint's config.json."""
TINY_FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
"""Families the tiny preset builds (`model.tiny.family`)."""


@dataclass(frozen=True)
class Family:
    name: str
    model_class: str
    """The transformers class (`AutoModelForImageTextToText` loads it from the config)."""
    processor_class: str
    chat_template: str
    """The l2t chat template its checkpoints were trained with."""
    image_token: str
    """The token each image placeholder becomes, repeated once per image feature."""
    image_grid: str | None
    """The forward's argument that places each image besides its pixels: `image_sizes` (LLaVA-NeXT: the
    original height and width), `image_grid_thw` (Qwen2-VL: temporal, height, width patches), or None."""
    connector: tuple[str, ...]
    """Parameter-name fragments of the connector (what `freeze: connector_only` trains)."""
    vision_tower: tuple[str, ...]
    """Parameter-name fragments of the vision tower (the connector excepted)."""
    fixed_image_tokens: bool
    """Whether every image takes the same number of tokens whatever its size."""

    def is_connector(self, parameter: str) -> bool:
        return any(part in parameter for part in self.connector)

    def is_vision_tower(self, parameter: str) -> bool:
        return any(part in parameter for part in self.vision_tower) and not self.is_connector(parameter)


_QWEN_VL = dict(
    chat_template="qwen2",
    image_token="<|image_pad|>",
    image_grid="image_grid_thw",
    connector=("visual.merger",),
    vision_tower=("visual.",),
    fixed_image_tokens=False,
)
FAMILIES = {
    "llava": Family(
        "llava", "LlavaForConditionalGeneration", "LlavaProcessor", "vicuna_v1", "<image>", None,
        ("multi_modal_projector",), ("vision_tower",), True,
    ),
    "llava_next": Family(
        "llava_next", "LlavaNextForConditionalGeneration", "LlavaNextProcessor", "vicuna_v1", "<image>",
        "image_sizes", ("multi_modal_projector", "image_newline"), ("vision_tower",), False,
    ),
    "qwen2_vl": Family("qwen2_vl", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor", **_QWEN_VL),
    "qwen2_5_vl": Family("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor", **_QWEN_VL),
}  # fmt: skip
IMAGE_WRAPS = {"<|image_pad|>": ("<|vision_start|>", "<|vision_end|>")}
"""Text around an image's tokens, by image token: Qwen2-VL writes its pad tokens between these two."""


def family_of(config) -> Family:
    """The family of a model config (a transformers config or its `config.json` as a dict)."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    family = FAMILIES.get(str(model_type))
    if family is None:
        raise ValueError(
            f"model_type {model_type!r} is not a family l2t trains; expected one of {FAMILY_NAMES} "
            "(an image-text model whose forward turns image tokens into image features)"
        )
    return family


def image_token_count(config, image_processor, width: int, height: int) -> int:
    """Tokens an image of `width` x `height` pixels takes in the LM input of a model of `config`.

    `image_processor` is the model's (Qwen2-VL's resizing bounds live there; LLaVA and LLaVA-NeXT
    need only the config)."""
    family = family_of(config)
    if family.fixed_image_tokens:
        from workloads.model import num_image_tokens

        return num_image_tokens(config)
    if family.name == "llava_next":
        return _anyres_tokens(config, int(height), int(width))
    merge = image_processor.merge_size
    return int(image_processor.get_number_of_image_patches(int(height), int(width), {})) // (merge * merge)


def _anyres_tokens(config, height: int, width: int) -> int:
    """LLaVA-NeXT's count, by the model's own steps (`LlavaNextModel.pack_image_features`): the base view's
    patches, then the tiles' patch grid unpadded to the image's aspect ratio, one newline per grid row."""
    import torch
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    base = side * side
    if config.vision_feature_select_strategy == "full" and "siglip" not in str(vision.model_type):
        raise ValueError("llava_next with a CLS token needs vision_feature_select_strategy='default'")
    rows, columns = get_anyres_image_grid_shape((height, width), config.image_grid_pinpoints, vision.image_size)
    grid = unpad_image(torch.empty(0, rows * side, columns * side), (height, width))
    return base + grid.shape[1] * (grid.shape[2] + 1)


def nominal_image_tokens(config) -> int:
    """`EncodeSpec.num_image_tokens` for a model: its fixed count, or 0 when each image's count depends on its
    size and rows carry their own counts (`image_token_count`)."""
    if family_of(config).fixed_image_tokens:
        from workloads.model import num_image_tokens

        return num_image_tokens(config)
    return 0


def image_settings(config) -> dict:
    """The `EncodeSpec` arguments a model decides: `num_image_tokens` (0: per image) and `image_token`."""
    return {"num_image_tokens": nominal_image_tokens(config), "image_token": family_of(config).image_token}


class ImageTokenCounter:
    """Image-token counts of one model by image size (cached: data sets repeat sizes)."""

    def __init__(self, config, image_processor):
        self.config, self.image_processor = config, image_processor
        self.family = family_of(config)
        self.count = functools.lru_cache(maxsize=65536)(self._count)

    def _count(self, width: int, height: int) -> int:
        return image_token_count(self.config, self.image_processor, width, height)

    def counts(self, sizes: Sequence[tuple[int, int]]) -> list[int]:
        """Counts of images given as (width, height), PIL's `Image.size` order."""
        return [self.count(int(w), int(h)) for w, h in sizes]


@functools.lru_cache(maxsize=4)
def counter_for(model_dir: str) -> ImageTokenCounter:
    """The `ImageTokenCounter` of a model folder or hub id (one per process)."""
    from transformers import AutoConfig, AutoImageProcessor

    config = AutoConfig.from_pretrained(model_dir)
    processor = None if family_of(config).fixed_image_tokens else AutoImageProcessor.from_pretrained(model_dir)
    return ImageTokenCounter(config, processor)


# ---------------------------------------------------------------- pixels


def image_inputs(image_processor, images: list) -> dict[str, np.ndarray]:
    """The processor's outputs a forward takes for `images`: `pixel_values` and the family's image grid."""
    out = image_processor(images=images, return_tensors="np")
    return {k: np.asarray(out[k]) for k in ("pixel_values", "image_sizes", "image_grid_thw") if k in out}


def pixel_rows(inputs: dict[str, np.ndarray]) -> np.ndarray:
    """How many rows of `pixel_values` each image holds: its patches for Qwen2-VL, else 1."""
    if "image_grid_thw" in inputs:
        return np.prod(inputs["image_grid_thw"], axis=-1).astype(np.int64)
    return np.ones(len(inputs["pixel_values"]), dtype=np.int64)


def concatenate_pixels(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Pixel values of several rows along the image axis; LLaVA-NeXT's tiles are padded to the most tiles (the
    model drops the padding by `image_sizes`)."""
    shapes = {a.shape[1:] for a in arrays}
    if len(shapes) == 1:
        return np.concatenate(arrays, axis=0)
    tiles = max(a.shape[1] for a in arrays)
    padded = [np.pad(a, [(0, 0), (0, tiles - a.shape[1])] + [(0, 0)] * (a.ndim - 2)) for a in arrays]
    return np.concatenate(padded, axis=0)
