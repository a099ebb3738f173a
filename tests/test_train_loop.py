"""The training loop in a plain process: real DeepSpeed (ZeRO-2, gloo), no Ray."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from workloads.train_loop import MODEL_SUBDIR, run_training


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
    def epoch_batches(epoch, skip):
        starts = list(range(0, len(rows) - micro_batch_size + 1, micro_batch_size))
        for start in starts[skip:]:
            chunk = rows[start : start + micro_batch_size]
            yield {key: [r[key] for r in chunk] for key in chunk[0]}

    return epoch_batches


def _loop_config(tiny_model_dir, settings):
    """The experiment config of a plain-process run (one rank) from the test's settings."""
    from orchestrator.config import config_from_dict

    masking = {k: settings.pop(k) for k in ("mode", "lambda_instruction", "lambda_response") if k in settings}
    model = {k: settings.pop(k) for k in ("freeze", "dtype", "gradient_checkpointing") if k in settings}
    settings["max_steps"] = settings.pop("total_steps")
    raw = {
        "data": {"sources": ["rows-in-memory.jsonl"]},
        "model": {"name_or_path": tiny_model_dir, **model},
        "masking": masking,
        "train": {"num_workers": 1, **settings},
    }
    return config_from_dict(raw)


def _train(
    tiny_model_dir, rows, tmp_path, reports=None, resume_dir=None, fail_at_step=None, fail_marker=None, **overrides
):
    settings = dict(
        total_steps=2,
        steps_per_epoch=100,
        lr=1e-3,
        lr_schedule="constant",
        warmup_ratio=0.0,
        micro_batch_size=8,
        gradient_accumulation=1,
        log_every=1,
        torch_threads=1,  # steadier on a shared machine
    )
    deepspeed_config = overrides.pop("deepspeed_config", {"zero_optimization": {"stage": 2}})
    export_model = overrides.pop("export_model", True)
    settings.update(overrides)
    steps_per_epoch = settings.pop("steps_per_epoch")
    cfg = _loop_config(tiny_model_dir, settings)
    reports = [] if reports is None else reports

    def report(metrics, checkpoint_dir):
        kept = None
        if checkpoint_dir:
            kept = tmp_path / f"report{len(reports)}"
            shutil.copytree(checkpoint_dir, kept)
        reports.append((metrics, kept))

    if fail_at_step is not None:
        from conftest import fail_once_after

        report = fail_once_after(fail_at_step, fail_marker)(report)
    run_training(
        cfg,
        _batches(rows, cfg.train.micro_batch_size),
        report,
        rows=steps_per_epoch * cfg.train.global_batch,
        deepspeed_config=deepspeed_config,
        resume_dir=resume_dir,
        export_model=export_model,
    )
    return reports


def test_accumulation_split_gives_the_same_step(micro_rows, tiny_model_dir, tmp_path):
    """16 rows per step as 1x16, 2x8 and 4x4: same loss and same gradient norm (DeepSpeed's scaling undone)."""
    rows = micro_rows[:32]
    runs = {
        (micro, gas): _train(
            tiny_model_dir, rows, tmp_path / f"{micro}x{gas}", micro_batch_size=micro, gradient_accumulation=gas
        )
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
    assert {
        "loss_instruction",
        "loss_response",
        "tokens_instruction",
        "tokens_response",
        "grad_norm",
        "lr",
        "tokens_per_s",
        "samples_per_s",
    } <= set(final_metrics)
    model = AutoModelForImageTextToText.from_pretrained(final_dir / MODEL_SUBDIR)
    tokenizer = AutoTokenizer.from_pretrained(final_dir / MODEL_SUBDIR)
    from workloads.segment_codes import Segment

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
        _train(
            tiny_model_dir,
            micro_rows,
            tmp_path / "a",
            reports=reports,
            fail_at_step=2,
            fail_marker=str(tmp_path / "marker"),
            **settings,
        )
    ((metrics, checkpoint),) = [r for r in reports if r[1] is not None]
    assert metrics["step"] == 2
    resumed = {
        m["step"]: m
        for m, _ in _train(tiny_model_dir, micro_rows, tmp_path / "b", resume_dir=str(checkpoint), **settings)
    }
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-5)
        assert resumed[step]["epoch"] == full[step]["epoch"]


def test_lambda_instruction_zero_gives_exactly_the_response_only_update(micro_rows, tiny_model_dir, tmp_path):
    """Real DeepSpeed: l2t with λ_I = 0 and response-only VIT take bit-identical steps."""
    from transformers import AutoModelForImageTextToText

    settings = dict(total_steps=2, micro_batch_size=8, gradient_accumulation=2, lambda_response=1.0)
    l2t = _train(tiny_model_dir, micro_rows, tmp_path / "l2t", mode="l2t", lambda_instruction=0.0, **settings)
    vit = _train(tiny_model_dir, micro_rows, tmp_path / "vit", mode="response", **settings)
    for (a, _), (b, _) in zip(l2t, vit):
        assert (
            a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"] and a["trained_tokens"] == b["trained_tokens"]
        )
        assert a["loss_instruction"] == b["loss_instruction"]  # reported whatever the weight
    one = AutoModelForImageTextToText.from_pretrained(l2t[-1][1] / MODEL_SUBDIR).state_dict()
    two = AutoModelForImageTextToText.from_pretrained(vit[-1][1] / MODEL_SUBDIR).state_dict()
    initial = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).state_dict()
    assert any(not torch.equal(one[k], initial[k]) for k in one)
    for name in one:
        assert torch.equal(one[name], two[name]), name


@pytest.mark.parametrize("mode", ["response", "l2t_no_template", "l2t"])
def test_zero_weight_tokens_get_no_gradient_in_the_real_model(micro_rows, tiny_model_dir, mode):
    from workloads.loss import count_trained_tokens, l2t_loss
    from workloads.model import load_model
    from workloads.segment_codes import token_weights
    from workloads.train_loop import collate

    model = load_model(tiny_model_dir)
    batch = collate({k: [r[k] for r in micro_rows[:4]] for k in micro_rows[0]}, 0, torch.device("cpu"))
    weights = token_weights(batch["segments"], mode, 0.7, 1.3)
    outputs = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]
    )
    logits = outputs.logits
    logits.retain_grad()
    l2t_loss(logits, batch["input_ids"], batch["segments"], weights, count_trained_tokens(weights)).loss.backward()
    # logits[:, t] predict token t+1: exactly zero gradient where weight[t+1] == 0 (image, pad, masked template tokens).
    untrained = weights[:, 1:] == 0
    grad = logits.grad[:, :-1]
    assert untrained.any() and (~untrained).any()
    assert torch.all(grad[untrained] == 0)
    assert torch.all(grad[~untrained].abs().sum(-1) > 0)


# ---------------------------------------------------------------- the data plan (workloads/batching.py, no Ray)


def _plan(lengths, micro, gas, world, **kw):
    from workloads.batching import BatchPlan

    return BatchPlan(np.asarray(lengths), micro, gas, world, **kw)


def test_plan_gives_every_layout_the_same_global_batches():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 200, size=203)
    layouts = [(16, 1, 1), (4, 4, 1), (4, 2, 2), (8, 1, 2), (2, 2, 4), (1, 4, 4)]
    reference = _plan(lengths, *layouts[0], group_steps=3, seed=7)
    assert reference.steps_per_epoch == 203 // 16
    for epoch in (0, 1):
        want = [set(step) for step in reference.steps(epoch)]
        for micro, gas, world in layouts[1:]:
            plan = _plan(lengths, micro, gas, world, group_steps=3, seed=7)
            batches = plan.micro_batches(epoch)
            assert [set(step.reshape(-1)) for step in batches] == want, (micro, gas, world)
            owner = plan.rank_of_rows()
            for rank in range(world):
                order = plan.order(rank, epoch)
                assert list(order) == list(batches[:, :, rank, :].reshape(-1))
                assert np.all(owner[order] == rank)
            assert np.sum(owner >= 0) == plan.steps_per_epoch * plan.global_batch
    # Another epoch visits the same global batches in another order; another seed too.
    assert [set(s) for s in reference.steps(0)] != [set(s) for s in reference.steps(1)]
    assert sorted(map(sorted, reference.steps(0).tolist())) == sorted(map(sorted, reference.steps(1).tolist()))


def test_length_grouping_cuts_padding_and_keeps_micro_batches_unequal():
    rng = np.random.default_rng(1)
    lengths = rng.integers(20, 300, size=512)
    plan = _plan(lengths, 4, 2, 2, group_steps=8)
    assert plan.padding_share(grouped=True) < 0.5 * plan.padding_share(grouped=False)
    trained = lengths[plan.micro_batches(0)].sum(axis=-1)  # [steps, accumulation, rank]
    assert (trained.max(axis=(1, 2)) > trained.min(axis=(1, 2))).all()


def test_ordered_micro_batches_follow_the_plan_whatever_the_arrival_order():
    from workloads.batching import ordered_micro_batches

    order = np.array([5, 1, 4, 0, 3, 2])
    arrival = [
        {
            "row": np.array(chunk),
            "input_ids": [np.array([r]) for r in chunk],
            "segments": [np.array([r]) for r in chunk],
            "pixel_values": [None] * len(chunk),
        }
        for chunk in ([0, 1], [2, 3, 4], [5])
    ]
    batches = list(ordered_micro_batches(iter(arrival), order, 2))
    assert [[int(x[0]) for x in b["input_ids"]] for b in batches] == [[5, 1], [4, 0], [3, 2]]
    with pytest.raises(RuntimeError, match="ended 6 planned rows early"):
        list(ordered_micro_batches(iter(arrival[:2]), order, 2))


def test_load_rows_reads_the_planned_rows_with_their_images(synthetic_data, tiny_model_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestrator.ingest import LoadRows, read_prepared_rows
    from orchestrator.prepare import PreparedData

    images = [json.loads(line)["image"] for line in Path(synthetic_data.train_file).read_text().splitlines()[:300]]
    shards = tmp_path / "prepared" / "shards"
    shards.mkdir(parents=True)
    for part, (lo, hi) in enumerate([(0, 250), (250, 300)]):
        table = pa.table(
            {
                "input_ids": [list(range(i % 9 + 1)) for i in range(lo, hi)],
                "segments": [[3] * (i % 9 + 1) for i in range(lo, hi)],
                "images": [[images[i]] for i in range(lo, hi)],
                "length": [i % 9 + 1 for i in range(lo, hi)],
            }
        )
        pq.write_table(table, shards / f"part-{part}.parquet", row_group_size=100)
    rows = read_prepared_rows(PreparedData(str(tmp_path / "prepared"), {}))
    assert len(rows.lengths) == 300 and rows.lengths[7] == 8
    assert [c["first_row"] for c in rows.chunks] == [0, 100, 200, 250]
    owner = np.arange(300) % 3
    load = LoadRows(tiny_model_dir, str(shards), str(synthetic_data.image_root), owner=owner, rank=1)
    chunks = rows.chunks[1:3]
    out = load({k: np.array([c[k] for c in chunks]) for k in chunks[0]})
    assert out["row"] == [r for r in range(100, 250) if r % 3 == 1]
    for row, ids, pixels in zip(out["row"], out["input_ids"], out["pixel_values"]):
        assert list(ids) == list(range(row % 9 + 1)) and pixels.shape == (1, 3, 32, 32)


def test_a_run_folder_is_resumed_only_by_the_same_unfinished_configuration(tmp_path, capsys):
    from orchestrator.train import RUN_STATE_FILE, _claim_run_folder

    run = tmp_path / "runs" / "r"
    _claim_run_folder(str(run), "aaa", "r")
    (run / "checkpoint_000001").mkdir()
    _claim_run_folder(str(run), "aaa", "r")  # same configuration, unfinished: Ray Train resumes it
    assert (run / "checkpoint_000001").exists() and "resuming" in capsys.readouterr().out
    _claim_run_folder(str(run), "bbb", "r")  # another configuration: a fresh run
    assert not (run / "checkpoint_000001").exists() and "replacing" in capsys.readouterr().out
    (run / "checkpoint_000002").mkdir()
    (run / RUN_STATE_FILE).write_text(json.dumps({"fingerprint": "bbb", "finished": True}))
    _claim_run_folder(str(run), "bbb", "r")  # finished: a re-run trains again
    assert not (run / "checkpoint_000002").exists()


@pytest.fixture(scope="module")
def zero2_reference(micro_rows, tiny_model_dir, tmp_path_factory):
    return _train(
        tiny_model_dir,
        micro_rows,
        tmp_path_factory.mktemp("zero2"),
        gradient_accumulation=2,
        deepspeed_config=_deepspeed_json("zero2"),
    )


def _deepspeed_json(name):
    from orchestrator.train import load_deepspeed_config

    return load_deepspeed_config(f"configs/deepspeed/{name}.json")


@pytest.mark.parametrize("stage", ["zero0", "zero3"])
def test_zero_stages_take_the_same_steps_and_export_the_same_model(
    zero2_reference, micro_rows, tiny_model_dir, tmp_path, stage
):
    """The shipped DeepSpeed configs: ZeRO-0 and ZeRO-3 (consolidated 16-bit export) match ZeRO-2."""
    from transformers import AutoModelForImageTextToText

    reports = _train(
        tiny_model_dir, micro_rows, tmp_path, gradient_accumulation=2, deepspeed_config=_deepspeed_json(stage)
    )
    for (got, _), (want, _) in zip(reports, zero2_reference):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
    ours = AutoModelForImageTextToText.from_pretrained(reports[-1][1] / MODEL_SUBDIR).state_dict()
    reference = AutoModelForImageTextToText.from_pretrained(zero2_reference[-1][1] / MODEL_SUBDIR).state_dict()
    for name, value in reference.items():
        torch.testing.assert_close(ours[name], value, rtol=0, atol=1e-5, msg=name)


def test_a_restart_after_the_export_hands_the_same_export_back(tmp_path, tiny_model_dir):
    """Ray Train restarts from the latest checkpoint; if that is the final export, nothing trains again."""
    from workloads.train_loop import STATE_FILE

    final = tmp_path / "final"
    (final / MODEL_SUBDIR).mkdir(parents=True)
    (final / MODEL_SUBDIR / "config.json").write_text("{}")
    (final / STATE_FILE).write_text(json.dumps({"step": 7, "final": True, "metrics": {"step": 7, "loss": 0.5}}))
    reports = []
    cfg = _loop_config(tiny_model_dir, {"total_steps": 7})
    run_training(
        cfg,
        lambda epoch, skip: iter(()),
        lambda m, d: reports.append((m, Path(d, MODEL_SUBDIR, "config.json").exists() if d else None)),
        rows=7 * cfg.train.global_batch,
        deepspeed_config={},
        resume_dir=str(final),
    )
    assert reports == [({"step": 7, "loss": 0.5, "final": 1}, True)]
