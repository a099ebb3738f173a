"""The per-worker training loop: batch, forward, λ loss, backward, step, report.

It knows nothing of Ray. The orchestrator hands it an iterator of
micro-batches and a `report` function (Ray Train's, in a cluster); a plain
process can run it the same way (tests, benchmarks). DeepSpeed runs the
optimizer, on CPU with gloo or on GPU with NCCL.

Loss normalization (docs/design.md, `workloads/loss.py`): each optimizer step
first builds its weight table (the masking mode with the step's scheduled λ_I and
λ_A, `workloads/schedules.py`, and the per-segment overrides), gathers its
`gradient_accumulation` micro-batches and sums their denominators [N, Σw, N_I,
N_A], all-reduced over ranks in one collective. Every micro-batch's loss then
divides each token's w·nll by the step's global denominator of its
normalization (`masking.normalize`): `tokens` by N (the trained tokens, w > 0),
`weight` by Σw, `per_part` by N_I for instruction-side and N_A for response-side
tokens (λ_I·mean_I + λ_A·mean_A with uniform weights). Every ZeRO stage of
DeepSpeed averages gradients over the data-parallel ranks (stage 0
`allreduce_bucket`, stage 1/2 `average_tensor`, stage 3 `__avg_scatter_grads`
all divide by the DP world size) and `backward` would divide by the
accumulation steps as well, so the backward pass undoes both (`loss *
world_size`, `scale_wrt_gas=False`): the step's gradient is then the gradient
of the normalized loss over the whole global batch, however it was split.
tests/test_train_loop.py checks it across accumulation and data-parallel
layouts in plain processes, tests/test_train_ray.py across Ray Train layouts.

Reported per step (sums over all ranks): loss, loss_instruction,
loss_response (mean nll per side, whatever the weights), tokens_instruction,
tokens_response, trained_tokens (N), trained_tokens_rank (this rank's share),
lambda_instruction and lambda_response (the step's scheduled λ), grad_norm, lr, tokens, tokens_per_s,
samples_per_s, step_time_s, padding_share (padded positions / all positions
of the step's micro-batches; padding_share_run since the start), tokens_per_s_run
(throughput since the end of the first step, over wall_s_run seconds and cpu_s_run
CPU seconds of this process), step_cpu_s, skipped_rows (rows the ingest dropped for
a bad image, when it counts them) and, on GPU, mfu and mfu_lm (the LM's FLOPs
alone). Step time is wall clock from the end of one step to the end of the next,
so waiting for data and reporting count.

The model trains in training mode without a KV cache (`prepare_for_training`), so
gradient checkpointing recomputes and dropout applies. Each micro-batch is padded or,
with `train.packing`, packed (`workloads/micro_batch.py`, `workloads/packing.py`);
its per-target nll comes from `workloads/forward.py` (`train.loss_kernel`: the
chunked LM head by default, never the full float32 logits).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from workloads.config import ExperimentConfig, MaskingConfig, TrainConfig
from workloads.forward import check_loss_kernel, engine_nll
from workloads.lora import apply_lora, quantized_loading, save_trained_model
from workloads.loss import l2t_loss_from_nll, step_denominators
from workloads.micro_batch import collate
from workloads.model import (
    TrainingFlops,
    apply_freeze_policy,
    load_model,
    load_processor,
    mfu,
    prepare_for_training,
    torch_dtype,
)
from workloads.schedules import masking_weight_table, scheduled_lambdas
from workloads.segment_codes import weights_from_table
from workloads.training_eval import TrainingEval
from workloads.visual_relevance import WEIGHT_SCALE, with_weight_scales

MODEL_SUBDIR = "model"
DEEPSPEED_SUBDIR = "deepspeed"
STATE_FILE = "l2t_state.json"


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
        dist.init_process_group(
            "nccl" if use_gpu else "gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"])
        )
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


def deepspeed_config_for(
    train: TrainConfig, deepspeed_config: dict[str, Any], bf16: bool, world_size: int
) -> dict[str, Any]:
    """The DeepSpeed JSON with its `auto` values filled in from the `train` section."""
    config = json.loads(json.dumps(deepspeed_config))
    config["train_micro_batch_size_per_gpu"] = train.micro_batch_size
    config["gradient_accumulation_steps"] = train.gradient_accumulation
    config["train_batch_size"] = train.micro_batch_size * train.gradient_accumulation * world_size
    config["gradient_clipping"] = train.grad_clip
    config["bf16"] = {"enabled": bf16}
    config.setdefault("fp16", {"enabled": False})
    config.setdefault("steps_per_print", 10**9)
    config.setdefault("wall_clock_breakdown", False)
    return config


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


TALLY = (
    "loss",
    "nll_instruction",
    "tokens_instruction",
    "nll_response",
    "tokens_response",
    "tokens",
    "length_squared",
    "samples",
    "positions",
    "images",
    "head_tokens",
    "skipped_rows",
)


def _tally(parts, batch: dict[str, Any], full_logits: bool) -> torch.Tensor:
    """One micro-batch's sums, in `TALLY` order, as one float64 tensor on the device (no host sync)."""
    lengths = batch["lengths"]
    ids, pixels = batch["input_ids"], batch.get("pixel_values")
    head = None if full_logits else batch["scored_index"].numel()  # the LM head's positions (MFU)
    shape = [lengths.numel(), ids.numel(), 0 if pixels is None else pixels.size(0), -1 if head is None else head]
    shape.append(batch["skipped_rows"])
    losses = (parts.loss, parts.nll_instruction, parts.tokens_instruction, parts.nll_response, parts.tokens_response)
    return torch.cat(
        [
            torch.stack([t.detach().double() for t in losses]),
            torch.stack([lengths.sum(), (lengths**2).sum()]),
            torch.tensor(shape, dtype=torch.float64, device=ids.device),
        ]
    )


class _Clock:
    """Step time (wall and this process's CPU) from the end of one step to the end of the next, so data
    waits and reports count; run totals: throughput after the first (warm-up) step, padding share."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        self.steady: list[float] | None = None  # tokens, wall, cpu since the end of the first step
        self.tokens = self.positions = 0.0

    def lap(self, tokens: float, samples: float, positions: float) -> dict[str, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        elapsed, cpu_elapsed = max(wall - self.wall, 1e-9), cpu - self.cpu
        self.wall, self.cpu = wall, cpu
        self.tokens += tokens
        self.positions += positions
        if self.steady is None:
            self.steady = [0.0, 0.0, 0.0]
            run = (tokens / elapsed, elapsed, cpu_elapsed)
        else:
            self.steady = [self.steady[0] + tokens, self.steady[1] + elapsed, self.steady[2] + cpu_elapsed]
            run = (self.steady[0] / self.steady[1], self.steady[1], self.steady[2])
        return {
            "tokens": tokens,
            "tokens_per_s": tokens / elapsed,
            "samples_per_s": samples / elapsed,
            "step_time_s": elapsed,
            "step_cpu_s": cpu_elapsed,
            "padding_share": 1.0 - tokens / positions,
            "padding_share_run": 1.0 - self.tokens / self.positions,
            "tokens_per_s_run": run[0],
            "wall_s_run": run[1],
            "cpu_s_run": run[2],
        }


def _grad_norm(engine) -> float:
    """2-norm of the (already all-reduced) gradients, for ZeRO stage 0."""
    norms = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def _read_state(resume_dir: str | None) -> dict[str, Any]:
    """What a checkpoint folder says about itself: {"step": k} (DeepSpeed state beside it) or the final export."""
    if not resume_dir or not (Path(resume_dir) / STATE_FILE).exists():
        return {"step": 0}
    return json.loads((Path(resume_dir) / STATE_FILE).read_text())


@dataclass
class Engine:
    """What one worker trains with: the DeepSpeed engine and the facts the steps need."""

    engine: Any
    scheduler: Any
    flops: TrainingFlops
    pad_token_id: int
    dtype: torch.dtype
    device: torch.device
    device_name: str
    loss_kernel: str = "chunked"
    loss_chunk_tokens: int = 1024
    packing: bool = False
    packing_length: int | None = None
    flat_packing: bool = False
    """Packed sequences as one flat row (FlashAttention's variable-length path) instead of a 4D mask."""

    @property
    def full_logits(self) -> bool:
        return self.loss_kernel == "full" or (self.loss_kernel == "chunked" and self.loss_chunk_tokens == 0)

    def collate(self, batch: dict[str, Any]) -> dict[str, Any]:
        return collate(
            batch,
            self.pad_token_id,
            self.device,
            packing=self.packing,
            packing_length=self.packing_length,
            flat=self.flat_packing,
            mask_dtype=self.dtype,
        )


def build_engine(cfg: ExperimentConfig, deepspeed_config: dict[str, Any], world_size: int, total_steps: int) -> Engine:
    """Model (`cfg.model.name_or_path`, frozen by policy), AdamW, the LR schedule, wrapped by DeepSpeed."""
    import deepspeed

    train, use_gpu = cfg.train, cfg.train.use_gpu
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if use_gpu else "cpu")
    if train.torch_threads:
        torch.set_num_threads(train.torch_threads)
    torch.manual_seed(train.seed)
    dtype = torch_dtype(cfg.model.dtype, use_gpu)
    model = load_model(
        cfg.model.name_or_path,
        dtype=dtype,
        attn_implementation=cfg.model.attn_implementation,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        use_gpu=use_gpu,
        **quantized_loading(cfg.model, dtype, use_gpu=use_gpu),  # QLoRA: a 4-bit base
    )
    apply_freeze_policy(model, cfg.model.freeze)
    model = apply_lora(model, cfg.model, use_gpu=use_gpu)  # model.lora: adapters, the rest frozen
    prepare_for_training(model)  # train(): checkpointing recomputes, dropout applies; no KV cache
    stage = int(deepspeed_config.get("zero_optimization", {}).get("stage", 0))
    check_loss_kernel(train.loss_kernel, model, use_gpu=use_gpu, zero_stage=stage)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=train.lr, weight_decay=train.weight_decay)
    factor = lr_multiplier(train.lr_schedule, train.warmup_steps(total_steps), total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config_for(train, deepspeed_config, dtype == torch.bfloat16, world_size),
        dist_init_required=False,
    )
    return Engine(
        engine=engine,
        scheduler=scheduler,
        flops=TrainingFlops.of(model),
        pad_token_id=model.config.get_text_config().pad_token_id or 0,
        dtype=dtype,
        device=device,
        device_name=torch.cuda.get_device_name() if use_gpu else "cpu",
        loss_kernel=train.loss_kernel,
        loss_chunk_tokens=train.loss_chunk_tokens,
        packing=train.packing,
        packing_length=train.packing_length,
        flat_packing=str(model.config.get_text_config()._attn_implementation).startswith("flash"),
    )


def run_training(
    cfg: ExperimentConfig,
    epoch_batches: Callable[[int, int], Iterable[dict]],
    report: Callable[[dict[str, float], str | None], None],
    *,
    rows: int,
    deepspeed_config: dict[str, Any],
    resume_dir: str | None = None,
    export_model: bool = True,
    training_eval: TrainingEval | None = None,
) -> dict[str, float]:
    """Train `cfg` (model from `cfg.model.name_or_path`) on `rows` prepared rows; returns the last step's metrics.

    `epoch_batches(epoch, skip)` yields this rank's micro-batches of one epoch
    in a fixed order, starting after the first `skip` (a resumed run's epoch
    starts where its checkpoint stopped, so the caller need not load what it
    skips). `report(metrics, checkpoint_dir)` is called on every rank at the
    same steps; `checkpoint_dir` holds this rank's files to persist.
    `training_eval`: a held-out check that rank 0 runs at its steps (ASHA's rungs, `workloads/training_eval.py`);
    those steps are always reported, and every report carries its latest value.
    """
    rank, world_size = ensure_process_group(cfg.train.use_gpu)
    state = _read_state(resume_dir)
    if state.get("final"):  # restarted after the export was reported: hand the same export back
        return _report_final_again(state, resume_dir, rank, report)
    train = cfg.train
    total_steps, steps_per_epoch = train.total_steps(rows), train.steps_per_epoch(rows)
    built = build_engine(cfg, deepspeed_config, world_size, total_steps)
    step = int(state["step"])
    if step:
        built.engine.load_checkpoint(str(Path(resume_dir) / DEEPSPEED_SUBDIR), tag=f"step{step}")

    metrics: dict[str, float] = {}
    held_out = training_eval.initial() if training_eval else {}
    clock = _Clock()
    epoch, steps_this_epoch = divmod(step, steps_per_epoch)
    while step < total_steps:
        micro_batches = epoch_batches(epoch, steps_this_epoch * train.gradient_accumulation)
        for group in _steps_of(iter(micro_batches), train.gradient_accumulation):
            totals = train_step(built, group, cfg.masking, world_size, step, total_steps)
            step += 1
            steps_this_epoch += 1
            metrics = step_metrics(built, totals, step, epoch, clock, world_size, train)
            due = training_eval is not None and training_eval.due(step)
            if due and rank == 0:
                held_out = training_eval(built.engine.module, cfg.model.name_or_path)
            metrics.update(held_out)
            _report_step(built.engine, train, step, total_steps, metrics, report, due)
            if step >= total_steps or steps_this_epoch >= steps_per_epoch:
                break
        epoch += 1
        steps_this_epoch = 0

    _export(built.engine, cfg.model.name_or_path, rank, metrics, report, export_model)
    return metrics


def train_step(
    built: Engine, group: list[dict], masking: MaskingConfig, world_size: int, step: int = 0, total_steps: int = 1
) -> dict[str, float]:
    """Optimizer step `step` (0-based) of `total_steps` over this rank's micro-batches; sums over all ranks."""
    engine = built.engine
    # 1. batch: this rank's micro-batches of the step, weighted with the step's λ; the step's denominators
    #    [N, Σw, N_I, N_A] over the whole global batch (one all-reduce)
    table = masking_weight_table(masking, step, total_steps)
    batches = [built.collate(with_weight_scales(b, masking)) for b in group]  # l2t_visual: × g(relevance)
    weights = [weights_from_table(b["segments"], table, b.get(WEIGHT_SCALE)) for b in batches]
    here = torch.stack([step_denominators(b["segments"], w) for b, w in zip(batches, weights)]).sum(dim=0)
    denominators = _all_reduce_sum(here.clone())
    plain_norm = None
    tally = []
    for batch, weight in zip(batches, weights):
        # 2. forward: each target's nll (`train.loss_kernel`: chunked LM head, Liger, or full logits)
        nll = engine_nll(engine, batch, built.dtype, built.loss_kernel, built.loss_chunk_tokens)
        # 3. λ loss: Σ w·nll / d, d the step's denominator of `masking.normalize` (of the token's part for per_part)
        parts = l2t_loss_from_nll(nll, batch["segments"], weight, denominators, masking.normalize)
        # 4. backward: undo DeepSpeed's mean over ranks; scale_wrt_gas=False keeps it from dividing by gas
        engine.backward(parts.loss * world_size, scale_wrt_gas=False)
        # 5. step: DeepSpeed reduces gradients and updates at the accumulation boundary
        if engine.is_gradient_accumulation_boundary() and engine.zero_optimization_stage() == 0:
            plain_norm = _grad_norm(engine)  # ZeRO-0 in fp32 clips without keeping the norm
        engine.step()
        tally.append(_tally(parts, batch, built.full_logits))
    # one host sync per step
    summed = _all_reduce_sum(torch.stack(tally).sum(dim=0))
    totals = dict(
        zip(TALLY + ("trained_tokens", "trained_tokens_rank"), torch.cat([summed, denominators[:1], here[:1]]).tolist())
    )
    grad_norm = engine.get_global_grad_norm()
    totals["grad_norm"] = float(plain_norm if grad_norm is None else grad_norm)
    totals["lambda_instruction"], totals["lambda_response"] = scheduled_lambdas(masking, step, total_steps)
    totals["reports_skipped_rows"] = any("skipped_rows" in b for b in group)
    return totals


def step_metrics(
    built: Engine, totals: dict[str, float], step: int, epoch: int, clock: _Clock, world_size: int, train: TrainConfig
) -> dict[str, float]:
    """What a step reports: losses per segment group, token counts, throughput, padding, lr (and MFU on GPU)."""
    metrics = {
        "step": step,
        "epoch": epoch,
        "loss": totals["loss"],
        "loss_instruction": _mean(totals["nll_instruction"], totals["tokens_instruction"]),
        "loss_response": _mean(totals["nll_response"], totals["tokens_response"]),
        "tokens_instruction": totals["tokens_instruction"],
        "tokens_response": totals["tokens_response"],
        "trained_tokens": totals["trained_tokens"],
        "trained_tokens_rank": totals["trained_tokens_rank"],
        "lambda_instruction": totals["lambda_instruction"],
        "lambda_response": totals["lambda_response"],
        "grad_norm": totals["grad_norm"],
        "lr": built.scheduler.get_last_lr()[0] if built.scheduler is not None else train.lr,
        **clock.lap(totals["tokens"], totals["samples"], totals["positions"]),
    }
    if totals.get("reports_skipped_rows"):
        metrics["skipped_rows"] = totals["skipped_rows"]
    if train.use_gpu:
        head = None if totals["head_tokens"] < 0 else totals["head_tokens"]
        args = (totals["tokens"], totals["length_squared"])
        step_flops = built.flops.step(*args, int(totals["images"]), head)
        metrics["mfu"] = mfu(step_flops, metrics["step_time_s"], world_size, built.device_name)
        metrics["mfu_lm"] = mfu(built.flops.step(*args, 0, head), metrics["step_time_s"], world_size, built.device_name)
    return metrics


def _mean(total: float, count: float) -> float:
    return total / count if count else math.nan


def _report_step(
    engine, train: TrainConfig, step: int, total_steps: int, metrics: dict[str, float], report, due: bool = False
) -> None:
    """Report every `log_every` steps (and when `due`); every `checkpoint_every` steps with a resumable checkpoint."""
    if step >= total_steps:
        return  # the final step is reported with the export
    if train.checkpoint_every and step % train.checkpoint_every == 0:
        with tempfile.TemporaryDirectory(prefix="l2t-ckpt-") as tmp:
            engine.save_checkpoint(str(Path(tmp) / DEEPSPEED_SUBDIR), tag=f"step{step}")
            (Path(tmp) / STATE_FILE).write_text(json.dumps({"step": step}))
            report(metrics, tmp)
    elif due or step % train.log_every == 0:
        report(metrics, None)


def _export(engine, model_path: str, rank: int, metrics: dict[str, float], report, export_model: bool) -> None:
    """The final model as a `save_pretrained` folder (with the processor), reported by rank 0."""
    zero3 = engine.zero_optimization_stage() == 3
    state_dict = engine._zero3_consolidated_16bit_state_dict() if zero3 else None
    with tempfile.TemporaryDirectory(prefix="l2t-export-") as tmp:
        checkpoint_dir = None
        if rank == 0 and export_model:
            target = Path(tmp) / MODEL_SUBDIR
            save_trained_model(engine.module, target, state_dict)  # with LoRA: merged, or the adapter
            load_processor(model_path).save_pretrained(target)
            (Path(tmp) / STATE_FILE).write_text(
                json.dumps({"step": int(metrics.get("step", 0)), "final": True, "metrics": metrics})
            )
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
