"""The training loop in a plain process: real DeepSpeed (ZeRO-2, gloo), no Ray."""

import json
import os
import shutil
import time
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


MASKING_KEYS = ("mode", "lambda_instruction", "lambda_response", "normalize", "weights", "schedule")


def _loop_config(tiny_model_dir, settings):
    """The experiment config of a plain-process run (one rank unless `num_workers` says) from the test's settings."""
    from orchestrator.config import config_from_dict

    masking = {k: settings.pop(k) for k in MASKING_KEYS if k in settings}
    model = {k: settings.pop(k) for k in ("freeze", "dtype", "gradient_checkpointing") if k in settings}
    settings["max_steps"] = settings.pop("total_steps")
    raw = {
        "data": {"sources": ["rows-in-memory.jsonl"]},
        "model": {"name_or_path": tiny_model_dir, **model},
        "masking": masking,
        "train": {"num_workers": 1, **settings},
    }
    return config_from_dict(raw)


def _run_settings(tiny_model_dir, overrides):
    """(config, DeepSpeed JSON, export_model, steps_per_epoch) of a test run: the defaults, then `overrides`."""
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
    return _loop_config(tiny_model_dir, settings), deepspeed_config, export_model, steps_per_epoch


def _train(
    tiny_model_dir, rows, tmp_path, reports=None, resume_dir=None, fail_at_step=None, fail_marker=None, **overrides
):
    training_eval = overrides.pop("training_eval", None)
    cfg, deepspeed_config, export_model, steps_per_epoch = _run_settings(tiny_model_dir, overrides)
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
        training_eval=training_eval,
    )
    return reports


# λ_I != λ_A and a per-segment weight, so that the three normalizations are three different objectives
SPLIT_MASKING = dict(mode="l2t", lambda_instruction=0.5, lambda_response=2.0, weights={"system": 0.25})
NORMALIZATIONS = ("tokens", "weight", "per_part")


@pytest.fixture(scope="module")
def split_runs(micro_rows, tiny_model_dir, tmp_path_factory):
    """`run(normalize, micro, gas)`: the reports of 2 steps of 16 rows (micro x gas, one rank), computed once."""
    done = {}

    def run(normalize, micro, gas):
        if (normalize, micro, gas) not in done:
            out = tmp_path_factory.mktemp(f"{normalize}-{micro}x{gas}")
            done[(normalize, micro, gas)] = _train(
                tiny_model_dir,
                micro_rows[:32],
                out,
                micro_batch_size=micro,
                gradient_accumulation=gas,
                normalize=normalize,
                **SPLIT_MASKING,
            )
        return done[(normalize, micro, gas)]

    return run


def _assert_same_steps(got_reports, want_reports, key):
    """Same loss, gradient norm, trained tokens and λ at every step."""
    assert len(got_reports) == len(want_reports) == 2
    for got, want in zip(got_reports, want_reports):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4), key
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-3), key
        assert got["trained_tokens"] == want["trained_tokens"], key
        assert (got["lambda_instruction"], got["lambda_response"]) == (0.5, 2.0)


def _assert_same_model(got_dir, want_dir, key):
    from transformers import AutoModelForImageTextToText

    got = AutoModelForImageTextToText.from_pretrained(got_dir / MODEL_SUBDIR).state_dict()
    want = AutoModelForImageTextToText.from_pretrained(want_dir / MODEL_SUBDIR).state_dict()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-5, msg=f"{key}: {name}")


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
def test_accumulation_split_gives_the_same_step(split_runs, normalize):
    """16 rows per step as 1x16, 2x8 (1 x 2, micro x2) and 4x4 (1 x 4): the same steps, DeepSpeed's scaling undone."""
    reference = split_runs(normalize, 4, 4)
    for micro, gas in ((16, 1), (8, 2)):
        reports = split_runs(normalize, micro, gas)
        _assert_same_steps([m for m, _ in reports], [m for m, _ in reference], (normalize, micro, gas))
        _assert_same_model(reports[-1][1], reference[-1][1], (normalize, micro, gas))


def test_the_normalizations_train_different_steps(split_runs):
    """With λ_I != λ_A the three objectives differ (else the split tests above would prove less)."""
    first = {n: split_runs(n, 4, 4)[0][0] for n in NORMALIZATIONS}
    assert len({round(m["loss"], 4) for m in first.values()}) == 3
    assert len({round(m["grad_norm"], 4) for m in first.values()}) == 3
    # reported group losses are mean nll whatever the weights: the first step's are the same in all three
    for m in first.values():
        assert m["loss_response"] == pytest.approx(first["tokens"]["loss_response"], rel=1e-6)
        assert m["loss_instruction"] == pytest.approx(first["tokens"]["loss_instruction"], rel=1e-6)


def _data_parallel_rank(rank, world, port, jobs, out_dir):
    """One data-parallel rank in its own process (spawned): the real run_training on this rank's rows, gloo."""
    import torch.distributed as dist

    from workloads.config import ExperimentConfig

    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ.update(env, WORLD_SIZE=str(world))
    for name, cfg_dict, rows_by_rank, deepspeed_config in jobs:
        cfg = ExperimentConfig.model_validate(cfg_dict)
        reports = []

        def report(metrics, checkpoint_dir, name=name, reports=reports):
            if checkpoint_dir:
                shutil.copytree(checkpoint_dir, Path(out_dir, name))
            reports.append(metrics)

        run_training(
            cfg,
            _batches(rows_by_rank[rank], cfg.train.micro_batch_size),
            report,
            rows=100 * cfg.train.global_batch,
            deepspeed_config=deepspeed_config,
        )
        if rank == 0:
            Path(out_dir, f"{name}.json").write_text(json.dumps(reports))
    dist.destroy_process_group()


def test_data_parallel_ranks_take_the_same_step(split_runs, micro_rows, tiny_model_dir, tmp_path):
    """2 gloo processes x accumulation 2 x micro 4, each the real run_training on its rank's rows, take the
    steps of 1 rank x accumulation 4 x micro 4, for every normalization (denominators all-reduced, the
    DeepSpeed average over ranks undone)."""
    import socket

    import torch.multiprocessing as mp

    rows = micro_rows[:32]
    # each step's 16 rows: rank 0 the first 8, rank 1 the next 8, as two micro-batches of 4
    rows_by_rank = [[r for step in (0, 16) for r in rows[step + 8 * rank : step + 8 * rank + 8]] for rank in (0, 1)]
    jobs = []
    for normalize in NORMALIZATIONS:
        overrides = dict(micro_batch_size=4, gradient_accumulation=2, num_workers=2, normalize=normalize)
        cfg, deepspeed_config, _, _ = _run_settings(tiny_model_dir, {**overrides, **SPLIT_MASKING})
        jobs.append((normalize, cfg.model_dump(), rows_by_rank, deepspeed_config))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.start_processes(
        _data_parallel_rank, args=(2, port, jobs, str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 600
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the data-parallel ranks did not finish in 600 s")
    for normalize in NORMALIZATIONS:
        reference = split_runs(normalize, 4, 4)
        reports = json.loads((tmp_path / f"{normalize}.json").read_text())
        _assert_same_steps(reports, [m for m, _ in reference], normalize)
        assert reports[0]["trained_tokens_rank"] < reports[0]["trained_tokens"]  # each rank holds a share
        _assert_same_model(tmp_path / normalize, reference[-1][1], normalize)


def test_scheduled_lambdas_weight_each_step(micro_rows, tiny_model_dir, tmp_path):
    """λ_I linear 1 -> 0 over 3 steps: each step reports its λ and, with per_part over l2t_full, its loss is
    λ_I·loss_instruction + λ_A·loss_response with exactly those λ (0·mean_I at the last step)."""
    schedule = {"lambda_instruction": {"kind": "linear", "end": 0.0}}
    reports = _train(
        tiny_model_dir,
        micro_rows,
        tmp_path,
        total_steps=3,
        micro_batch_size=4,
        gradient_accumulation=2,
        mode="l2t_full",
        normalize="per_part",
        lambda_instruction=1.0,
        lambda_response=2.0,
        schedule=schedule,
        export_model=False,
    )
    metrics = [m for m, _ in reports]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert [(m["lambda_instruction"], m["lambda_response"]) for m in metrics] == [(1.0, 2.0), (0.5, 2.0), (0.0, 2.0)]
    for m in metrics:
        want = m["lambda_instruction"] * m["loss_instruction"] + m["lambda_response"] * m["loss_response"]
        assert m["loss"] == pytest.approx(want, rel=1e-5)


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
        "lambda_instruction",
        "lambda_response",
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
    """Real DeepSpeed: l2t_full with λ_I = 0 and response-only VIT take bit-identical steps."""
    from transformers import AutoModelForImageTextToText

    settings = dict(total_steps=2, micro_batch_size=8, gradient_accumulation=2, lambda_response=1.0)
    l2t = _train(tiny_model_dir, micro_rows, tmp_path / "l2t", mode="l2t_full", lambda_instruction=0.0, **settings)
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


@pytest.mark.parametrize("mode", ["response", "l2t_full", "l2t_no_system", "l2t"])
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
