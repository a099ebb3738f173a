"""The science check: the paper's ablation ladder (VIT .. L2T) and a second λ_I, several seeds, equal compute.

Run: ``python benchmarks/science.py [--seeds 3] [--steps 300] [--batch 32] [--lr 2e-3] [--arms ...]``

For every seed and arm (``response`` = the VIT baseline, ``l2t_full``, ``l2t_no_system``, ``l2t`` = the
paper's method, at λ_I = λ_A = 1, ``l2t@0.5`` = the paper's method at λ_I = 0.5, and ``l2t_visual`` = the
paper's method with each instruction token weighted by its visual relevance), the tiny LLaVA
(CLIP-style tower, Llama-style LM, tokenizer trained on the corpus; initial weights drawn from the seed) is
trained on the same synthetic set (the scenes world by default: multi-object scenes, a long tail of
image-specific questions, long descriptive and reasoning answers; see workloads/synthetic_scenes.py) for
the same number of optimizer steps, batch size, learning rate and schedule, and evaluated on the same
held-out synthetic suite (disjoint scenes). Equal compute: the arms differ only in which tokens carry loss
and with which weight, so every run does the same forward and backward passes.

``l2t_visual``'s reference model is the ``response`` arm's trained model of the same seed (the VIT baseline,
the issue's own example): after that arm trains, every training row's instruction tokens are scored with it
(``workloads.visual_relevance.RelevanceScorer``, the code preparation's Ray Data actors run, V=∅ = noise as
evaluation's), and the arm trains on the rows with their relevance (``--visual-transform``, ``--visual-temperature``,
``--visual-floor``); the scoring's seconds and rows/s and the relevance distribution per segment are recorded.

Training runs in this process with the project's own per-worker loop (``workloads.train_loop.run_training``:
DeepSpeed ZeRO-0 on CPU, one rank) fed by micro-batches built the way the Ray Data stage builds them;
evaluation is ``workloads.evaluator.Evaluator``, the code the Ray Data actors run. No Ray: on a 2-core
machine a cluster would only add start-up time.

Reported per arm, as mean ± sample std over seeds: visual contribution per token (``vc_mean``, V=∅ = noise)
and per sample, caption CIDEr-D and BLEU-4, VQA accuracy and by kind, POPE, CHAIR, the final training
losses; and against ``response`` the paired difference with a 95% interval over seeds and evaluation
questions (hierarchical bootstrap, ``orchestrator.study_statistics``) for accuracy, VC, CIDEr, CHAIR and POPE
F1. Writes ``benchmarks/results/science.json`` with every run, the summary and the intervals.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODES = ("response", "l2t_full", "l2t_no_system", "l2t", "l2t_visual")
ARMS = ("response", "l2t_full", "l2t_no_system", "l2t", "l2t@0.5", "l2t_visual")
"""`mode` or `mode@λ_I`: the ladder at λ_I = λ_A = 1, and the paper's method at a second λ_I."""
INTERVAL_METRICS = ("accuracy", "vc_mean", "caption_cider", "chair_i", "pope_f1")


def parse_arm(arm: str) -> tuple[str, float]:
    mode, _, lam = arm.partition("@")
    if mode not in MODES:
        raise SystemExit(f"--arms: unknown mode {mode!r} in {arm!r}; expected one of {MODES}")
    return mode, float(lam) if lam else 1.0


REPORTED = (
    "vc_mean",
    "vc_sum",
    "vc_positive_share",
    "caption_cider",
    "caption_bleu4",
    "accuracy",
    "exact_match",
    "accuracy_color",
    "accuracy_shape",
    "accuracy_count",
    "accuracy_exists",
    "pope_f1",
    "pope_yes_ratio",
    "chair_i",
    "chair_s",
    "chair_i_shape",
    "chair_s_shape",
    "vc_mean_caption",
    "vc_mean_color",
    "vc_mean_shape",
    "vc_mean_exists",
    "vc_mean_count",
)
TRAINING = ("loss_response", "loss_instruction", "train_s")


def build_inputs(args, work: Path):
    """Synthetic data (once), task templates, the encoded training rows with their pixel values."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer

    from orchestrator.inputs import tokenizer_corpus
    from workloads.config import TinyModelConfig
    from workloads.conversations import parse_record
    from workloads.model import num_image_tokens
    from workloads.segments import EncodeSpec, encode_conversations
    from workloads.synthetic import write_synthetic_dataset
    from workloads.task_templates import count_sentences, select_task_templates
    from workloads.tiny_model import build_tiny_model

    data = write_synthetic_dataset(
        work / "data",
        train_rows=args.train_rows,
        eval_rows=0,
        seed=args.data_seed,
        max_objects=args.max_objects,
        image_size=32,
        kinds=tuple(args.kinds) if args.kinds else None,
        world=args.world,
    )
    records = [json.loads(line) for line in data.train_file.read_text().splitlines()]
    conversations = [parse_record(r) for r in records]
    counts, turns = count_sentences(conversations)
    templates = select_task_templates(
        counts, turns, top_k=args.template_top_k, min_share=args.template_min_share
    ).sentences()

    corpus = list(tokenizer_corpus([str(data.train_file)], "vicuna_v1"))
    model_dirs = {}
    for seed in range(args.seeds):
        model_dirs[seed] = build_tiny_model(work / f"init-{seed}", corpus, TinyModelConfig(), seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dirs[0])
    processor = AutoImageProcessor.from_pretrained(model_dirs[0])
    from transformers import AutoConfig

    spec = EncodeSpec(
        "vicuna_v1", num_image_tokens(AutoConfig.from_pretrained(model_dirs[0])), 192, task_templates=templates
    )
    encoded = encode_conversations(conversations, tokenizer, spec)
    rows = []
    for conversation, row in zip(conversations, encoded):
        if isinstance(row, Exception):
            continue
        image = Image.open(data.image_root / conversation.images[0]).convert("RGB")
        pixels = processor(images=[image], return_tensors="np")["pixel_values"].astype(np.float32)
        rows.append(
            {
                "input_ids": row.input_ids,
                "segments": row.segments,
                "pixel_values": pixels,
                "image": conversation.images[0],
            }
        )
    return data, templates, model_dirs, spec, rows


def trained_token_shares(rows: list[dict], modes) -> dict[str, dict[str, float]]:
    """Per mode: trained tokens per row and the share of them that are response tokens.

    The loss is Σ w·nll / N with N every trained token of the step (docs/design.md), so at λ_I = λ_A = 1
    the response tokens' share of the gradient shrinks as instruction tokens join the loss."""
    from workloads.segment_codes import RESPONSE_SEGMENTS, token_weights

    segments = np.concatenate([np.asarray(r["segments"])[1:] for r in rows]).astype(
        np.int64
    )  # targets: after the shift
    is_response = np.isin(segments, [int(s) for s in RESPONSE_SEGMENTS])
    out = {}
    for mode in modes:
        trained = token_weights(segments, mode) > 0
        out[mode] = {
            "trained_tokens_per_row": round(float(trained.sum()) / len(rows), 2),
            "response_share": round(float((trained & is_response).sum() / trained.sum()), 4),
        }
    return out


def visual_rows(rows: list[dict], reference: Path, image_root: Path, args) -> tuple[list[dict], dict]:
    """The rows with each token's visual relevance under `reference` (`l2t_visual`'s), and the scoring's cost
    and per-segment distribution."""
    from PIL import Image

    from workloads.visual_relevance import RelevanceHistogram, RelevanceScorer, RowToScore

    started = time.perf_counter()
    scorer = RelevanceScorer.from_pretrained(str(reference), null_image="noise", seed=0)
    scored, histogram = [], RelevanceHistogram()
    for start in range(0, len(rows), args.batch):
        chunk = rows[start : start + args.batch]
        batch = [
            RowToScore(
                str(start + i), r["input_ids"], r["segments"], [Image.open(image_root / r["image"]).convert("RGB")]
            )
            for i, r in enumerate(chunk)
        ]
        for row, relevance in zip(chunk, scorer(batch)):
            histogram.add(row["segments"], relevance)
            scored.append({**row, "relevance": relevance.astype(np.float32)})
    seconds = time.perf_counter() - started
    cost = {"relevance_s": seconds, "relevance_rows_per_s": len(rows) / seconds, "relevance": histogram.summary()}
    return scored, cost


def train_one(model_dir: Path, rows: list[dict], arm: str, seed: int, args, out: Path, reference=None) -> dict:
    """One run of workloads' training loop; the exported model lands in `out`."""
    from orchestrator.config import config_from_dict
    from workloads.train_loop import MODEL_SUBDIR, run_training

    steps_per_epoch = len(rows) // args.batch

    def epoch_batches(epoch: int, skip: int):
        order = np.random.default_rng([seed, epoch]).permutation(len(rows))
        for start in range(skip * args.batch, steps_per_epoch * args.batch, args.batch):
            chunk = [rows[i] for i in order[start : start + args.batch]]
            yield {key: [r[key] for r in chunk] for key in chunk[0]}

    history: list[dict] = []

    def report(metrics, checkpoint_dir):
        history.append(dict(metrics))
        if checkpoint_dir and (Path(checkpoint_dir) / MODEL_SUBDIR).exists():
            shutil.copytree(Path(checkpoint_dir) / MODEL_SUBDIR, out, dirs_exist_ok=True)

    cfg = config_from_dict(
        {
            "data": {  # the rows are handed over in memory, l2t_visual's with their relevance under `reference`
                "sources": ["rows-in-memory.jsonl"],
                "relevance": {"reference_model": str(reference)} if reference else None,
            },
            "model": {"name_or_path": str(model_dir), "freeze": "none"},
            "masking": {
                "mode": parse_arm(arm)[0],
                "lambda_instruction": parse_arm(arm)[1],
                "lambda_response": 1.0,
                "visual": {
                    "transform": args.visual_transform,
                    "temperature": args.visual_temperature,
                    "floor": args.visual_floor,
                },
            },
            "train": {
                "max_steps": args.steps,
                "lr": args.lr,
                "lr_schedule": "cosine",
                "warmup_ratio": 0.05,
                "micro_batch_size": args.batch,
                "gradient_accumulation": 1,
                "num_workers": 1,
                "seed": seed,
                "log_every": max(1, args.steps // 10),
                "torch_threads": args.threads or None,
            },
        }
    )
    started = time.perf_counter()
    run_training(cfg, epoch_batches, report, rows=len(rows), deepspeed_config={"zero_optimization": {"stage": 0}})
    train_s = time.perf_counter() - started
    last = history[-1]
    tail = [h for h in history if "loss_response" in h][-3:]
    return {
        "train_s": train_s,
        "loss_response": float(np.mean([h["loss_response"] for h in tail])),
        "loss_instruction": float(np.mean([h["loss_instruction"] for h in tail])),
        "steps": int(last["step"]),
        "curve": [{k: h[k] for k in ("step", "loss", "loss_response", "loss_instruction") if k in h} for h in history],
    }


def evaluate_one(model_dir: Path, spec, questions, image_root, args) -> tuple[dict, float]:
    from workloads.eval_questions import synthetic_chair_vocabularies
    from workloads.eval_summary import summarize
    from workloads.evaluator import Evaluator

    started = time.perf_counter()
    evaluator = Evaluator.from_pretrained(
        str(model_dir), spec, image_root=image_root, null_image="noise", max_new_tokens=48, seed=0
    )
    samples = []
    for start in range(0, len(questions), 50):
        samples.extend(evaluator(questions[start : start + 50]))
    metrics = summarize(samples, chair_vocabularies=synthetic_chair_vocabularies())
    return metrics, [dataclasses.asdict(s) for s in samples], time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--train-rows", type=int, default=4000)
    parser.add_argument("--eval-rows", type=int, default=300)
    parser.add_argument("--world", default="scenes", choices=("scenes", "shapes"))
    parser.add_argument("--max-objects", type=int, default=3)
    parser.add_argument("--kinds", nargs="+", default=None, help="kinds to generate (default: the world's mix)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), help="mode or mode@λ_I (baseline: response)")
    parser.add_argument("--replicates", type=int, default=1000, help="bootstrap replicates of each interval")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--template-top-k", type=int, default=10)
    parser.add_argument(
        "--template-min-share",
        type=float,
        default=0.03,
        help="task templates: sentences in at least this share of user turns (at 0.02 this set also selects "
        "content-bearing questions such as 'What color is the square?')",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a busy 2-core machine 2 threads ran the tiny model up to 30x slower; "
        "0: torch's default)",
    )
    parser.add_argument("--visual-transform", default="clip", choices=("clip", "sigmoid", "rank"))
    parser.add_argument("--visual-temperature", type=float, default=1.0, help="l2t_visual's τ (nats)")
    parser.add_argument("--visual-floor", type=float, default=0.0, help="l2t_visual's least instruction weight factor")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "science.json")
    args = parser.parse_args()
    for arm in args.arms:
        parse_arm(arm)
    if any(parse_arm(a)[0] == "l2t_visual" for a in args.arms) and "response" not in args.arms:
        raise SystemExit("--arms: l2t_visual scores relevance with the response arm's model; add response")

    import torch

    from workloads.eval_questions import synthetic_questions

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="l2t-science-"))
    work.mkdir(parents=True, exist_ok=True)
    data, templates, model_dirs, spec, rows = build_inputs(args, work)
    questions, image_root = synthetic_questions(
        work / "suite",
        rows=args.eval_rows,
        seed=args.data_seed,
        max_objects=args.max_objects,
        kinds=[k for k in args.kinds if k != "multi_turn"] if args.kinds else None,
        world=args.world,
    )
    print(
        f"{len(rows)} training rows, {len(questions)} held-out questions, task templates {list(templates)}", flush=True
    )

    runs, samples = [], {}
    for seed in range(args.seeds):
        for arm in sorted(args.arms, key=lambda a: a != "response"):  # response first: l2t_visual's reference
            out = work / "runs" / f"{arm}-seed{seed}"
            reference = work / "runs" / f"response-seed{seed}" if parse_arm(arm)[0] == "l2t_visual" else None
            arm_rows, cost = visual_rows(rows, reference, data.image_root, args) if reference else (rows, {})
            trained = train_one(model_dirs[seed], arm_rows, arm, seed, args, out, reference)
            metrics, rows_out, eval_s = evaluate_one(out, spec, questions, image_root, args)
            samples[(arm, seed)] = rows_out
            run = {
                "arm": arm,
                "mode": parse_arm(arm)[0],
                "lambda_instruction": parse_arm(arm)[1],
                "seed": seed,
                **{k: v for k, v in trained.items() if k != "curve"},
                **cost,
                "eval_s": eval_s,
                "metrics": metrics,
                "curve": trained["curve"],
            }
            runs.append(run)
            print(
                f"seed {seed} {arm:16s} VC/token {metrics.get('vc_mean', float('nan')):+.3f}  "
                f"CIDEr {metrics.get('caption_cider', float('nan')):.3f}  "
                f"acc {metrics.get('accuracy', float('nan')):.3f}  CHAIR_i {metrics.get('chair_i', float('nan')):.3f}  "
                f"loss_r {trained['loss_response']:.3f}  ({trained['train_s']:.0f} s train, {eval_s:.0f} s eval)",
                flush=True,
            )

    summary = {arm: arm_summary([r for r in runs if r["arm"] == arm]) for arm in args.arms}
    paired = paired_intervals(samples, args) if "response" in args.arms else {}
    result = {
        "setup": {
            "seeds": args.seeds,
            "steps": args.steps,
            "batch": args.batch,
            "lr": args.lr,
            "schedule": "cosine, 5% warm-up",
            "arms": args.arms,
            "baseline": "response",
            "lambda_response": 1.0,
            "world": args.world,
            "intervals": "paired 95%, hierarchical bootstrap over seeds then questions "
            f"(orchestrator.study_statistics, {args.replicates} replicates)",
            "train_rows": len(rows),
            "eval_questions": len(questions),
            "max_objects": args.max_objects,
            "kinds": args.kinds,
            "task_templates": list(templates),
            "template_selection": {"top_k": args.template_top_k, "min_share": args.template_min_share},
            "null_image": "noise",
            "trainer": "workloads.train_loop.run_training (DeepSpeed ZeRO-0, CPU, 1 rank), in-process",
            "model": "tiny LLaVA (CLIP 2x64, Llama 2x128), weights drawn per seed",
            "freeze": "none",
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "trained_tokens": trained_token_shares(rows, sorted({parse_arm(a)[0] for a in args.arms} - {"l2t_visual"})),
            "visual": {
                "reference_model": "the response arm's trained model of the same seed",
                "transform": args.visual_transform,
                "temperature": args.visual_temperature,
                "floor": args.visual_floor,
            },
        },
        "summary": summary,
        "paired_vs_response": paired,
        "runs": runs,
        "wall_s": round(time.perf_counter() - started, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{'metric':18s}" + "".join(f"{m:>22s}" for m in args.arms))
    for key in ("vc_mean", "caption_cider", "accuracy", "pope_f1", "chair_i", "loss_response", "train_s"):
        cells = [summary[m].get(key) for m in args.arms]
        print(f"{key:18s}" + "".join(f"{c['mean']:>13.3f} ± {c['std']:<6.3f}" if c else f"{'-':>22s}" for c in cells))
    for arm, entry in paired.items():
        print(f"{arm} - response: " + "; ".join(f"{k} {v['text']}" for k, v in entry.items()))
    print(f"wrote {args.out} ({result['wall_s']:.0f} s)")


def arm_summary(mine: list[dict]) -> dict:
    """Mean ± sample std over seeds of every reported metric and training figure."""
    from orchestrator.study_statistics import mean_std

    entry = {}
    for key in REPORTED:
        values = [r["metrics"][key] for r in mine if key in r["metrics"]]
        if values:
            mean, std = mean_std(values)
            entry[key] = {"mean": round(mean, 4), "std": round(std, 4)}
    for key in TRAINING:
        mean, std = mean_std([r[key] for r in mine])
        entry[key] = {"mean": round(mean, 4), "std": round(std, 4)}
    return entry


def paired_intervals(samples: dict, args) -> dict:
    """Each arm minus `response`: the paired difference with its 95% interval over seeds and questions."""
    from orchestrator.study_statistics import paired_difference

    base = {seed: samples[("response", seed)] for seed in range(args.seeds)}
    out = {}
    for arm in (a for a in args.arms if a != "response"):
        mine = {seed: samples[(arm, seed)] for seed in range(args.seeds)}
        out[arm] = {}
        for metric in INTERVAL_METRICS:
            try:
                d = paired_difference(mine, base, metric, replicates=args.replicates)
            except ValueError:
                continue
            out[arm][metric] = {
                "difference": round(d.difference, 4),
                "low": round(d.low, 4),
                "high": round(d.high, 4),
                "excludes_zero": d.excludes_zero,
                "text": d.text(),
            }
    return out


if __name__ == "__main__":
    main()
