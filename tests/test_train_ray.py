"""Ray Train + real DeepSpeed (ZeRO-2, gloo) on CPU: the λ loss is exact across layouts, restarts resume exactly.

Four real fits share the module, each 5 optimizer steps of the same 16-row
global batches (the data plan makes them layout-invariant):

- A: 1 worker x accumulation 4 x micro-batch 4
- B: 2 workers x accumulation 2 x micro-batch 4, a checkpoint every 2 steps
- C: 2 workers x accumulation 1 x micro-batch 8, reusing A's run name
- D: B with a failure injected in rank 0 after step 3 (max_failures=1)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import experiment_config

pytestmark = pytest.mark.ray

STEPS = 5
LAYOUTS = {"A": (1, 4, 4), "B": (2, 4, 2), "C": (2, 8, 1)}  # workers, micro-batch, accumulation


def _state_dict(model_dir: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForImageTextToText

    return {
        k: v.detach().clone() for k, v in AutoModelForImageTextToText.from_pretrained(model_dir).state_dict().items()
    }


def _metrics_rows(run_path: str) -> list[dict]:
    return [json.loads(line) for line in Path(run_path, "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def fits(ray_cluster, tmp_path_factory, inject_failure):
    from orchestrator.config import with_overrides
    from orchestrator.experiment import prepare_inputs
    from orchestrator.train import run_train

    storage = tmp_path_factory.mktemp("train-ray")
    base = experiment_config(
        storage,
        masking={"mode": "l2t", "lambda_instruction": 0.5},
        train={
            "max_steps": STEPS,
            "lr": 1e-3,
            "lr_schedule": "constant",
            "warmup_ratio": 0.0,
            "log_every": 1,
            "checkpoint_every": 2,
        },
    )
    cfg, model_dir, prepared = prepare_inputs(base)
    out = {"initial": _state_dict(model_dir), "model_dir": model_dir, "storage": storage}

    def fit(label, run_name, workers, micro, gas, **train):
        layout = {"train.num_workers": workers, "train.micro_batch_size": micro, "train.gradient_accumulation": gas}
        layout.update({f"train.{k}": v for k, v in train.items() if k != "fail_at_step"})
        fault = (
            inject_failure(train["fail_at_step"], str(storage / f"{label}.failed")) if "fail_at_step" in train else None
        )
        result = run_train(with_overrides(cfg, layout), prepared, model_dir, run_name, wrap_report=fault)
        out[label] = result
        out[f"{label}_params"] = _state_dict(result.model_dir)
        out[f"{label}_rows"] = _metrics_rows(result.run_path)

    fit("A", "layout-a", *LAYOUTS["A"])
    fit("B", "layout-b", *LAYOUTS["B"])
    fit("C", "layout-a", *LAYOUTS["C"])  # same run name as A: must start fresh, not resume A's checkpoints
    fit("D", "fault", *LAYOUTS["B"], fail_at_step=3, max_failures=1)
    return out


def _by_step(result) -> dict[int, dict]:
    return {int(row["step"]): row for row in result.history}


@pytest.mark.parametrize("label", ["B", "C"])
def test_layouts_give_the_same_loss_gradient_and_update(fits, label):
    """(1 worker, acc 4) = (2 workers, acc 2) = (2 workers, acc 1, micro x2).

    Per-step loss, N, grad norm and final weights agree."""
    reference, other = _by_step(fits["A"]), _by_step(fits[label])
    assert sorted(reference) == sorted(other) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        want, got = reference[step], other[step]
        assert got["trained_tokens"] == want["trained_tokens"], step
        assert (
            got["tokens_instruction"] == want["tokens_instruction"]
            and got["tokens_response"] == want["tokens_response"]
        )
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), step
        assert got["loss_instruction"] == pytest.approx(want["loss_instruction"], rel=1e-5)
        assert got["loss_response"] == pytest.approx(want["loss_response"], rel=1e-5)
        # DeepSpeed averages gradients over ranks; the loop undoes it. A wrong scale shows up here first
        # (Adam's update hardly depends on the gradient's scale).
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4), step

    # The ranks' micro-batches carry different numbers of trained tokens (so the normalization matters).
    by_rank = [row["trained_tokens_by_rank"] for row in other.values() if "trained_tokens_by_rank" in row]
    assert any(len(set(counts)) > 1 for counts in by_rank)
    assert all(sum(counts) == other[i + 1]["trained_tokens"] for i, counts in enumerate(by_rank[:STEPS]))

    initial, a, b = fits["initial"], fits["A_params"], fits[f"{label}_params"]
    largest_update = max((a[k] - initial[k]).abs().max().item() for k in a)
    assert largest_update > 1e-3, "the weights moved"
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=2e-5, msg=name)


def test_a_run_name_reused_with_another_configuration_starts_fresh(fits):
    rows = fits["C_rows"]
    assert [int(r["step"]) for r in rows if not r.get("final")] == list(range(1, STEPS))
    assert all(len(r["trained_tokens_by_rank"]) == 2 for r in rows), "no row of run A (1 worker) survived"


def test_fault_resumes_from_the_last_checkpoint_and_matches_the_uninterrupted_run(fits):
    rows = fits["D_rows"]
    steps = [int(r["step"]) for r in rows]
    assert steps.count(3) == 2, f"step 3 ran before the failure and again after resuming from step 2: {steps}"
    assert Path(fits["storage"], "D.failed").exists()
    resumed, uninterrupted = _by_step(fits["D"]), _by_step(fits["B"])
    assert max(resumed) == STEPS and resumed[STEPS].get("final") == 1
    for step in range(3, STEPS + 1):
        assert resumed[step]["loss"] == pytest.approx(uninterrupted[step]["loss"], rel=1e-6), step
        assert resumed[step]["grad_norm"] == pytest.approx(uninterrupted[step]["grad_norm"], rel=1e-5), step
    for name, value in fits["B_params"].items():
        torch.testing.assert_close(fits["D_params"][name], value, rtol=0, atol=1e-6, msg=name)


def test_exported_model_loads_and_generates(fits):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model_dir = fits["B"].model_dir
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    from PIL import Image

    image = Image.new("RGB", (32, 32), (200, 30, 30))
    inputs = processor(images=[image], text=["USER: <image>\nWhat color is the shape? ASSISTANT:"], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    metrics = fits["B"].history[-1]
    assert {
        "loss",
        "loss_instruction",
        "loss_response",
        "tokens_instruction",
        "tokens_response",
        "grad_norm",
        "lr",
        "tokens_per_s",
        "samples_per_s",
        "padding_share",
    } <= set(metrics)
    assert fits["B"].data["padding_share_planned"] < fits["B"].data["padding_share_ungrouped"]
