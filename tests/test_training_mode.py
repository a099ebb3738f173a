"""The engine trains in training mode: checkpointing recomputes, dropout applies, no KV cache; metrics."""

import pytest
import torch
from test_train_loop import _loop_config, _train, micro_rows  # noqa: F401  (the fixture)

ZERO2 = {"zero_optimization": {"stage": 2}}


def _engine(model_dir, **model_settings):
    from workloads.train_loop import build_engine, ensure_process_group

    ensure_process_group(False)
    cfg = _loop_config(model_dir, {"total_steps": 2, "micro_batch_size": 4, "torch_threads": 1, **model_settings})
    return build_engine(cfg, ZERO2, world_size=1, total_steps=2), cfg


def _group(rows, micro=4, skipped=None):
    batch = {k: [r[k] for r in rows[:micro]] for k in rows[0]}
    if skipped is not None:
        batch["skipped_rows"] = skipped
    return [batch]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradient_checkpointing_recomputes_in_the_training_step(micro_rows, tiny_model_dir, checkpointing):  # noqa: F811
    """model.gradient_checkpointing=true: a decoder layer's MLP runs twice per training step (forward, then the
    recompute in backward), once without; transformers recomputes only in train mode, which the engine is in."""
    from workloads.train_loop import train_step

    built, cfg = _engine(tiny_model_dir, gradient_checkpointing=checkpointing)
    model = built.engine.module
    assert model.training and all(m.training for m in model.modules())
    calls, caches = [], []
    # a pre-hook: torch stops a recompute once the saved tensors are back, before the MLP's forward hooks
    model.model.language_model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    model.model.language_model.register_forward_hook(lambda module, args, output: caches.append(output.cache))
    train_step(built, _group(micro_rows), cfg.masking, world_size=1)
    assert len(calls) == (2 if checkpointing else 1)
    assert caches == [None]  # no KV cache is built while training


def _dropout_model(tiny_model_dir, tmp_path, dropout):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    model.config.text_config.attention_dropout = dropout
    model.config.vision_config.attention_dropout = dropout
    model.save_pretrained(tmp_path)
    return str(tmp_path)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_dropout_is_active_when_configured(micro_rows, tiny_model_dir, tmp_path, dropout):  # noqa: F811
    """Two training forwards of the same batch differ exactly when the model has dropout."""
    from workloads.forward import engine_nll

    built, _ = _engine(_dropout_model(tiny_model_dir, tmp_path / "model", dropout))
    batch = built.collate(_group(micro_rows)[0])
    with torch.no_grad():
        one, two = (engine_nll(built.engine, batch, built.dtype, "chunked", 64) for _ in range(2))
    assert torch.equal(one, two) == (dropout == 0.0)


def test_the_chunked_loss_leaves_the_tiny_training_curve_unchanged(micro_rows, tiny_model_dir, tmp_path):  # noqa: F811
    """A few steps of the tiny preset: chunked LM head (default), Liger-free full logits: the same losses."""
    settings = dict(total_steps=4, micro_batch_size=8, gradient_accumulation=1, export_model=False)
    chunked = _train(tiny_model_dir, micro_rows, tmp_path / "chunked", loss_chunk_tokens=48, **settings)
    full = _train(tiny_model_dir, micro_rows, tmp_path / "full", loss_kernel="full", **settings)
    assert len(chunked) == len(full) == 4
    for (a, _), (b, _) in zip(chunked, full):
        for key in ("loss", "loss_instruction", "loss_response"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert chunked[-1][0]["loss"] < chunked[0][0]["loss"]


def test_skipped_rows_are_summed_over_the_step_and_reported(micro_rows, tiny_model_dir):  # noqa: F811
    from workloads.train_loop import _Clock, step_metrics, train_step

    built, cfg = _engine(tiny_model_dir, gradient_accumulation=2)
    group = _group(micro_rows, skipped=2) + _group(micro_rows[4:], skipped=1)
    totals = train_step(built, group, cfg.masking, world_size=1)
    assert step_metrics(built, totals, 1, 0, _Clock(), 1, cfg.train)["skipped_rows"] == 3
    plain = train_step(built, _group(micro_rows) + _group(micro_rows[4:]), cfg.masking, world_size=1)
    assert "skipped_rows" not in step_metrics(built, plain, 2, 0, _Clock(), 1, cfg.train)
