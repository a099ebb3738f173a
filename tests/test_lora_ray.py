"""A LoRA fit through Ray Train + DeepSpeed ZeRO-2 (2 gloo workers): it fails once after a step, resumes from its
checkpoint, exports an adapter folder, and `l2t eval`'s code path evaluates that folder as base + adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import experiment_config

pytestmark = pytest.mark.ray

LORA = {"enabled": True, "rank": 8, "alpha": 16, "dropout": 0.0, "export": "adapter"}


def test_a_lora_fit_resumes_after_a_failure_and_its_adapter_evaluates(ray_cluster, tmp_path, inject_failure):
    from transformers import AutoModelForImageTextToText

    from orchestrator.config import EvalConfig
    from orchestrator.evaluate import run_eval
    from orchestrator.experiment import prepare_inputs
    from orchestrator.train import run_train
    from workloads.lora import adapter_base

    base = experiment_config(
        tmp_path,
        model={"freeze": "vision_tower", "lora": LORA},
        train={
            "max_steps": 4,
            "lr": 1e-2,
            "lr_schedule": "constant",
            "warmup_ratio": 0.0,
            "log_every": 1,
            "checkpoint_every": 2,
            "max_failures": 1,
            "micro_batch_size": 4,
        },
    )
    cfg, model_dir, prepared = prepare_inputs(base)
    result = run_train(cfg, prepared, model_dir, "lora", wrap_report=inject_failure(3, str(tmp_path / "failed")))

    rows = [json.loads(line) for line in Path(result.run_path, "metrics.jsonl").read_text().splitlines()]
    steps = [int(r["step"]) for r in rows]
    assert Path(tmp_path / "failed").exists() and steps.count(3) == 2, f"step 3 again after the resume: {steps}"
    assert rows[-1].get("final") == 1 and int(rows[-1]["step"]) == 4
    history = {int(r["step"]): r for r in result.history}
    assert history[4]["loss"] < history[1]["loss"]

    assert Path(result.model_dir, "adapter_config.json").exists()
    assert not Path(result.model_dir, "model.safetensors").exists()
    assert adapter_base(result.model_dir) == model_dir
    loaded = AutoModelForImageTextToText.from_pretrained(result.model_dir)
    assert any("lora_A" in name for name, _ in loaded.named_parameters())

    options = EvalConfig(max_rows=8, batch_size=8, max_new_tokens=4, use_gpu=False)
    results = run_eval(
        result.model_dir, [cfg.data.eval_file], str(tmp_path / "eval"), options=options, config=cfg, max_rows=8
    )
    (suite,) = results.values()
    assert len(suite.rows) == 8 and not any(row.get("error") for row in suite.rows)
    assert "accuracy" in suite.metrics
