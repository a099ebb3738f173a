"""Models: freeze policies, TinyLLaVA-style composition, gradient checkpointing, FLOPs for MFU (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from workloads.model import (
    QWEN2_0_5B,
    TrainingFlops,
    apply_freeze_policy,
    attention_implementation,
    compose_llava,
    load_model,
    mfu,
    num_image_tokens,
    peak_flops,
    tinyllava_config,
)

CORPUS = ["USER: What color is the shape? ASSISTANT: Red.", "A small blue circle on a white background."] * 50


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A tiny Qwen2 LM and two tiny SigLIP towers (vision-only and a whole SigLIP model), saved like hub checkpoints."""
    from transformers import (
        Qwen2Config,
        Qwen2ForCausalLM,
        SiglipConfig,
        SiglipImageProcessorPil,
        SiglipModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    from workloads.tokenizer_factory import train_tokenizer

    root = tmp_path_factory.mktemp("parts")
    tokenizer = train_tokenizer(CORPUS, family="byte_bpe", vocab_size=400)
    torch.manual_seed(1)
    lm = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tokenizer) + 8,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
    )
    lm.save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14
    )
    processor = SiglipImageProcessorPil(size={"height": 28, "width": 28})
    SiglipVisionModel(SiglipVisionConfig(**vision)).save_pretrained(root / "siglip-vision")
    processor.save_pretrained(root / "siglip-vision")
    whole = SiglipModel(
        SiglipConfig(
            vision_config=vision,
            text_config=dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100
            ),
        )
    )
    whole.save_pretrained(root / "siglip-whole")
    processor.save_pretrained(root / "siglip-whole")
    return root


@pytest.mark.parametrize("tower", ["siglip-vision", "siglip-whole"])
def test_tinyllava_composition_loads_like_a_llava_checkpoint(parts, tower, tmp_path):
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

    out = compose_llava(tmp_path / "composed", str(parts / "lm"), str(parts / tower))
    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.config.vision_config.model_type == "siglip_vision_model"
    assert (
        model.config.vision_feature_select_strategy == "full" and num_image_tokens(model.config) == 4
    )  # (28/14)², no CLS

    # The LM's and the tower's weights came through; the connector is new.
    lm = AutoModelForCausalLM.from_pretrained(parts / "lm")
    source = AutoModel.from_pretrained(parts / tower)
    source_vision = getattr(source, "vision_model", source)
    target_vision = getattr(model.model.vision_tower, "vision_model", model.model.vision_tower)
    torch.testing.assert_close(
        model.model.language_model.layers[1].mlp.up_proj.weight, lm.model.layers[1].mlp.up_proj.weight
    )
    torch.testing.assert_close(
        target_vision.encoder.layers[0].self_attn.q_proj.weight, source_vision.encoder.layers[0].self_attn.q_proj.weight
    )
    assert (
        model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    )  # tied, like Qwen2-0.5B

    image = Image.new("RGB", (40, 40), (10, 200, 10))
    inputs = processor(
        images=[image], text=["USER: <image>\nWhat color is the shape? ASSISTANT: Green."], return_tensors="pt"
    )
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 4
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, -100)
    apply_freeze_policy(model, "vision_tower")
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    assert target_vision.encoder.layers[0].self_attn.q_proj.weight.grad is None
    prompt = processor(images=[image], text=["USER: <image>\nWhat color? ASSISTANT:"], return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


def test_tinyllava_0_5b_shape():
    with torch.device("meta"):
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration(tinyllava_config())
    lm = sum(p.numel() for p in model.model.language_model.parameters())
    vision = sum(p.numel() for p in model.model.vision_tower.parameters())
    assert 490e6 < lm < 500e6  # Qwen2-0.5B: 494M with tied embeddings
    assert 390e6 < vision < 430e6  # SigLIP-so400m without its pooling head
    assert num_image_tokens(model.config) == 729 and model.config.text_config.hidden_size == QWEN2_0_5B["hidden_size"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return tiny_model_dir


@pytest.mark.parametrize(
    "policy, trains",
    [
        ("connector_only", {"multi_modal_projector"}),
        ("vision_tower", {"multi_modal_projector", "language_model", "lm_head"}),
        ("none", {"multi_modal_projector", "language_model", "lm_head", "vision_tower"}),
    ],
)
def test_freeze_policies(tiny, policy, trains):
    model = load_model(tiny)
    counts = apply_freeze_policy(model, policy)
    parts = {"multi_modal_projector", "language_model", "lm_head", "vision_tower"}
    trained = {part for part in parts for name, p in model.named_parameters() if part in name and p.requires_grad}
    frozen = {part for part in parts for name, p in model.named_parameters() if part in name and not p.requires_grad}
    assert trained == trains and frozen == parts - trains
    assert (
        counts.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) < counts.total
        or policy == "none"
    )
    with pytest.raises(ValueError, match="unknown freeze policy"):
        apply_freeze_policy(model, "lm_only")


def _one_backward(model, seed=0):
    torch.manual_seed(seed)
    config = model.config
    ids = torch.randint(5, 100, (2, 30))
    ids[:, 2 : 2 + num_image_tokens(config)] = config.image_token_id
    pixels = torch.randn(2, 3, config.vision_config.image_size, config.vision_config.image_size)
    model.zero_grad()
    loss = model(input_ids=ids, pixel_values=pixels, labels=ids.masked_fill(ids == config.image_token_id, -100)).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("policy", ["vision_tower", "connector_only"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny, policy):
    """Non-reentrant checkpointing: frozen embeddings/tower still pass gradients to what trains."""
    plain = load_model(tiny)
    checkpointed = load_model(tiny, gradient_checkpointing=True)
    apply_freeze_policy(plain, policy)
    apply_freeze_policy(checkpointed, policy)
    checkpointed.train()
    plain.train()
    assert any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.modules())
    loss_a, grads_a = _one_backward(plain)
    loss_b, grads_b = _one_backward(checkpointed)
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert set(grads_a) == set(grads_b) and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7)


def test_attention_choice(monkeypatch, caplog):
    import workloads.model as model_module

    assert attention_implementation("auto", False, torch.float32) == "sdpa"
    assert attention_implementation("eager", True, torch.bfloat16) == "eager"
    caplog.set_level("INFO", logger="workloads.model")
    monkeypatch.setattr(model_module, "_flash_attn_problem", lambda: None)  # flash_attn imports
    assert attention_implementation("auto", True, torch.bfloat16) == "flash_attention_2"
    assert attention_implementation("auto", True, torch.float32) == "sdpa"  # FlashAttention-2 has no fp32
    monkeypatch.setattr(model_module, "_flash_attn_problem", lambda: "flash_attn is not installed (pip install .[gpu])")
    assert attention_implementation("auto", True, torch.bfloat16) == "sdpa"
    logged = [r.getMessage() for r in caplog.records]
    assert "attention: flash_attention_2 (model.attn_implementation=auto: flash_attn imports)" in logged
    assert any(m.startswith("attention: sdpa") and "pip install .[gpu]" in m for m in logged)
    if model_module.importlib.util.find_spec("flash_attn") is None:
        assert "not installed" in model_module._flash_attn_problem()


def test_prepare_for_training_sets_train_mode_and_turns_the_cache_off(tiny):
    from workloads.model import prepare_for_training

    model = load_model(tiny)
    assert not model.training  # from_pretrained hands back a model in eval mode
    ids = torch.randint(5, 100, (1, 12))
    assert model.model(input_ids=ids).cache is not None  # and the LM builds a KV cache by default
    prepare_for_training(model)
    assert model.training and all(m.training for m in model.modules())
    assert model.model(input_ids=ids).cache is None


def test_training_flops_count_linear_layers_and_attention(tiny):
    model = load_model(tiny)
    config = model.config
    apply_freeze_policy(model, "vision_tower")
    flops = TrainingFlops.of(model)

    def linear(module):
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))

    assert flops.lm_params == linear(model.model.language_model) + model.lm_head.weight.numel()
    assert flops.lm_trains and not flops.vision_trains
    assert flops.vision_positions == num_image_tokens(config)  # CLIP: patches + CLS

    tokens, seq = 1000, 100
    got = flops.step(tokens, tokens * seq, images=10)
    lm = (
        6 * flops.lm_params * tokens
        + 12 * config.text_config.num_hidden_layers * config.text_config.hidden_size * tokens * seq
    )
    p = flops.vision_positions
    vision = (
        2 * flops.vision_params * 10 * p
        + 4 * config.vision_config.num_hidden_layers * config.vision_config.hidden_size * 10 * p * p
    )
    connector = 4 * flops.connector_params * 10 * p
    assert got == pytest.approx(lm + vision + connector)

    apply_freeze_policy(model, "connector_only")
    frozen_lm = TrainingFlops.of(model).step(tokens, tokens * seq, images=10)
    assert frozen_lm == pytest.approx(got - 2 * flops.lm_params * tokens)  # no LM weight gradients
    # the chunked loss runs the LM head on the scored positions only; images=0 counts the LM alone
    assert flops.head_params == model.lm_head.weight.numel()
    head_only = flops.step(tokens, tokens * seq, images=10, head_tokens=tokens - 300)
    assert head_only == pytest.approx(got - 6 * flops.head_params * 300)
    assert flops.step(tokens, tokens * seq, images=0) == pytest.approx(lm)


def test_mfu_uses_the_gpu_peak(monkeypatch):
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert np.isnan(mfu(1e12, 1.0, 1, "cpu"))
    assert mfu(989e12 * 0.4 * 2, 1.0, 2, "NVIDIA H100 80GB HBM3") == pytest.approx(0.4)
    monkeypatch.setenv("L2T_PEAK_TFLOPS", "100")
    assert mfu(50e12, 1.0, 1, "anything") == pytest.approx(0.5)


def test_cli_model_compose_writes_a_loadable_folder_and_names_a_missing_part(parts, tmp_path):
    from transformers import AutoModelForImageTextToText
    from typer.testing import CliRunner

    from orchestrator.cli import app

    out = tmp_path / "tinyllava"
    result = CliRunner().invoke(
        app,
        [
            "model",
            "compose",
            str(out),
            "--language-model",
            str(parts / "lm"),
            "--vision-tower",
            str(parts / "siglip-vision"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert type(AutoModelForImageTextToText.from_pretrained(out)).__name__ == "LlavaForConditionalGeneration"
    missing = CliRunner().invoke(
        app,
        [
            "model",
            "compose",
            str(tmp_path / "x"),
            "--language-model",
            str(tmp_path / "no-lm"),
            "--vision-tower",
            str(parts / "siglip-vision"),
        ],
    )
    assert missing.exit_code == 2 and "no-lm" in missing.output
