"""The per-worker training loop: batch, forward, λ loss, backward, step, report.

It knows nothing of Ray. The orchestrator hands it an iterator of
micro-batches and a `report` function (Ray Train's, in a cluster); a plain
process can run it the same way (tests, benchmarks). DeepSpeed runs the
optimizer, on CPU with gloo or on GPU with NCCL.

Loss normalization (DESIGN.md): each optimizer step first gathers its
`gradient_accumulation` micro-batches, counts the trained tokens in all of
them and all-reduces that count over ranks, so every micro-batch's loss is
Σ w·nll / N with the step's global N. Every ZeRO stage of DeepSpeed averages
gradients over the data-parallel ranks (stage 0 `allreduce_bucket`, stage 1/2
`average_tensor`, stage 3 `__avg_scatter_grads` all divide by the DP world
size) and `backward` would divide by the accumulation steps as well, so the
backward pass undoes both (`loss * world_size`, `scale_wrt_gas=False`): the
step's gradient is then ∇(Σ w·nll / N) over the whole global batch, however
it was split. tests/test_train_ray.py checks it across Ray Train layouts.

Reported per step (rank 0's view of all-reduced values): loss,
loss_instruction, loss_response, tokens_instruction, tokens_response,
trained_tokens, grad_norm, lr, tokens_per_s, samples_per_s, step_time_s,
padding_share (and padding_share_run since start), mfu on GPU. Step time is
wall clock from the end of one step to the end of the next, so waiting for
data and reporting count.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from workloads.loss import count_trained_tokens, l2t_loss
from workloads.model import TrainingFlops, apply_freeze_policy, load_model, load_processor, mfu, torch_dtype
from workloads.segments import Segment, token_weights

MODEL_SUBDIR = "model"
DEEPSPEED_SUBDIR = "deepspeed"
STATE_FILE = "l2t_state.json"


@dataclass
class TrainSpec:
    """Everything one worker needs to train; plain values, built from the experiment config."""

    model_path: str
    total_steps: int
    steps_per_epoch: int
    mode: str = "l2t"
    lambda_instruction: float = 1.0
    lambda_response: float = 1.0
    freeze: str = "vision_tower"
    lr: float = 2e-5
    lr_schedule: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch_size: int = 4
    gradient_accumulation: int = 1
    seed: int = 0
    use_gpu: bool = False
    dtype: str = "auto"
    attn_implementation: str = "auto"
    gradient_checkpointing: bool = False
    deepspeed_config: dict[str, Any] = field(default_factory=lambda: {"zero_optimization": {"stage": 2}})
    checkpoint_every: int = 0
    log_every: int = 1
    export_model: bool = True
    torch_threads: int | None = None
    """torch intra-op threads per worker (None: torch's default)."""
    fail_at_step: int | None = None
    """Test hook: raise in rank 0 after this step, once (a file marks it done)."""
    fail_marker: str | None = None


def ensure_process_group(use_gpu: bool) -> tuple[int, int]:
    """(rank, world size); starts a one-process group when none exists (a bare process)."""
    if use_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group("nccl" if use_gpu else "gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    return dist.get_rank(), dist.get_world_size()


def lr_multiplier(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LambdaLR factor: linear warm-up, then cosine / linear decay to 0, or constant."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def deepspeed_config_for(spec: TrainSpec, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON with its `auto` values filled in from the spec."""
    config = json.loads(json.dumps(spec.deepspeed_config))
    config["train_micro_batch_size_per_gpu"] = spec.micro_batch_size
    config["gradient_accumulation_steps"] = spec.gradient_accumulation
    config["train_batch_size"] = spec.micro_batch_size * spec.gradient_accumulation * world_size
    config["gradient_clipping"] = spec.grad_clip
    bf16 = torch_dtype(spec.dtype, spec.use_gpu) == torch.bfloat16
    config["bf16"] = {"enabled": bf16}
    config.setdefault("fp16", {"enabled": False})
    config.setdefault("steps_per_print", 10**9)
    config.setdefault("wall_clock_breakdown", False)
    return config


def collate(batch: dict[str, Any], pad_token_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Pad one micro-batch of prepared rows (`input_ids`, `segments`, `pixel_values`) into tensors."""
    rows_ids = [np.asarray(x) for x in batch["input_ids"]]
    rows_segments = [np.asarray(x) for x in batch["segments"]]
    length = max(len(x) for x in rows_ids)
    input_ids = np.full((len(rows_ids), length), pad_token_id, dtype=np.int64)
    segments = np.full((len(rows_ids), length), int(Segment.PAD), dtype=np.int64)
    for i, (ids, segs) in enumerate(zip(rows_ids, rows_segments)):
        input_ids[i, : len(ids)] = ids
        segments[i, : len(segs)] = segs
    out = {
        "input_ids": torch.from_numpy(input_ids).to(device),
        "segments": torch.from_numpy(segments).to(device),
    }
    out["attention_mask"] = (out["segments"] != int(Segment.PAD)).long()
    images = [np.asarray(x, dtype=np.float32) for x in batch.get("pixel_values", []) if x is not None and len(x)]
    if images:
        out["pixel_values"] = torch.from_numpy(np.concatenate(images, axis=0)).to(device)
    return out


def _steps_of(micro_batches: Iterator[dict], size: int) -> Iterator[list[dict]]:
    group: list[dict] = []
    for batch in micro_batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []


def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over data-parallel ranks, in place (no host sync)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values)
    return values


def _read_state(resume_dir: str | None) -> dict[str, Any]:
    """What a checkpoint folder says about itself: {"step": k} (DeepSpeed state beside it) or the final export."""
    if not resume_dir or not (Path(resume_dir) / STATE_FILE).exists():
        return {"step": 0}
    return json.loads((Path(resume_dir) / STATE_FILE).read_text())


def run_training(
    spec: TrainSpec,
    epoch_batches: Callable[[int], Iterable[dict]],
    report: Callable[[dict[str, float], str | None], None],
    *,
    resume_dir: str | None = None,
) -> dict[str, float]:
    """Train for `spec.total_steps` optimizer steps; returns the last step's metrics.

    `epoch_batches(epoch)` yields this rank's micro-batches for one epoch, in a
    fixed order. `report(metrics, checkpoint_dir)` is called on every rank at
    the same steps; `checkpoint_dir` holds this rank's files to persist.
    """
    import deepspeed

    rank, world_size = ensure_process_group(spec.use_gpu)
    state = _read_state(resume_dir)
    if state.get("final"):  # restarted after the export was reported: hand the same export back
        return _report_final_again(state, resume_dir, rank, report)
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if spec.use_gpu else "cpu")
    if spec.torch_threads:
        torch.set_num_threads(spec.torch_threads)
    torch.manual_seed(spec.seed)

    dtype = torch_dtype(spec.dtype, spec.use_gpu)
    model = load_model(
        spec.model_path,
        dtype=dtype,
        attn_implementation=spec.attn_implementation,
        gradient_checkpointing=spec.gradient_checkpointing,
        use_gpu=spec.use_gpu,
    )
    apply_freeze_policy(model, spec.freeze)
    flops = TrainingFlops.of(model)
    pad_token_id = model.config.get_text_config().pad_token_id or 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=spec.lr, weight_decay=spec.weight_decay)
    warmup = int(round(spec.warmup_ratio * spec.total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(spec.lr_schedule, warmup, spec.total_steps))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config_for(spec, world_size),
        dist_init_required=False,
    )

    step = int(state["step"])
    if step:
        engine.load_checkpoint(str(Path(resume_dir) / DEEPSPEED_SUBDIR), tag=f"step{step}")

    gas = spec.gradient_accumulation
    metrics: dict[str, float] = {}
    run_positions = run_tokens = 0.0
    device_name = torch.cuda.get_device_name() if spec.use_gpu else "cpu"
    # A resumed run re-reads its epoch from the start and skips what the checkpoint already trained on.
    epoch, steps_this_epoch = divmod(step, spec.steps_per_epoch)
    tick = time.perf_counter()

    while step < spec.total_steps:
        iterator = iter(epoch_batches(epoch))
        for _ in range(steps_this_epoch * gas):
            next(iterator, None)
        for group in _steps_of(iterator, gas):
            if step >= spec.total_steps or steps_this_epoch >= spec.steps_per_epoch:
                continue  # drain the epoch so every rank leaves it together
            # 1. batch: this rank's micro-batches of the step; N = trained tokens of the whole global batch
            batches = [collate(b, pad_token_id, device) for b in group]
            weights = [
                token_weights(b["segments"], spec.mode, spec.lambda_instruction, spec.lambda_response) for b in batches
            ]
            trained_here = sum(count_trained_tokens(w) for w in weights).double()
            trained_tokens = _all_reduce_sum(trained_here.clone())

            tally = []  # per micro-batch: loss, nll_i, tok_i, nll_r, tok_r, tokens, Σlength², samples, positions, images
            for batch, weight in zip(batches, weights):
                # 2. forward
                pixel_values = batch.get("pixel_values")
                outputs = engine(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    pixel_values=None if pixel_values is None else pixel_values.to(dtype),
                )
                # 3. λ loss: Σ w·nll / N
                parts = l2t_loss(outputs.logits, batch["input_ids"], batch["segments"], weight, trained_tokens)
                # 4. backward: undo DeepSpeed's mean over ranks; scale_wrt_gas=False keeps it from dividing by gas
                engine.backward(parts.loss * world_size, scale_wrt_gas=False)
                # 5. step: DeepSpeed reduces gradients and updates at the accumulation boundary
                engine.step()
                lengths = batch["attention_mask"].sum(dim=1).double()
                shape = [batch["input_ids"].size(0), batch["input_ids"].numel(), 0 if pixel_values is None else pixel_values.size(0)]
                tally.append(torch.cat([
                    torch.stack([t.detach().double() for t in (parts.loss, parts.nll_instruction, parts.tokens_instruction, parts.nll_response, parts.tokens_response)]),
                    torch.stack([lengths.sum(), (lengths**2).sum()]),
                    torch.tensor(shape, dtype=torch.float64, device=device),
                ]))
            step += 1
            steps_this_epoch += 1

            # 6. report (one host sync per step)
            summed = _all_reduce_sum(torch.stack(tally).sum(dim=0)).tolist()
            loss, nll_i, tok_i, nll_r, tok_r, tokens, length_sq, samples, positions, images = summed
            trained_tokens, trained_here = float(trained_tokens), float(trained_here)
            grad_norm = engine.get_global_grad_norm()
            now = time.perf_counter()
            elapsed = max(now - tick, 1e-9)
            run_positions += positions
            run_tokens += tokens
            metrics = {
                "step": step,
                "epoch": epoch,
                "loss": loss,
                "loss_instruction": nll_i / tok_i if tok_i else float("nan"),
                "loss_response": nll_r / tok_r if tok_r else float("nan"),
                "tokens_instruction": tok_i,
                "tokens_response": tok_r,
                "trained_tokens": trained_tokens,
                "trained_tokens_rank": trained_here,
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "lr": scheduler.get_last_lr()[0] if scheduler is not None else spec.lr,
                "tokens": tokens,
                "tokens_per_s": tokens / elapsed,
                "samples_per_s": samples / elapsed,
                "step_time_s": elapsed,
                "padding_share": 1.0 - tokens / positions,
                "padding_share_run": 1.0 - run_tokens / run_positions,
            }
            if spec.use_gpu:
                metrics["mfu"] = mfu(flops.step(tokens, length_sq, int(images)), elapsed, world_size, device_name)

            checkpoint_due = spec.checkpoint_every and step % spec.checkpoint_every == 0 and step < spec.total_steps
            if checkpoint_due:
                with tempfile.TemporaryDirectory(prefix="l2t-ckpt-") as tmp:
                    engine.save_checkpoint(str(Path(tmp) / DEEPSPEED_SUBDIR), tag=f"step{step}")
                    (Path(tmp) / STATE_FILE).write_text(json.dumps({"step": step}))
                    report(metrics, tmp)
            elif step % spec.log_every == 0 and step < spec.total_steps:
                report(metrics, None)

            if spec.fail_at_step is not None and step == spec.fail_at_step and rank == 0:
                marker = Path(spec.fail_marker or Path(tempfile.gettempdir()) / "l2t-fail-marker")
                if not marker.exists():
                    marker.write_text(str(step))
                    raise RuntimeError(f"injected failure after step {step}")
            tick = now  # reporting and the next step's data wait count toward the next step
        epoch += 1
        steps_this_epoch = 0

    _export(engine, spec, rank, metrics, report)
    return metrics


def _export(engine, spec: TrainSpec, rank: int, metrics: dict[str, float], report) -> None:
    """The final model as a `save_pretrained` folder (with the processor), reported by rank 0."""
    zero3 = engine.zero_optimization_stage() == 3
    state_dict = engine._zero3_consolidated_16bit_state_dict() if zero3 else None
    with tempfile.TemporaryDirectory(prefix="l2t-export-") as tmp:
        checkpoint_dir = None
        if rank == 0 and spec.export_model:
            target = Path(tmp) / MODEL_SUBDIR
            engine.module.save_pretrained(target, state_dict=state_dict)
            load_processor(spec.model_path).save_pretrained(target)
            (Path(tmp) / STATE_FILE).write_text(json.dumps({"step": int(metrics.get("step", 0)), "final": True, "metrics": metrics}))
            checkpoint_dir = tmp
        report({**metrics, "final": 1}, checkpoint_dir)


def _report_final_again(state: dict[str, Any], resume_dir: str, rank: int, report) -> dict[str, float]:
    metrics = dict(state.get("metrics") or {"step": state["step"]})
    with tempfile.TemporaryDirectory(prefix="l2t-export-") as tmp:
        checkpoint_dir = None
        if rank == 0:
            shutil.copytree(resume_dir, tmp, dirs_exist_ok=True)
            checkpoint_dir = tmp
        report({**metrics, "final": 1}, checkpoint_dir)
    return metrics
