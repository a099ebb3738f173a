"""The tiny LLaVA loads like a hub checkpoint, runs, and can learn to look at its image."""

from __future__ import annotations

import copy
import json
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    LlavaForConditionalGeneration,
)

from workloads.config import TinyModelConfig
from workloads.model import num_image_tokens
from workloads.synthetic import generate_records, make_scene, render_scene
from workloads.tiny_model import build_tiny_model

PROMPT = "USER: <image>\nWhat color? ASSISTANT:"
COLOR_PROMPT = "USER: <image>\nWhat color is the shape? ASSISTANT:"


def _corpus() -> list[str]:
    texts = [turn["value"] for record in generate_records(1500, seed=0) for turn in record["conversations"]]
    return texts + ["USER: ASSISTANT: What color is the shape?"]


@pytest.fixture(scope="module", params=[("llama", "sentencepiece_bpe"), ("qwen2", "byte_bpe")], ids=lambda p: p[0])
def model_dir(request, tmp_path_factory):
    lm, family = request.param
    return build_tiny_model(
        tmp_path_factory.mktemp(f"tiny-{lm}"), _corpus(), TinyModelConfig(lm=lm, tokenizer_family=family)
    )


@pytest.fixture(scope="module")
def loaded(model_dir):
    model = LlavaForConditionalGeneration.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    return model, processor


def test_directory_loads_with_auto_classes(model_dir, loaded):
    model, processor = loaded
    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert config.model_type == "llava"
    assert config.vision_feature_layer == -1
    assert config.vision_feature_select_strategy == "full"
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    assert config.image_seq_length == num_image_tokens(config) == (32 // 8) ** 2 + 1
    assert config.text_config.pad_token_id == tokenizer.pad_token_id
    assert config.text_config.vocab_size == len(tokenizer)
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert processor.tokenizer.chat_template == tokenizer.chat_template
    spec = json.loads((model_dir / "tiny_model_spec.json").read_text())
    assert spec["lm"] == config.text_config.model_type


def test_image_processor_resizes_to_image_size(model_dir):
    image_processor = AutoImageProcessor.from_pretrained(model_dir)
    pixels = image_processor(Image.new("RGB", (80, 48), (220, 20, 20)), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)
    assert pixels[0, 0].mean() > 0.5 > pixels[0, 1].mean()  # normalized: lots of red, little green


def test_processor_expands_image_placeholder(loaded):
    model, processor = loaded
    image = render_scene(make_scene(0, 0))
    inputs = processor(images=image, text=PROMPT, return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 32, 32)
    image_tokens = (inputs["input_ids"] == model.config.image_token_id).sum().item()
    assert image_tokens == num_image_tokens(model.config) == 17


def test_num_image_tokens_follows_the_select_strategy(loaded):
    model, _ = loaded
    config = copy.deepcopy(model.config)
    config.vision_feature_select_strategy = "default"
    assert num_image_tokens(config) == 16


def test_forward_with_labels_and_generate(loaded):
    model, processor = loaded
    images = [render_scene(make_scene(0, i)) for i in range(2)]
    inputs = processor(images=images, text=[PROMPT + " Red", PROMPT], return_tensors="pt", padding=True)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        output = model(**inputs, labels=labels)
    assert torch.isfinite(output.loss)
    prompt_inputs = processor(images=images[:1], text=PROMPT, return_tensors="pt")
    generated = model.generate(**prompt_inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > prompt_inputs["input_ids"].shape[1]


def test_parameter_count_is_small(loaded):
    model, _ = loaded
    parameters = sum(p.numel() for p in model.parameters())
    print(f"tiny llava ({model.config.text_config.model_type}): {parameters:,} parameters")
    assert parameters < 3_000_000


def test_build_is_deterministic(tmp_path):
    corpus = _corpus()
    spec = TinyModelConfig(lm="llama", tokenizer_family="byte_bpe")
    first = build_tiny_model(tmp_path / "a", corpus, spec, seed=3)
    second = build_tiny_model(tmp_path / "b", corpus, spec, seed=3)
    assert (first / "tokenizer.json").read_text() == (second / "tokenizer.json").read_text()
    weights_a, weights_b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[name], weights_b[name]) for name in weights_a)


def test_rejects_bad_specs(tmp_path):
    with pytest.raises(ValueError):
        build_tiny_model(tmp_path / "x", _corpus(), TinyModelConfig(lm="gpt2"))
    with pytest.raises(ValueError):
        build_tiny_model(tmp_path / "y", _corpus(), TinyModelConfig(image_size=30))


def _color_question_batch(processor, start: int, count: int):
    """One-shape scenes asked "What color is the shape?"; labels only on the answer and end of turn."""
    tokenizer = processor.tokenizer
    scenes = [make_scene(5, index, max_objects=1) for index in range(start, start + count)]
    answers = [f" {scene.objects[0].color.capitalize()}{tokenizer.eos_token}" for scene in scenes]
    inputs = processor(
        images=[render_scene(scene) for scene in scenes],
        text=[COLOR_PROMPT + answer for answer in answers],
        return_tensors="pt",
        padding=True,
    )
    prompt_length = processor(images=render_scene(scenes[0]), text=COLOR_PROMPT, return_tensors="pt")[
        "input_ids"
    ].shape[1]
    labels = inputs["input_ids"].clone()
    labels[:, :prompt_length] = -100
    labels[inputs["attention_mask"] == 0] = -100
    return inputs, labels


def _answer_accuracy(model, inputs, labels) -> float:
    """Share of rows whose every answer token is the argmax under teacher forcing (greedy exact match)."""
    model.eval()
    with torch.no_grad():
        predictions = model(**inputs).logits[:, :-1].argmax(-1)
    model.train()
    targets = labels[:, 1:]
    return ((predictions == targets) | (targets == -100)).all(-1).float().mean().item()


def test_learns_to_read_the_color_from_the_image(tmp_path):
    """Plain AdamW on answer tokens: held-out color accuracy goes from chance (1/6) to near perfect.

    An earlier measurement saw 100% within ~150 steps at batch 32, lr 1e-3; here it takes about 50.
    """
    model_dir = build_tiny_model(tmp_path / "learner", _corpus(), TinyModelConfig(), seed=0)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    train_inputs, train_labels = _color_question_batch(processor, 0, 512)
    held_out_inputs, held_out_labels = _color_question_batch(processor, 10**9, 128)

    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    started, accuracy, steps = time.perf_counter(), _answer_accuracy(model, held_out_inputs, held_out_labels), 0
    assert accuracy < 0.4
    while steps < 300 and accuracy < 0.9:
        for _ in range(25):
            batch = torch.randint(0, len(train_labels), (32,))
            loss = model(
                input_ids=train_inputs["input_ids"][batch],
                attention_mask=train_inputs["attention_mask"][batch],
                pixel_values=train_inputs["pixel_values"][batch],
                labels=train_labels[batch],
            ).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        steps += 25
        accuracy = _answer_accuracy(model, held_out_inputs, held_out_labels)
    print(f"color accuracy {accuracy:.2f} after {steps} steps, {time.perf_counter() - started:.1f} s")
    assert accuracy >= 0.9
