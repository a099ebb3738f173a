"""The training loop in a plain process: real DeepSpeed (ZeRO-2, gloo), no Ray."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from workloads.train_loop import MODEL_SUBDIR, TrainSpec, run_training


@pytest.fixture(scope="module")
def micro_rows(synthetic_data, tiny_model_dir):
    """Encoded training rows with their pixel values, as Ray Data would hand them to a worker."""
    from PIL import Image
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    from workloads.conversations import parse_record
    from workloads.model import num_image_tokens
    from workloads.segments import EncodeSpec, encode_conversations

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    processor = AutoImageProcessor.from_pretrained(tiny_model_dir)
    records = [json.loads(line) for line in Path(synthetic_data.train_file).read_text().splitlines()[:64]]
    conversations = [parse_record(r) for r in records]
    spec = EncodeSpec("vicuna_v1", num_image_tokens(AutoConfig.from_pretrained(tiny_model_dir)), 128)
    rows = []
    for conversation, encoded in zip(conversations, encode_conversations(conversations, tokenizer, spec)):
        image = Image.open(Path(synthetic_data.image_root, conversation.images[0])).convert("RGB")
        pixels = processor(images=[image], return_tensors="np")["pixel_values"].astype(np.float32)
        rows.append({"input_ids": encoded.input_ids, "segments": encoded.segments, "pixel_values": pixels})
    return rows


def _batches(rows, micro_batch_size):
    def epoch_batches(epoch):
        for start in range(0, len(rows) - micro_batch_size + 1, micro_batch_size):
            chunk = rows[start : start + micro_batch_size]
            yield {key: [r[key] for r in chunk] for key in chunk[0]}

    return epoch_batches


def _train(tiny_model_dir, rows, tmp_path, reports=None, resume_dir=None, **overrides):
    settings = dict(
        model_path=tiny_model_dir,
        total_steps=2,
        steps_per_epoch=100,
        lr=1e-3,
        lr_schedule="constant",
        warmup_ratio=0.0,
        micro_batch_size=8,
        gradient_accumulation=1,
        deepspeed_config={"zero_optimization": {"stage": 2}},
        log_every=1,
    )
    settings.update(overrides)
    spec = TrainSpec(**settings)
    reports = [] if reports is None else reports

    def report(metrics, checkpoint_dir):
        kept = None
        if checkpoint_dir:
            kept = tmp_path / f"report{len(reports)}"
            shutil.copytree(checkpoint_dir, kept)
        reports.append((metrics, kept))

    run_training(spec, _batches(rows, spec.micro_batch_size), report, resume_dir=resume_dir)
    return reports


def test_accumulation_split_gives_the_same_step(micro_rows, tiny_model_dir, tmp_path):
    """16 rows per step as 1x16, 2x8 and 4x4: same loss and same gradient norm (DeepSpeed's scaling undone)."""
    rows = micro_rows[:32]
    runs = {
        (micro, gas): _train(tiny_model_dir, rows, tmp_path / f"{micro}x{gas}", micro_batch_size=micro, gradient_accumulation=gas)
        for micro, gas in ((16, 1), (8, 2), (4, 4))
    }
    reference = runs[(16, 1)]
    for key, reports in runs.items():
        for (got, _), (want, _) in zip(reports, reference):
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-4), key
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-3), key
            assert got["trained_tokens"] == want["trained_tokens"]


def test_training_learns_and_exports_a_loadable_model(micro_rows, tiny_model_dir, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    reports = _train(tiny_model_dir, micro_rows, tmp_path, total_steps=24, steps_per_epoch=8, lr=3e-3, mode="response")
    losses = [m["loss"] for m, _ in reports if "final" not in m]
    assert len(losses) == 23  # every step but the last, which comes with the final report
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:2])
    final_metrics, final_dir = reports[-1]
    assert final_metrics["final"] == 1 and final_metrics["step"] == 24
    assert {"loss_instruction", "loss_response", "tokens_instruction", "tokens_response", "grad_norm", "lr", "tokens_per_s", "samples_per_s"} <= set(final_metrics)
    model = AutoModelForImageTextToText.from_pretrained(final_dir / MODEL_SUBDIR)
    tokenizer = AutoTokenizer.from_pretrained(final_dir / MODEL_SUBDIR)
    from workloads.segments import Segment

    row = micro_rows[0]
    prompt_length = int(np.argmax(row["segments"] == int(Segment.RESPONSE)))
    out = model.generate(
        input_ids=torch.as_tensor(row["input_ids"][:prompt_length], dtype=torch.long)[None],
        pixel_values=torch.as_tensor(row["pixel_values"]),
        max_new_tokens=3,
        do_sample=False,
    )
    assert out.shape[1] > prompt_length
    assert tokenizer.decode(out[0, prompt_length:], skip_special_tokens=True).strip()


def test_checkpoint_resume_replays_the_same_steps(micro_rows, tiny_model_dir, tmp_path):
    """Fail after the step-2 checkpoint, resume from it: steps 3-4 match an uninterrupted run."""
    settings = dict(total_steps=4, steps_per_epoch=3, checkpoint_every=2, export_model=False)
    full = {m["step"]: m for m, _ in _train(tiny_model_dir, micro_rows, tmp_path / "full", **settings)}
    reports = []
    with pytest.raises(RuntimeError, match="injected failure"):
        _train(tiny_model_dir, micro_rows, tmp_path / "a", reports=reports, fail_at_step=2, fail_marker=str(tmp_path / "marker"), **settings)
    (metrics, checkpoint), = [r for r in reports if r[1] is not None]
    assert metrics["step"] == 2
    resumed = {m["step"]: m for m, _ in _train(tiny_model_dir, micro_rows, tmp_path / "b", resume_dir=str(checkpoint), **settings)}
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-5)
        assert resumed[step]["epoch"] == full[step]["epoch"]
