"""Does packing train the same loss as padding, and how much faster is it, on a LLaVA-665K-like length mix?

Run: ``python benchmarks/packing.py [--rows 128] [--micro-batch 16] [--repeats 3] [--threads 1]``

Rows: a stylized LLaVA-665K length mix made here (no download): 85% short rows of
60-150 tokens, uniform (the bulk of LLaVA-1.5's mix: single-round VQA, OCR and
region answers, "Answer the question using a single word or phrase."), and 15%
long rows of 400-2000 tokens, log-uniform (LLaVA-Instruct conversations and
detailed descriptions, ShareGPT text rows up to the 2048 context). The shape is the
one this benchmark was specified with, not a histogram of the real file; text only:
with LLaVA-1.5's 576 image tokens per image row every image row is longer and the
spread narrower, so packing gains less there than here.

Both layouts take the same micro-batches: the data plan (`workloads.batching.
BatchPlan`, rows grouped by length within windows of 8 steps) is the baseline's
length grouping and is unchanged by packing; only the layout inside a micro-batch
differs (`workloads.micro_batch.collate`, padded, or packed with a 4D block-causal
mask). Each micro-batch runs the training forward (chunked LM head) and backward of
the λ loss (mode l2t, λ_I 0.5) of a small Llama-shaped LLaVA on CPU. Padded and
packed alternate per micro-batch (which goes first alternates too), over
`--repeats` passes; the ratio is of the median pass times (tokens are the same).

Writes ``benchmarks/results/packing.json`` with ``max_abs_loss_diff`` (packed vs
padded loss of every micro-batch, float32; goal <= 1e-4),
``tokens_per_s_ratio_packed_vs_padded`` (goal > 1), the positions each layout
computes, and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "packing.json"
SHORT, LONG, LONG_SHARE = (60, 150), (400, 2000), 0.15


def llava_665k_like_lengths(rows: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    short = rng.integers(SHORT[0], SHORT[1] + 1, size=rows)
    long = np.exp(rng.uniform(np.log(LONG[0]), np.log(LONG[1]), size=rows)).astype(int)
    return np.where(rng.random(rows) < LONG_SHARE, long, short)


def make_rows(lengths: np.ndarray, vocab: int, seed: int = 0) -> list[dict]:
    """Rows with a system prompt, role markers, an instruction and a response (segments as prepared)."""
    from workloads.segment_codes import Segment

    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        segments = np.full(n, int(Segment.INSTRUCTION), dtype=np.int8)
        segments[:4], segments[4:6] = int(Segment.SYSTEM), int(Segment.ROLE)
        answer = int(rng.integers(n // 4, n // 2 + 1))
        segments[n - answer - 2 : n - answer] = int(Segment.ROLE)
        segments[n - answer : n - 1] = int(Segment.RESPONSE)
        segments[n - 1] = int(Segment.END_OF_TURN)
        out.append({"input_ids": rng.integers(3, vocab, size=n).astype(np.int32), "segments": segments})
    return out


def small_model(vocab: int):
    import torch
    from transformers import LlamaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    from workloads.model import llava_config, prepare_for_training

    text = LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        pad_token_id=0,
    )
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    torch.manual_seed(0)
    config = llava_config(text, vision, image_token_id=vocab - 1)
    config.text_config._attn_implementation = config._attn_implementation = "sdpa"
    model = LlavaForConditionalGeneration(config)
    prepare_for_training(model)
    return model


def step(model, batch: dict, backward: bool = True) -> float:
    """λ loss (mode l2t, λ_I 0.5) of one collated micro-batch, forward and backward; returns the loss."""
    from workloads.forward import training_nll
    from workloads.loss import l2t_loss_from_nll, step_denominators
    from workloads.segment_codes import token_weights

    weights = token_weights(batch["segments"], "l2t", 0.5, 1.0)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if batch.get(k) is not None}
    nll = training_nll(model, scored_index=batch["scored_index"], kernel="chunked", chunk_tokens=1024, **inputs)
    loss = l2t_loss_from_nll(nll, batch["segments"], weights, step_denominators(batch["segments"], weights)).loss
    if backward:
        model.zero_grad(set_to_none=True)
        loss.backward()
    return float(loss.detach())


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def measure(args) -> dict:
    import torch

    from workloads.batching import BatchPlan
    from workloads.micro_batch import collate

    torch.set_num_threads(args.threads)
    lengths = llava_665k_like_lengths(args.rows, args.seed)
    rows = make_rows(lengths, args.vocab, args.seed)
    plan = BatchPlan(lengths, args.micro_batch, 1, 1, seed=args.seed)
    micro = plan.micro_batches(0).reshape(-1, args.micro_batch)
    device = torch.device("cpu")
    layouts = {"padded": {}, "packed": {"packing": True}}
    batches = {
        name: [collate({k: [rows[i][k] for i in ids] for k in rows[0]}, 0, device, **kw) for ids in micro]
        for name, kw in layouts.items()
    }
    model = small_model(args.vocab)
    losses = {name: [step(model, b, backward=False) for b in batches[name]] for name in layouts}
    times: dict[str, list[float]] = {name: [] for name in layouts}
    for repeat in range(args.repeats):
        total = dict.fromkeys(layouts, 0.0)
        for k in range(len(micro)):
            for name in ("padded", "packed") if (repeat + k) % 2 == 0 else ("packed", "padded"):
                started = time.perf_counter()
                step(model, batches[name][k])
                total[name] += time.perf_counter() - started
        for name in layouts:
            times[name].append(total[name])
        print(f"pass {repeat + 1}: padded {total['padded']:.2f} s, packed {total['packed']:.2f} s", flush=True)
    tokens = int(lengths[micro].sum())
    positions = {name: int(sum(b["input_ids"].numel() for b in batches[name])) for name in layouts}
    median = {name: statistics.median(times[name]) for name in layouts}
    ungrouped = np.arange(len(micro) * args.micro_batch).reshape(-1, args.micro_batch)
    return {
        "max_abs_loss_diff": max(abs(a - b) for a, b in zip(losses["packed"], losses["padded"])),
        "goal_max_abs_loss_diff": 1e-4,
        "tokens_per_s_ratio_packed_vs_padded": round(median["padded"] / median["packed"], 3),
        "tokens_per_s_packed": round(tokens / median["packed"], 1),
        "tokens_per_s_padded": round(tokens / median["padded"], 1),
        "pass_seconds": {name: [round(t, 3) for t in times[name]] for name in layouts},
        "tokens": tokens,
        "positions_padded": positions["padded"],
        "positions_packed": positions["packed"],
        "padding_share_padded": round(1 - tokens / positions["padded"], 4),
        "padding_share_packed": round(1 - tokens / positions["packed"], 4),
        "padding_share_padded_without_length_grouping": round(
            1 - tokens / float(lengths[ungrouped].max(axis=1).sum() * args.micro_batch), 4
        ),
        "sequences_padded": int(sum(b["input_ids"].shape[0] for b in batches["padded"])),
        "sequences_packed": int(sum(b["input_ids"].shape[0] for b in batches["packed"])),
        "micro_batches": len(micro),
        "rows": args.rows,
        "micro_batch_size": args.micro_batch,
        "row_lengths": {"short": list(SHORT), "long": list(LONG), "long_share": LONG_SHARE},
        "model": "LLaVA with a Llama LM 2 x 128 (SDPA), vocab %d, float32, CPU" % args.vocab,
        "threads": args.threads,
        "repeats": args.repeats,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    result = {"load_average_before": load_average(), "cpu_count": os.cpu_count()}
    result.update(measure(args))
    result["load_average_after"] = load_average()
    print(
        f"packed vs padded (length-grouped) on {result['tokens']} tokens: max |loss diff| "
        f"{result['max_abs_loss_diff']:.2e} (goal <= 1e-4); tokens/s ratio "
        f"{result['tokens_per_s_ratio_packed_vs_padded']:.2f}; positions {result['positions_packed']} vs "
        f"{result['positions_padded']}; load {result['load_average_before']} -> {result['load_average_after']}",
        flush=True,
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
