"""A non-LLaVA family through the whole chain: Ray Data -> Ray Train (DeepSpeed ZeRO-2) -> evaluation."""

from __future__ import annotations

import math

import pytest
from conftest import experiment_config

pytestmark = pytest.mark.ray


def test_qwen2_vl_preset_prepares_trains_and_evaluates_through_ray(ray_cluster, tmp_path):
    from transformers import AutoModelForImageTextToText

    from orchestrator.experiment import run_experiment

    cfg = experiment_config(
        tmp_path,
        model={"tiny": {"family": "qwen2_vl"}},
        train={"max_steps": 4, "log_every": 2, "lr": 1e-3},
        eval={"max_rows": 12},
    )
    result = run_experiment(cfg, run_name="qwen2-vl")
    manifest = result.prepared.manifest
    assert manifest["encode_spec"]["image_token"] == "<|image_pad|>" and manifest["num_image_tokens"] == 0
    assert manifest["tokens_by_segment"]["image"] == 4 * manifest["rows_written"]  # 32x32 px: 2x2 merged patches
    assert [row["step"] for row in result.train.history] == [2, 4]
    assert all(math.isfinite(row["loss"]) for row in result.train.history)
    assert result.eval_metrics["eval_samples"] == 12 and math.isfinite(result.eval_metrics["vc_mean"])
    model = AutoModelForImageTextToText.from_pretrained(result.train.model_dir)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
