"""How much memory does the λ loss take, full logits against the chunked LM head, at Qwen2's vocabulary?

Run: ``python benchmarks/loss_memory.py [--tokens 4096] [--hidden 896] [--vocab 151936] [--chunk 1024]``

The loss of one micro-batch, forward and backward: hidden states [tokens, hidden]
(requiring grad, as the LM's last layer gives them) through an LM head of Qwen2's
151,936 tokens (Qwen2-0.5B's width, 896) to the per-token nll, then Σ w·nll / N
(`workloads.loss.l2t_loss_from_nll`, mode l2t). `full` is `token_nll` on the full
float32 logits (the loss before this change); `chunked` is `chunked_nll` with
`--chunk` positions per chunk (the default `train.loss_chunk_tokens`). Every
position is scored here, so the ratio is chunking's alone (the training forward also
skips image and pad targets, which saves more).

How memory is measured: torch's CPU tensors come from malloc/mmap, which
`tracemalloc` does not see, and a sampling thread can miss a peak between two
samples. Each variant runs in a fresh child process that resets the kernel's
resident-set high-water mark (writing 5 to /proc/self/clear_refs, Linux) once its
inputs exist, runs the loss forward and backward, and reads VmHWM: the peak
resident memory the kernel saw, exactly, minus the resident memory before. The
tensors of GB size are mmap-ed and handed back to the kernel when freed, so the
high-water mark is the live tensors' peak plus allocator slack; a fresh process per
variant keeps one variant's freed pages from serving the other. Gradients of the
two are compared in this process on `--grad-tokens` tokens (`max_grad_diff`,
float32).

Writes ``benchmarks/results/loss_memory.json`` with ``peak_ratio_chunked_vs_full``
(goal <= 0.35), the peaks in MB, ``max_grad_diff`` and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "loss_memory.json"
GOAL = 0.35


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _inputs(tokens: int, hidden: int, vocab: int, seed: int = 0):
    import torch

    from workloads.segment_codes import Segment

    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(1, tokens + 1, hidden, generator=generator).requires_grad_(True)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    torch.nn.init.normal_(head.weight, std=0.02, generator=generator)
    ids = torch.randint(0, vocab, (1, tokens + 1), generator=generator)
    segments = torch.full((1, tokens + 1), int(Segment.INSTRUCTION))
    segments[0, tokens // 2 :] = int(Segment.RESPONSE)
    return states, head, ids, segments


def loss_of(variant: str, states, head, ids, segments, chunk: int):
    """Σ w·nll / N of the micro-batch (mode l2t, λ 1) with the variant's nll."""
    from workloads.loss import chunked_nll, l2t_loss_from_nll, step_denominators, token_nll
    from workloads.segment_codes import token_weights

    weights = token_weights(segments, "l2t", 1.0, 1.0)
    if variant == "full":
        nll = token_nll(head(states), ids)
    else:
        flat = states[:, :-1].reshape(-1, states.size(-1))
        nll = chunked_nll(flat, head, ids[:, 1:].reshape(-1), chunk).view(1, -1)
    return l2t_loss_from_nll(nll, segments, weights, step_denominators(segments, weights)).loss


def child(args) -> dict:
    """One variant in this (fresh) process: peak resident growth of its loss forward + backward."""
    import torch

    torch.set_num_threads(args.threads)
    states, head, ids, segments = _inputs(args.tokens, args.hidden, args.vocab)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_kb("VmRSS")
    started = time.perf_counter()
    loss_of(args.child, states, head, ids, segments, args.chunk).backward()
    seconds = time.perf_counter() - started
    peak = _status_kb("VmHWM")
    return {"peak_mb": round((peak - before) / 1024, 1), "seconds": round(seconds, 2)}


def max_grad_diff(tokens: int, hidden: int, vocab: int, chunk: int) -> float:

    grads = []
    for variant in ("full", "chunked"):
        states, head, ids, segments = _inputs(tokens, hidden, vocab)
        loss_of(variant, states, head, ids, segments, chunk).backward()
        grads.append((states.grad, head.weight.grad))
    return max(float((a - b).abs().max()) for a, b in zip(*grads))


def run_child(variant: str, args) -> dict:
    command = [sys.executable, __file__, "--child", variant]
    for key in ("tokens", "hidden", "vocab", "chunk", "threads"):
        command += [f"--{key}", str(getattr(args, key))]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="positions of the micro-batch (all scored)")
    parser.add_argument("--hidden", type=int, default=896, help="LM width (Qwen2-0.5B: 896)")
    parser.add_argument("--vocab", type=int, default=151936, help="vocabulary (Qwen2: 151,936)")
    parser.add_argument("--chunk", type=int, default=1024, help="positions per chunk (train.loss_chunk_tokens)")
    parser.add_argument("--grad-tokens", type=int, default=512, help="tokens of the gradient comparison")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=("full", "chunked"), help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return {}

    result: dict = {"load_average_before": load_average(), "cpu_count": os.cpu_count()}
    peaks = {variant: run_child(variant, args) for variant in ("full", "chunked")}
    logits_mb = args.tokens * args.vocab * 4 / 2**20
    result.update(
        {
            "peak_ratio_chunked_vs_full": round(peaks["chunked"]["peak_mb"] / peaks["full"]["peak_mb"], 4),
            "goal_peak_ratio": GOAL,
            "peak_mb_full": peaks["full"]["peak_mb"],
            "peak_mb_chunked": peaks["chunked"]["peak_mb"],
            "one_float32_logits_tensor_mb": round(logits_mb, 1),
            "seconds_full": peaks["full"]["seconds"],
            "seconds_chunked": peaks["chunked"]["seconds"],
            "max_grad_diff": max_grad_diff(args.grad_tokens, args.hidden, args.vocab, min(args.chunk, 128)),
            "grad_tokens": args.grad_tokens,
            "tokens": args.tokens,
            "hidden": args.hidden,
            "vocab": args.vocab,
            "chunk_tokens": args.chunk,
            "threads": args.threads,
            "method": "fresh process per variant; kernel VmHWM after clear_refs=5, minus VmRSS before",
        }
    )
    result["load_average_after"] = load_average()
    print(
        f"loss forward+backward, {args.tokens} tokens x vocab {args.vocab}: peak {result['peak_mb_full']:.0f} MB "
        f"full vs {result['peak_mb_chunked']:.0f} MB chunked ({args.chunk}/chunk): ratio "
        f"{result['peak_ratio_chunked_vs_full']:.3f} (goal <= {GOAL}); max grad diff {result['max_grad_diff']:.2e}; "
        f"load {result['load_average_before']} -> {result['load_average_after']}",
        flush=True,
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
