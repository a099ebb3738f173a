"""Tokens/s, MFU and memory of the training step on one GPU, padded and packed, L2T against response-only.

Run (one H100/H200, about 5 minutes): ``python benchmarks/gpu.py``;
on CPU, every code path in miniature: ``python benchmarks/gpu.py --smoke-on-cpu``.

One process, no Ray: the worker's own code (`build_engine`, `train_step`) on
random-weight models built from configs (`workloads.model.tinyllava_config`,
`llava_config`), vision tower frozen (the paper's fine-tuning), bf16, AdamW:

- ``tinyllava-0.5b``: Qwen2-0.5B + SigLIP-so400m/14 at 384 px (729 image tokens),
  ZeRO-2 (`configs/deepspeed/zero2.json`);
- ``llava-1.5-7b-cut``: Vicuna-7B's widths (4096, MLP 11008, 32 heads, vocab 32064) +
  CLIP ViT-L/14 at 336 px (576 image tokens), with as many LM layers as fit 45% of the
  GPU's memory at ~20 bytes per trained parameter (`--llava7b-layers` overrides),
  ZeRO-3 (`configs/deepspeed/zero3.json`).

Rows: one image each plus text of the LLaVA-665K-like length mix of
`benchmarks/packing.py`, capped at 2048 tokens, length-grouped by the data plan
(`BatchPlan`). Each round trains the same micro-batch four ways, in rotating order:
padded and packed (`train.packing`), masking `l2t` and `response`; the first
`--warmup` rounds are dropped. Per way: median step time, tokens/s, MFU (PaLM
convention, `TrainingFlops`: with the frozen tower's forward and the connector, and
of the LM alone), peak `torch.cuda.max_memory_allocated`. The attention kernel is
`model.attn_implementation=auto` (FlashAttention-2 when `pip install .[gpu]` put
it there, SDPA otherwise) and is recorded. Goals: MFU >= 40% (7B shape), >= 30%
(0.5B), L2T/response step time <= 1.02.

Writes ``benchmarks/results/gpu.json`` after each shape (a shape that fails records
its error); ``--smoke-on-cpu`` writes to a temporary file unless ``--output`` says.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = ROOT / "benchmarks" / "results" / "gpu.json"
GOALS = {"mfu": {"llava-1.5-7b-cut": 0.40, "tinyllava-0.5b": 0.30}, "l2t_over_response_step_time": 1.02}
VICUNA_7B = dict(
    vocab_size=32064,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    pad_token_id=0,
)
CLIP_L_336 = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
    patch_size=14, projection_dim=768,
)  # fmt: skip
MINI_TEXT = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)  # fmt: skip
MINI_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14
)
LAYER_PARAMS_7B = 4 * 4096**2 + 3 * 4096 * 11008
EMBEDDING_PARAMS_7B = 2 * 32064 * 4096
BYTES_PER_TRAINED_PARAM = 20  # bf16 weight and gradient, fp32 master, Adam's two moments, ZeRO's fp32 gradient


def llava7b_layers(total_memory: int) -> int:
    fit = (0.45 * total_memory / BYTES_PER_TRAINED_PARAM - EMBEDDING_PARAMS_7B) / LAYER_PARAMS_7B
    return int(min(32, max(2, math.floor(fit))))


def shape_config(shape: str, smoke: bool, layers: int | None):
    from transformers import CLIPVisionConfig, LlamaConfig

    from workloads.model import llava_config, tinyllava_config

    if shape == "tinyllava-0.5b":
        return tinyllava_config(text=MINI_TEXT if smoke else None, vision=MINI_VISION if smoke else None)
    text = {**VICUNA_7B, "num_hidden_layers": layers} if not smoke else {**MINI_TEXT, "num_hidden_layers": 2}
    vision = {**CLIP_L_336} if not smoke else {**MINI_VISION, "projection_dim": 32}
    return llava_config(LlamaConfig(**text), CLIPVisionConfig(**vision), image_token_id=text["vocab_size"] - 1)


def write_model(config, folder: Path, use_gpu: bool) -> str:
    """Random weights (bf16 on GPU), saved so that `build_engine` loads them as it loads any checkpoint."""
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    with torch.device("cuda" if use_gpu else "cpu"):
        model = LlavaForConditionalGeneration(config).to(torch.bfloat16 if use_gpu else torch.float32)
    model.save_pretrained(folder)
    del model
    return str(folder)


def gpu_rows(config, count: int, max_length: int, seed: int = 0) -> list[dict]:
    """One image and LLaVA-665K-like text per row: system, role, image, instruction, role, response, EOS."""
    from packing import llava_665k_like_lengths

    from workloads.model import num_image_tokens
    from workloads.segment_codes import Segment

    rng = np.random.default_rng(seed)
    image_tokens, vision = num_image_tokens(config), config.vision_config
    texts = np.minimum(llava_665k_like_lengths(count, seed), max_length - image_tokens)
    rows = []
    for text in texts:
        text = max(int(text), 32)
        response = int(rng.integers(text // 4, text // 2 + 1))
        instruction = text - response - 13  # system 8, roles 2 + 2, end of turn 1
        segments = (
            [Segment.SYSTEM] * 8 + [Segment.ROLE] * 2 + [Segment.IMAGE] * image_tokens
            + [Segment.INSTRUCTION] * instruction + [Segment.ROLE] * 2 + [Segment.RESPONSE] * response
            + [Segment.END_OF_TURN]
        )  # fmt: skip
        segments = np.asarray(segments, dtype=np.int8)
        ids = rng.integers(3, config.text_config.vocab_size - 2, size=len(segments))
        ids[segments == Segment.IMAGE] = config.image_token_id
        pixels = rng.standard_normal((1, 3, vision.image_size, vision.image_size), dtype=np.float32)
        rows.append({"input_ids": ids.astype(np.int32), "segments": segments, "pixel_values": pixels})
    return rows


def experiment(model_dir: str, args, use_gpu: bool, shape: str):
    from workloads.config import ExperimentConfig

    return ExperimentConfig.model_validate(
        {
            "data": {"sources": ["rows-in-memory.jsonl"]},  # the rows are handed over in memory
            "model": {
                "name_or_path": model_dir,
                "freeze": "vision_tower",
                "dtype": "bfloat16" if use_gpu else "float32",
                "gradient_checkpointing": args.checkpointing,
            },
            "masking": {"mode": "l2t", "lambda_instruction": 0.5},
            "train": {
                "lr": 1e-5,
                "lr_schedule": "constant",
                "warmup_ratio": 0.0,
                "micro_batch_size": args.micro_batch[shape],
                "num_workers": 1,
                "use_gpu": use_gpu,
                "loss_kernel": args.loss_kernel,
            },
        }
    )


WAYS = [(False, "l2t"), (False, "response"), (True, "l2t"), (True, "response")]


def _way_name(packing: bool, mode: str) -> str:
    return f"{'packed' if packing else 'padded'}_{mode}"


def run_rounds(built, cfg, rows, args, deadline: float) -> dict[str, list[dict]]:
    """Each round: the same micro-batch through the four ways, in rotating order; per-step records."""
    import torch

    from workloads.batching import BatchPlan
    from workloads.config import MaskingConfig
    from workloads.train_loop import train_step

    micro = cfg.train.micro_batch_size
    plan = BatchPlan(np.array([len(r["input_ids"]) for r in rows]), micro, 1, 1, seed=0)
    order = plan.micro_batches(0).reshape(-1, micro)
    use_gpu = cfg.train.use_gpu
    records: dict[str, list[dict]] = {_way_name(*w): [] for w in WAYS}
    for r, ids in enumerate(order[: args.warmup + args.rounds]):
        if r > args.warmup and time.perf_counter() > deadline:
            break
        group = [{k: [rows[i][k] for i in ids] for k in rows[0]}]
        for k in range(len(WAYS)):
            packing, mode = WAYS[(r + k) % len(WAYS)]
            built.packing = packing
            masking = MaskingConfig.model_validate({**cfg.masking.model_dump(), "mode": mode})
            if use_gpu:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            totals = train_step(built, group, masking, 1, step=r, total_steps=10**6)  # ends in a host sync
            seconds = time.perf_counter() - started
            peak = torch.cuda.max_memory_allocated() / 2**30 if use_gpu else None
            if r >= args.warmup:
                records[_way_name(packing, mode)].append({**totals, "seconds": seconds, "peak_gib": peak})
    return records


def summarize(built, records: dict[str, list[dict]]) -> dict:
    from workloads.model import mfu

    out: dict = {}
    for way, steps in records.items():
        if not steps:
            continue
        seconds = statistics.median(s["seconds"] for s in steps)
        tokens = statistics.median(s["tokens"] for s in steps)

        def flops(step: dict, images: bool) -> float:
            head = None if step["head_tokens"] < 0 else step["head_tokens"]
            return built.flops.step(step["tokens"], step["length_squared"], int(step["images"]) if images else 0, head)

        out[way] = {
            "step_time_s": round(seconds, 4),
            "tokens_per_s": round(tokens / seconds, 1),
            "mfu": _finite(statistics.median(mfu(flops(s, True), s["seconds"], 1, built.device_name) for s in steps)),
            "mfu_lm_only": _finite(
                statistics.median(mfu(flops(s, False), s["seconds"], 1, built.device_name) for s in steps)
            ),
            "peak_memory_gib": max(s["peak_gib"] for s in steps) if steps[0]["peak_gib"] is not None else None,
            "padding_share": round(statistics.median(1 - s["tokens"] / s["positions"] for s in steps), 4),
            "loss": round(statistics.median(s["loss"] for s in steps), 5),
            "steps": len(steps),
        }
    for layout in ("padded", "packed"):
        if f"{layout}_l2t" in out and f"{layout}_response" in out:
            ratio = out[f"{layout}_l2t"]["step_time_s"] / out[f"{layout}_response"]["step_time_s"]
            out[f"l2t_over_response_step_time_{layout}"] = round(ratio, 4)
    if "packed_l2t" in out and "padded_l2t" in out:
        ratio = out["packed_l2t"]["tokens_per_s"] / out["padded_l2t"]["tokens_per_s"]
        out["tokens_per_s_ratio_packed_vs_padded"] = round(ratio, 3)
    return out


def _finite(value: float) -> float | None:
    return None if value is None or math.isnan(value) else round(value, 4)


def measure_shape(shape: str, args, use_gpu: bool, deadline: float) -> dict:
    import torch

    from workloads.train_loop import build_engine, ensure_process_group

    ensure_process_group(use_gpu)
    memory = torch.cuda.get_device_properties(0).total_memory if use_gpu else 0
    layers = args.llava7b_layers or (llava7b_layers(memory) if use_gpu else 2)
    config = shape_config(shape, args.smoke_on_cpu, layers)
    zero = "zero2" if shape == "tinyllava-0.5b" else "zero3"
    deepspeed_config = json.loads((ROOT / "configs" / "deepspeed" / f"{zero}.json").read_text())
    rows = gpu_rows(config, args.micro_batch[shape] * (args.warmup + args.rounds), args.max_length)
    with tempfile.TemporaryDirectory(prefix=f"l2t-gpu-{shape}-") as tmp:
        started = time.perf_counter()
        cfg = experiment(write_model(config, Path(tmp), use_gpu), args, use_gpu, shape)
        built = build_engine(cfg, deepspeed_config, world_size=1, total_steps=10**6)
        setup_s = time.perf_counter() - started
        records = run_rounds(built, cfg, rows, args, deadline)
    result = summarize(built, records)
    model = built.engine.module
    result.update(
        {
            "zero_stage": int(zero[-1]),
            "lm_layers": config.text_config.num_hidden_layers,
            "lm_params": sum(p.numel() for n, p in model.named_parameters() if "vision_tower" not in n),
            "vision_params": sum(p.numel() for n, p in model.named_parameters() if "vision_tower" in n),
            "attn_implementation": model.config.get_text_config()._attn_implementation,
            "flat_packing": built.flat_packing,
            "loss_kernel": built.loss_kernel,
            "micro_batch_size": cfg.train.micro_batch_size,
            "gradient_checkpointing": args.checkpointing,
            "mean_row_tokens": round(float(np.mean([len(r["input_ids"]) for r in rows])), 1),
            "setup_s": round(setup_s, 1),
        }
    )
    if hasattr(built.engine, "destroy"):
        built.engine.destroy()
    del built, model
    gc.collect()
    if use_gpu:
        torch.cuda.empty_cache()
    return result


def _environment(use_gpu: bool) -> dict:
    import importlib.metadata as metadata

    import torch

    versions = {}
    for package in ("torch", "transformers", "deepspeed", "flash-attn", "liger-kernel"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "gpu_name": torch.cuda.get_device_name() if use_gpu else "cpu (smoke)",
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if use_gpu else None,
        "versions": versions,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["tinyllava-0.5b", "llava-1.5-7b-cut"])
    parser.add_argument("--rounds", type=int, default=8, help="measured rounds (each: the four ways)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--micro-batch-0.5b", dest="mb05", type=int, default=16)
    parser.add_argument("--micro-batch-7b", dest="mb7", type=int, default=8)
    parser.add_argument("--llava7b-layers", type=int, default=None, help="LM layers of the 7B shape (default: fit)")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--checkpointing", action="store_true", help="model.gradient_checkpointing")
    parser.add_argument("--loss-kernel", default="chunked", choices=("chunked", "full", "liger"))
    parser.add_argument("--time-budget-s", type=float, default=420.0, help="stop adding rounds past this")
    parser.add_argument("--smoke-on-cpu", action="store_true", help="miniature shapes on CPU: the code path only")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    args.micro_batch = {"tinyllava-0.5b": args.mb05, "llava-1.5-7b-cut": args.mb7}

    import torch

    use_gpu = not args.smoke_on_cpu
    if use_gpu and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or --smoke-on-cpu for the code path")
    if args.smoke_on_cpu:
        args.micro_batch = {shape: 4 for shape in args.micro_batch}
        args.max_length = min(args.max_length, 256)
    output = args.output or (Path(tempfile.gettempdir()) / "l2t_gpu_smoke.json" if args.smoke_on_cpu else RESULTS)
    started = time.perf_counter()
    result: dict = {**_environment(use_gpu), "goals": GOALS, "shapes": {}}
    for shape in args.shapes:
        deadline = started + args.time_budget_s * (args.shapes.index(shape) + 1) / len(args.shapes)
        try:
            result["shapes"][shape] = measure_shape(shape, args, use_gpu, deadline)
        except Exception as error:  # record it and go on to the next shape
            result["shapes"][shape] = {"error": f"{type(error).__name__}: {error}"}
        result["wall_s"] = round(time.perf_counter() - started, 1)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2) + "\n")
        print(f"{shape}: {json.dumps(result['shapes'][shape])}", flush=True)
    print(f"wrote {output} in {result['wall_s']} s", flush=True)
    return result


if __name__ == "__main__":
    main()
