"""What does the L2T loss cost per step, what does Ray Train cost, and how well does a GPU step run?

Run: ``python benchmarks/train_step.py [--steps N] [--repeats R] [--skip-ray] [--skip-gpu]``

(a) l2t vs response step time: the same training loop (``run_training``,
    DeepSpeed ZeRO-2, gloo, one bare process, the tiny LLaVA on CPU) on the
    same prepared rows, once with ``masking.mode=l2t`` and once with
    ``response``; runs interleaved ``--repeats`` times; the median step time of
    every step after the first two (wall clock, and this process's CPU time,
    which moves less with the machine's load). Goal: ratio <= 1.02 (the paper:
    0.331 vs 0.334 steps/s, i.e. 1.009).
(b) Ray Train vs bare process: the same loop, the same config and data plan, as
    one Ray Train worker (``run_train``: TorchTrainer, Ray Data ingest,
    reports every ``log_every`` steps) and in this process;
    ``tokens_per_s_run`` (tokens / wall time after the first step, data waits
    and reports included) of each, interleaved (bare, Ray, bare, Ray, bare),
    ratio of the medians. Goal: ratio >= 0.9. Both get the same torch threads;
    Ray's data is materialized before the fit as the bare process's is in
    memory, so the ratio is the loop's overhead under Ray, not image decoding.
(c) On a machine with CUDA: tokens/s and MFU of a TinyLLaVA-0.5B-shaped model
    (Qwen2-0.5B LM, SigLIP-so400m/14 at 384 px, random weights) with ZeRO-2 in
    bf16, vision tower frozen; printed with the GPU's name. Skipped without
    CUDA. Goal: MFU >= 40%.

Writes ``benchmarks/results/train_step.json`` with
``l2t_over_response_step_time``, ``ray_over_bare_throughput`` (and ``gpu_mfu``,
``gpu_name``, ``gpu_tokens_per_s`` when measured), plus the details and the
load average: on a shared machine timings move with its load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")

from workloads.train_loop import run_training  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "train_step.json"


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def experiment(storage: Path, **train):
    from orchestrator.config import config_from_dict

    raw = {
        "name": "bench",
        "data": {
            "synthetic": {
                "train_rows": 1200,
                "eval_rows": 0,
                "max_objects": 1,
                "kinds": ["color", "shape", "exists", "caption"],
            },
            "chat_template": "vicuna_v1",
            "max_length": 128,
        },
        "model": {"name_or_path": "tiny", "freeze": "none"},
        "masking": {"mode": "l2t"},
        "train": {
            "lr": 1e-3,
            "lr_schedule": "constant",
            "warmup_ratio": 0.0,
            "micro_batch_size": 16,
            "gradient_accumulation": 1,
            "num_workers": 1,
            "log_every": 10,
            "ingest": "materialize",
            **train,
        },
        "storage": {"path": str(storage)},
    }
    return config_from_dict(raw)


def in_memory_rows(prepared, model_dir: str, image_root: str):
    """Every prepared row with its pixel values, read the way the Ray Data stage reads them."""
    from orchestrator.ingest import LoadRows, read_prepared_rows

    rows = read_prepared_rows(prepared)
    load = LoadRows(model_dir, prepared.shards, image_root)
    loaded = load(np.arange(len(rows.lengths)))
    by_row = {
        r: {k: loaded[k][i] for k in ("input_ids", "segments", "pixel_values")} for i, r in enumerate(loaded["row"])
    }
    return rows, by_row


def bare_batches(plan, by_row, micro: int):
    def epoch_batches(epoch: int, skip: int):
        order = plan.order(0, epoch)[skip * micro :]
        for start in range(0, len(order) - micro + 1, micro):
            chosen = [by_row[int(r)] for r in order[start : start + micro]]
            yield {k: [row[k] for row in chosen] for k in chosen[0]}

    return epoch_batches


def bare_run(cfg, epoch_batches, rows: int, deepspeed_config: dict) -> list[dict]:
    """`run_training` in this process (one rank, no export); every report's metrics."""
    reports: list[dict] = []
    run_training(
        cfg,
        epoch_batches,
        lambda metrics, _dir: reports.append(metrics),
        rows=rows,
        deepspeed_config=deepspeed_config,
        export_model=False,
    )
    return reports


def measure_cpu(args) -> dict:
    """(a) and (b) on the tiny model."""
    from orchestrator.cluster import connect
    from orchestrator.config import with_overrides
    from orchestrator.experiment import prepare_inputs
    from orchestrator.train import load_deepspeed_config, run_train
    from workloads.batching import BatchPlan

    storage = Path(tempfile.mkdtemp(prefix="l2t-bench-"))
    connect(num_cpus=os.cpu_count())
    cfg, model_dir, prepared = prepare_inputs(experiment(storage, max_steps=args.steps))
    rows, by_row = in_memory_rows(prepared, model_dir, cfg.data.image_root)
    threads = args.threads
    n_rows = len(rows.lengths)
    deepspeed = load_deepspeed_config(cfg.train.deepspeed)
    base = with_overrides(cfg, {"model.name_or_path": model_dir, "train.torch_threads": threads})
    step_cfg = with_overrides(base, {"train.log_every": 1})
    train = step_cfg.train
    plan = BatchPlan(rows.lengths, train.micro_batch_size, train.gradient_accumulation, 1, seed=train.seed)
    assert plan.steps_per_epoch == train.steps_per_epoch(n_rows)
    batches = bare_batches(plan, by_row, train.micro_batch_size)

    # (a) l2t vs response, interleaved runs; wall and CPU time of every step after the first two.
    wall: dict[str, list[float]] = {"l2t": [], "response": []}
    cpu: dict[str, list[float]] = {"l2t": [], "response": []}
    for repeat in range(args.repeats):
        for mode in ("l2t", "response") if repeat % 2 == 0 else ("response", "l2t"):
            run_cfg = with_overrides(step_cfg, {"masking.mode": mode})
            steps = [m for m in bare_run(run_cfg, batches, n_rows, deepspeed) if m["step"] > 2 and not m.get("final")]
            wall[mode] += [m["step_time_s"] for m in steps]
            cpu[mode] += [m["step_cpu_s"] for m in steps]
    median = {k: statistics.median(v) for k, v in wall.items()}
    median_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    out = {
        "l2t_over_response_step_time": median["l2t"] / median["response"],
        "l2t_over_response_step_cpu_time": median_cpu["l2t"] / median_cpu["response"],
        "l2t_step_time_s": median["l2t"],
        "response_step_time_s": median["response"],
        "steps_per_mode": len(wall["l2t"]),
    }
    print(
        f"(a) step time l2t {median['l2t'] * 1e3:.1f} ms vs response {median['response'] * 1e3:.1f} ms: ratio "
        f"{out['l2t_over_response_step_time']:.3f} "
        f"(CPU time {out['l2t_over_response_step_cpu_time']:.3f}); goal <= 1.02",
        flush=True,
    )

    # (b) Ray Train (one worker) vs the bare process, same loop and config, interleaved: bare, Ray, bare, Ray, bare.
    if not args.skip_ray:
        ray_cfg = with_overrides(cfg, {"train.torch_threads": threads})  # run_train sets model.name_or_path itself
        bare, ray, bare_cpu, ray_cpu = [], [], [], []

        def record(final: dict, wall_list: list, cpu_list: list) -> None:
            wall_list.append(final["tokens_per_s_run"])
            cpu_list.append(final["tokens_per_s_run"] * final["wall_s_run"] / final["cpu_s_run"])

        for attempt in range(args.ray_repeats):
            record(bare_run(base, batches, n_rows, deepspeed)[-1], bare, bare_cpu)
            result = run_train(ray_cfg, prepared, model_dir, f"bench-ray-{attempt}")
            record(result.final_metrics, ray, ray_cpu)
        record(bare_run(base, batches, n_rows, deepspeed)[-1], bare, bare_cpu)
        out.update(
            {
                "ray_over_bare_throughput": statistics.median(ray) / statistics.median(bare),
                "ray_over_bare_tokens_per_cpu_s": statistics.median(ray_cpu) / statistics.median(bare_cpu),
                "ray_tokens_per_s": ray,
                "bare_tokens_per_s": bare,
            }
        )
        print(
            f"(b) tokens/s Ray Train {[round(x) for x in ray]} vs bare process {[round(x) for x in bare]}: "
            f"ratio of medians {out['ray_over_bare_throughput']:.3f} "
            f"(per CPU second of the training process {out['ray_over_bare_tokens_per_cpu_s']:.3f}); goal >= 0.9",
            flush=True,
        )
    out.update(
        {
            "cpu_steps": args.steps,
            "micro_batch_size": train.micro_batch_size,
            "torch_threads": threads,
            "model": "tiny preset (CLIP 2x64, Llama 2x128)",
        }
    )
    return out


def write_gpu_model(out_dir: Path, shape: str) -> str:
    """A TinyLLaVA-0.5B-shaped LLaVA (random weights, bf16) as a local folder that `load_model` reads."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from workloads.model import tinyllava_config

    if shape == "tinyllava-0.5b":
        config = tinyllava_config()
    else:  # a miniature of the same composition, to exercise this path on CPU
        config = tinyllava_config(
            text={
                "vocab_size": 512,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "bos_token_id": 1,
                "eos_token_id": 2,
            },
            vision={
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "image_size": 56,
                "patch_size": 14,
            },
        )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlavaForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(out_dir)
    return str(out_dir)


def synthetic_gpu_rows(config, rows: int, text_tokens: int, seed: int = 0) -> list[dict]:
    """LLaVA-shaped rows: system + user turn with one image, instruction, response; random ids."""
    from workloads.model import num_image_tokens
    from workloads.segment_codes import Segment

    rng = np.random.default_rng(seed)
    image_tokens = num_image_tokens(config)
    vision = config.vision_config
    vocab = config.text_config.vocab_size - 2
    out = []
    for _ in range(rows):
        instruction = int(rng.integers(text_tokens // 4, text_tokens // 2))
        response = int(rng.integers(text_tokens // 4, text_tokens // 2))
        segments = (
            [Segment.SYSTEM] * 8
            + [Segment.ROLE] * 2
            + [Segment.IMAGE] * image_tokens
            + [Segment.INSTRUCTION] * instruction
            + [Segment.ROLE] * 2
            + [Segment.RESPONSE] * response
            + [Segment.END_OF_TURN]
        )
        ids = rng.integers(0, vocab, size=len(segments))
        ids[np.asarray(segments) == Segment.IMAGE] = config.image_token_id
        pixels = rng.standard_normal((1, 3, vision.image_size, vision.image_size)).astype(np.float32)
        out.append(
            {"input_ids": ids.astype(np.int32), "segments": np.asarray(segments, dtype=np.int8), "pixel_values": pixels}
        )
    return out


def measure_gpu(args, shape: str = "tinyllava-0.5b", use_gpu: bool = True) -> dict:
    """(c): ZeRO-2, bf16, one GPU, the vision tower frozen (the paper's fine-tuning setting)."""
    import torch
    from transformers import AutoConfig

    from orchestrator.config import config_from_dict
    from orchestrator.train import load_deepspeed_config

    with tempfile.TemporaryDirectory(prefix="l2t-gpu-model-") as tmp:
        model_dir = write_gpu_model(Path(tmp), shape)
        config = AutoConfig.from_pretrained(model_dir)
        rows = synthetic_gpu_rows(config, args.gpu_micro_batch * (args.gpu_steps + 1), args.gpu_text_tokens)
        cfg = config_from_dict(
            {
                "data": {"sources": ["rows-in-memory.jsonl"]},  # the rows are handed over in memory
                "model": {
                    "name_or_path": model_dir,
                    "freeze": "vision_tower",
                    "dtype": "bfloat16" if use_gpu else "float32",
                    "gradient_checkpointing": args.gpu_checkpointing,
                },
                "masking": {"mode": "l2t"},
                "train": {
                    "max_steps": args.gpu_steps,
                    "lr": 1e-5,
                    "micro_batch_size": args.gpu_micro_batch,
                    "gradient_accumulation": 1,
                    "num_workers": 1,
                    "use_gpu": use_gpu,
                    "log_every": 1,
                },
            }
        )
        micro = args.gpu_micro_batch

        def batches(epoch: int, skip: int):
            starts = list(range(0, len(rows) - micro + 1, micro))
            for start in starts[skip:]:
                chunk = rows[start : start + micro]
                yield {k: [r[k] for r in chunk] for k in chunk[0]}

        reports = bare_run(cfg, batches, len(rows), load_deepspeed_config("configs/deepspeed/zero2.json"))
    steady = [m for m in reports if m["step"] > min(3, args.gpu_steps - 1) and not m.get("final")] or reports[-1:]
    name = torch.cuda.get_device_name() if use_gpu else "cpu"
    out = {
        "gpu_name": name,
        "gpu_tokens_per_s": statistics.median(m["tokens_per_s"] for m in steady),
        "gpu_mfu": statistics.median(m.get("mfu", float("nan")) for m in steady),
        "gpu_step_time_s": statistics.median(m["step_time_s"] for m in steady),
        "gpu_micro_batch_size": micro,
        "gpu_sequence_length": int(np.mean([len(r["input_ids"]) for r in rows])),
        "gpu_shape": shape,
    }
    print(
        f"(c) {name}: {out['gpu_tokens_per_s']:.0f} tokens/s, MFU {out['gpu_mfu']:.1%} "
        f"({shape}, ZeRO-2 bf16, micro-batch {micro}, ~{out['gpu_sequence_length']} tokens/row; goal >= 40%)",
        flush=True,
    )
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per CPU run")
    parser.add_argument("--repeats", type=int, default=6, help="interleaved l2t/response runs")
    parser.add_argument("--ray-repeats", type=int, default=2, help="Ray Train fits, each between two bare runs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, the same in every run")
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--skip-cpu", action="store_true", help="only the GPU measurement")
    parser.add_argument("--skip-gpu", action="store_true")
    parser.add_argument("--gpu-steps", type=int, default=20)
    parser.add_argument("--gpu-micro-batch", type=int, default=16)
    parser.add_argument(
        "--gpu-text-tokens", type=int, default=320, help="text tokens per row beside the 729 image tokens"
    )
    parser.add_argument("--gpu-checkpointing", action="store_true")
    parser.add_argument(
        "--gpu-smoke-on-cpu", action="store_true", help=argparse.SUPPRESS
    )  # the GPU code path, miniature, on CPU
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    import torch

    result: dict = {"load_average_before": load_average(), "cpu_count": os.cpu_count(), "torch": torch.__version__}
    started = time.perf_counter()
    if args.gpu_smoke_on_cpu:
        return measure_gpu(args, shape="mini", use_gpu=False)
    if not args.skip_cpu:
        result.update(measure_cpu(args))
    if args.skip_gpu:
        pass
    elif torch.cuda.is_available():
        result.update(measure_gpu(args))
        result["gpu"] = "measured"
    else:
        print("(c) no CUDA device: GPU measurement skipped", flush=True)
        result["gpu"] = "skipped: no CUDA"
    result["load_average_after"] = load_average()
    result["wall_s"] = round(time.perf_counter() - started, 1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    # Keep an earlier run's numbers only for what this run skipped (e.g. the GPU part, measured elsewhere).
    previous = json.loads(args.output.read_text()) if args.output.exists() else {}
    kept = {k: v for k, v in previous.items() if args.skip_cpu and not k.startswith("gpu") and "load_average" not in k}
    if "gpu_name" not in result and "gpu_name" in previous:
        kept.update({k: v for k, v in previous.items() if k.startswith("gpu")})
        result.pop("gpu", None)
    args.output.write_text(json.dumps({**kept, **result}, indent=2) + "\n")
    print(f"load average {result['load_average_before']} -> {result['load_average_after']}; wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
