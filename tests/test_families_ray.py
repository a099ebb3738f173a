"""Every non-LLaVA family through the whole chain: Ray Data -> Ray Train (DeepSpeed ZeRO-2) -> evaluation."""

from __future__ import annotations

import math

import pytest
from conftest import experiment_config

pytestmark = pytest.mark.ray

MODEL_CLASSES = {
    "llava_next": "LlavaNextForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}


@pytest.mark.parametrize("family", sorted(MODEL_CLASSES))
def test_each_family_preset_prepares_trains_and_evaluates_through_ray(ray_cluster, tmp_path, family):
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    from orchestrator.experiment import run_experiment
    from workloads.families import FAMILIES, ImageTokenCounter

    cfg = experiment_config(
        tmp_path,
        model={"tiny": {"family": family}},
        train={"max_steps": 4, "log_every": 2, "lr": 1e-3},
        eval={"max_rows": 12},
    )
    result = run_experiment(cfg, run_name=family)
    model = AutoModelForImageTextToText.from_pretrained(result.train.model_dir)
    assert type(model).__name__ == MODEL_CLASSES[family]
    manifest = result.prepared.manifest
    per_image = ImageTokenCounter(model.config, AutoImageProcessor.from_pretrained(result.train.model_dir))
    (count,) = per_image.counts([(32, 32)])  # every synthetic image is 32x32 px
    assert manifest["encode_spec"]["image_token"] == FAMILIES[family].image_token and manifest["num_image_tokens"] == 0
    assert manifest["tokens_by_segment"]["image"] == count * manifest["rows_written"]
    assert [row["step"] for row in result.train.history] == [2, 4]
    assert all(math.isfinite(row["loss"]) for row in result.train.history)
    assert result.eval_metrics["eval_samples"] == 12 and math.isfinite(result.eval_metrics["vc_mean"])
