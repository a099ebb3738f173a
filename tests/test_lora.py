"""LoRA through peft in plain processes (no Ray): where the adapters go, what trains, exports, resume, QLoRA refusal.

Real parts: the tiny LLaVA preset through `from_pretrained`, peft's `get_peft_model`, DeepSpeed ZeRO-2 on gloo
via `run_training`, and evaluation's own loader (`Evaluator.from_pretrained`) for the adapter export.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import test_train_loop
import torch

from workloads.config import ModelConfig, TinyModelConfig
from workloads.lora import apply_lora, check_lora_launch, plan_lora, quantized_loading, save_trained_model
from workloads.lora_config import LORA_TARGET_MODULES
from workloads.model import apply_freeze_policy, load_model
from workloads.train_loop import MODEL_SUBDIR, run_training

RANK = 4
micro_rows = test_train_loop.micro_rows  # the fixture: encoded rows with pixel values, as a worker gets them


def _lora_model(model_dir: str, **lora):
    config = ModelConfig(name_or_path=model_dir, lora={"enabled": True, "rank": RANK, "alpha": 8, **lora})
    model = load_model(model_dir)
    apply_freeze_policy(model, config.freeze)
    return apply_lora(model, config)


def _lora_layers(model) -> list[str]:
    from peft.tuners.lora import LoraLayer

    return [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def test_adapters_go_on_the_language_model_only_and_only_they_and_the_connector_train(tiny_model_dir):
    """The vision tower names its projections q_proj/k_proj/v_proj too: none of them gets an adapter."""
    model = _lora_model(tiny_model_dir)
    spec = TinyModelConfig()
    layers = _lora_layers(model)
    assert len(layers) == spec.text_layers * len(LORA_TARGET_MODULES)
    assert all(name.startswith("model.language_model.layers.") for name in layers)
    assert {name.rsplit(".", 1)[1] for name in layers} == set(LORA_TARGET_MODULES)
    assert any(n.startswith("model.vision_tower.") and n.endswith("q_proj") for n, _ in model.named_modules())

    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    adapters = {n: c for n, c in trainable.items() if ".lora_A." in n or ".lora_B." in n}
    connector = {n: c for n, c in trainable.items() if n.startswith("model.multi_modal_projector.modules_to_save.")}
    assert set(trainable) == set(adapters) | set(connector) and connector
    # r x (in + out) per adapted layer: q, k, v, o are hidden x hidden; gate, up, down hidden <-> intermediate
    hidden, intermediate = spec.text_hidden, spec.text_intermediate
    per_layer = RANK * (4 * 2 * hidden + 3 * (hidden + intermediate))
    assert sum(adapters.values()) == spec.text_layers * per_layer
    projector = sum(p.numel() for p in load_model(tiny_model_dir).model.multi_modal_projector.parameters())
    assert sum(connector.values()) == projector


@pytest.mark.parametrize(
    "lora, message",
    [
        ({"target_modules": ["q_proj", "fc1"]}, r"target_modules: \['fc1'\] name no linear layer.*'down_proj'"),
        ({"full_modules": ["vision_tower"]}, r"full_modules: 'vision_tower' holds the vision tower"),
        ({"full_modules": ["projector_typo"]}, r"'projector_typo' names no module.*multi_modal_projector"),
    ],
)
def test_module_names_that_miss_are_refused_with_candidates(tiny_model_dir, lora, message):
    config = ModelConfig(lora={"enabled": True, **lora})
    with pytest.raises(ValueError, match=message):
        check_lora_launch(config, tiny_model_dir, 2, use_gpu=False)  # the driver's check, on a meta-device model
    with pytest.raises(ValueError, match=message):
        plan_lora(load_model(tiny_model_dir), config.lora)  # the worker's


def test_contradictory_settings_are_refused_naming_the_keys(tiny_model_dir):
    from orchestrator.config import ConfigError, config_from_dict

    def config(model, train=None):
        return config_from_dict({"data": {"sources": ["x.jsonl"]}, "model": model, "train": train or {}})

    for freeze in ("none", "connector_only"):
        with pytest.raises(ConfigError, match=f"model.freeze must be vision_tower, not {freeze}"):
            config({"freeze": freeze, "lora": {"enabled": True}})
    config({"freeze": "none", "lora": {"enabled": False, "rank": 8}})  # a disabled section is inert
    with pytest.raises(ConfigError, match="not a module name"):
        config({"lora": {"enabled": True, "target_modules": ["q_.*"]}})
    with pytest.raises(ValueError, match="ZeRO-3"):
        check_lora_launch(ModelConfig(lora={"enabled": True}), tiny_model_dir, 3, use_gpu=False)


def test_qlora_is_refused_on_cpu_naming_model_lora_quantize(tiny_model_dir):
    from orchestrator.config import ConfigError, config_from_dict

    raw = {"data": {"sources": ["x.jsonl"]}, "model": {"lora": {"enabled": True, "quantize": "4bit"}}}
    with pytest.raises(ConfigError, match=r"model.lora.quantize=4bit: .*train.use_gpu=true"):
        config_from_dict(raw)
    model = ModelConfig(lora={"enabled": True, "quantize": "4bit"})
    assert not torch.cuda.is_available()  # this machine: the launch checks refuse too, whatever use_gpu says
    with pytest.raises(ValueError, match=r"model.lora.quantize=4bit: QLoRA's 4-bit base needs a CUDA GPU"):
        quantized_loading(model, torch.bfloat16, use_gpu=True)
    with pytest.raises(ValueError, match="model.lora.quantize=4bit"):
        apply_lora(load_model(tiny_model_dir), model, use_gpu=True)
    assert quantized_loading(ModelConfig(lora={"enabled": True}), torch.float32, use_gpu=False) == {}


def _inputs(row):
    return {
        "input_ids": torch.as_tensor(row["input_ids"][None], dtype=torch.long),
        "pixel_values": torch.as_tensor(row["pixel_values"]),
    }


def _evaluation_model(model_dir):
    """The model as evaluation loads it (`Evaluator.from_pretrained`, what `EvalActor` runs)."""
    from workloads.evaluator import Evaluator
    from workloads.segments import EncodeSpec

    return Evaluator.from_pretrained(str(model_dir), EncodeSpec("vicuna_v1", 17, 128)).model


def test_merged_and_adapter_exports_give_the_peft_models_logits(tiny_model_dir, micro_rows, tmp_path):
    from transformers import AutoModelForImageTextToText

    model = _lora_model(tiny_model_dir, export="adapter")
    with torch.no_grad():  # trained-looking adapters and connector (lora_B starts at 0)
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    model.eval()
    inputs = _inputs(micro_rows[0])
    with torch.no_grad():
        want = model(**inputs).logits
        base = load_model(tiny_model_dir).eval()(**inputs).logits
    assert (want - base).abs().max() > 1e-2, "the adapters change the output"

    save_trained_model(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json"):
        shutil.copy(Path(tiny_model_dir, name), tmp_path / "adapter" / name)
    with torch.no_grad():
        got = _evaluation_model(tmp_path / "adapter")(**inputs).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)

    from workloads.lora import lora_run_of

    lora_run_of(model).export = "merged"
    save_trained_model(model, tmp_path / "merged")
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    assert not _lora_layers(merged) and not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, want, rtol=1e-5, atol=1e-5)


def _lora_run(tiny_model_dir, rows, out: Path, *, resume_dir=None, fail_at_step=None, steps=6, **lora):
    """`run_training` with LoRA (ZeRO-2, one gloo rank): the reports, checkpoints copied under `out`."""
    from conftest import fail_once_after

    from orchestrator.config import config_from_dict

    cfg = config_from_dict(
        {
            "data": {"sources": ["rows-in-memory.jsonl"]},
            "model": {
                "name_or_path": tiny_model_dir,
                "lora": {"enabled": True, "rank": 8, "alpha": 16, "dropout": 0.0, **lora},
            },
            "masking": {"mode": "response"},
            "train": {
                "num_workers": 1,
                "max_steps": steps,
                "lr": 1e-2,
                "lr_schedule": "constant",
                "warmup_ratio": 0.0,
                "micro_batch_size": 8,
                "log_every": 1,
                "checkpoint_every": 3,
                "torch_threads": 1,
            },
        }
    )
    reports = []

    def report(metrics, checkpoint_dir):
        kept = None
        if checkpoint_dir:
            kept = out / f"report{len(reports)}"
            shutil.copytree(checkpoint_dir, kept)
        reports.append((metrics, kept))

    out.mkdir(parents=True, exist_ok=True)
    if fail_at_step is not None:
        report = fail_once_after(fail_at_step, str(out / "failed"))(report)
    run_training(
        cfg,
        test_train_loop._batches(rows, 8),
        report,
        rows=8 * cfg.train.global_batch,
        deepspeed_config={"zero_optimization": {"stage": 2}},
        resume_dir=resume_dir,
    )
    return reports


def _adapter_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "adapter_model.safetensors"))


def test_lora_trains_resumes_exactly_and_exports_an_adapter_evaluation_loads(tiny_model_dir, micro_rows, tmp_path):
    """6 steps with a checkpoint at 3; a run that fails after 3 and resumes from that checkpoint replays steps
    4-6 and exports the same adapter; the adapter folder loads through evaluation's loader, base + adapter."""
    full = _lora_run(tiny_model_dir, micro_rows, tmp_path, export="adapter")
    losses = [m["loss"] for m, _ in full]
    assert [int(m["step"]) for m, _ in full] == [1, 2, 3, 4, 5, 6]
    assert sum(losses[-2:]) < sum(losses[:2]), losses

    with pytest.raises(RuntimeError, match="injected failure"):
        _lora_run(tiny_model_dir, micro_rows, tmp_path / "a", fail_at_step=3, export="adapter")
    (checkpoint,) = Path(tmp_path / "a").glob("report*")  # step 3's
    resumed = _lora_run(tiny_model_dir, micro_rows, tmp_path / "b", resume_dir=str(checkpoint), export="adapter")
    assert [int(m["step"]) for m, _ in resumed] == [4, 5, 6]
    for (got, _), (want, _) in zip(resumed, full[3:]):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)

    want_dir, got_dir = full[-1][1] / MODEL_SUBDIR, resumed[-1][1] / MODEL_SUBDIR
    want, got = _adapter_weights(want_dir), _adapter_weights(got_dir)
    assert set(want) == set(got) and any("multi_modal_projector" in k for k in want)  # the connector, in full
    assert not any("vision_tower" in k for k in want)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-7, msg=name)
    assert _lora_layers(_evaluation_model(got_dir)), "evaluation loads base + adapter, not the bare base"

    # the checkpoint holds the whole module: the base stayed as it was, the adapters moved
    (states,) = checkpoint.glob("deepspeed/step3/*model_states.pt")
    module = torch.load(states, map_location="cpu", weights_only=False)["module"]
    base = load_model(tiny_model_dir).state_dict()
    for name, value in module.items():
        plain = name.replace(".base_layer", "").replace(".original_module", "")
        if "lora_" not in name and "modules_to_save" not in name:
            assert torch.equal(value, base[plain]), f"{name} is frozen under LoRA"
    assert any("lora_B" in n and value.abs().max() > 0 for n, value in module.items())
