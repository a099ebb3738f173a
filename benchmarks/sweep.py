"""How many λ-grid trials per hour does `l2t sweep` run on this machine, and what does ASHA save?

Run: ``python benchmarks/sweep.py [--steps N] [--eval-rows N] [--grid-size K] [--workdir DIR]``

The quickstart λ grid (``configs/lambda_grid.yaml``: 3x3 λ_I x λ_A, the tiny
LLaVA preset, synthetic data, 2 Ray Train workers with DeepSpeed ZeRO-2 on
CPU) runs twice through ``orchestrator.sweep.run_sweep``, on one local Ray
cluster (``orchestrator.cluster.connect``, as ``l2t sweep`` does):

(1) the full grid (``sweep.asha.enabled=false``): ``trials_per_hour`` =
    completed trials / wall hours of ``run_sweep`` (Tune, every trial's Ray
    Train fit, evaluation and export, the sweep's image loading, MLflow
    logging), and the best point by ``sweep.metric`` (eval/accuracy);
(2) the same grid with ASHA (``sweep.asha.enabled=true``; grace period and
    reduction factor from ``--asha-grace-period`` / ``--asha-reduction-factor``,
    rungs in optimizer steps; ASHA compares ``sweep.asha.metric`` at each rung:
    by default ``eval/accuracy`` on ``--asha-eval-rows`` held-out questions
    answered at the rung, ``workloads/training_eval.py``):
    ``asha_steps_saved_share`` = 1 - (training steps the ASHA trials ran) /
    (trials x ``train.max_steps``), ``asha_same_best``: does ASHA pick the
    full grid's best λ point?, and ``asha_best_vs_grid_best``: the grid's own
    evaluation of ASHA's best point minus the grid's best, with a 95% paired
    bootstrap interval over the questions (``within_grid_interval`` when it
    includes 0).

Synthetic data, the tiny model, the prepared shards and the MLflow store are
made once, before either sweep is timed (``prepare_inputs``), and shared: both
sweeps use one ``storage.path`` (a fresh ``--workdir``, a temp folder by
default), with different experiment ``name`` s, so the ASHA sweep (whose
folder is also keyed by a hash of its ``sweep`` section) never resumes the
grid one. Steps a trial ran: the last ``step`` in its run's ``metrics.jsonl``
(the Ray Train reports; a trial ASHA stopped may have run up to
``log_every - 1`` steps more before it was torn down, which is not counted).
The λ_I x λ_A heatmap of eval/accuracy for the full grid (``orchestrator.compare``)
is copied beside the JSON (``benchmarks/results/sweep_heatmap.png``).

Writes ``benchmarks/results/sweep.json`` with ``trials_per_hour``,
``asha_steps_saved_share``, ``asha_same_best``, the wall times, every trial's
point, steps, status and metric, the ASHA settings, the concurrency, and the
load average: the machine is shared, and timings move with its load.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")

RESULTS = ROOT / "benchmarks" / "results" / "sweep.json"
LAMBDA_I = "masking.lambda_instruction"
LAMBDA_A = "masking.lambda_response"


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def base_config(args, storage: Path):
    """The grid config with the benchmark's overrides (storage, steps, eval rows, a smaller grid)."""
    from orchestrator.config import load_config

    overrides = [f"storage.path={storage}"]
    if args.steps is not None:
        overrides.append(f"train.max_steps={args.steps}")
    if args.eval_rows is not None:
        overrides.append(f"eval.max_rows={args.eval_rows}")
    if args.log_every is not None:
        overrides.append(f"train.log_every={args.log_every}")
    if args.max_concurrent is not None:
        overrides.append(f"sweep.max_concurrent_trials={args.max_concurrent}")
    cfg = load_config(args.config, overrides)
    if args.grid_size:
        from orchestrator.config import with_overrides

        k = args.grid_size
        cfg = with_overrides(
            cfg,
            {
                "sweep.lambda_instruction": cfg.sweep.lambda_instruction[:k],
                "sweep.lambda_response": cfg.sweep.lambda_response[:k],
            },
        )
    return cfg


def asha_settings(args, cfg) -> dict:
    """Grace period (optimizer steps), reduction factor and rung metric; the rungs they give (max_t = steps + 1)."""
    from orchestrator.early_stopping import rung_steps

    max_t = cfg.train.max_steps + 1
    grace = args.asha_grace_period or max(1, cfg.train.max_steps // 6)  # 300 steps: first rung at step 50
    factor = args.asha_reduction_factor
    mode = "min" if args.asha_metric.startswith("loss") else "max"
    return {
        "sweep.asha.enabled": True,
        "sweep.asha.grace_period": grace,
        "sweep.asha.reduction_factor": factor,
        "sweep.asha.metric": args.asha_metric,
        "sweep.asha.mode": mode,
        "sweep.asha.eval_rows": args.asha_eval_rows,
        "_max_t_steps": max_t,
        "_rungs_steps": rung_steps(grace, factor, max_t),
    }


def eval_samples(cfg, run_name: str) -> list[dict]:
    from orchestrator import layout, storage

    text = storage.read_text(layout.run_file(cfg.storage.path, run_name, layout.RUN_EVAL_SAMPLES))
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def asha_best_within_grid_interval(cfg, grid: dict, asha_point: dict | None) -> dict:
    """The full grid's own evaluation of ASHA's best point minus the grid's best, with a 95% paired bootstrap
    interval over the evaluation questions: ASHA found the grid's best within its interval when it includes 0."""
    from orchestrator.study_statistics import paired_difference

    by_point = {json.dumps(r["point"], sort_keys=True): r for r in grid["trials"]}
    found = by_point.get(json.dumps(asha_point, sort_keys=True)) if asha_point else None
    top = by_point[json.dumps(grid["best_point"], sort_keys=True)]
    if found is None:
        return {"within_grid_interval": False, "reason": "ASHA completed no trial"}
    metric = cfg.sweep.metric.split("/", 1)[1]
    result = paired_difference(
        {0: eval_samples(cfg, found["run_name"])}, {0: eval_samples(cfg, top["run_name"])}, metric
    )
    return {
        "metric": cfg.sweep.metric,
        "difference": round(result.difference, 4),
        "interval_95": [round(result.low, 4), round(result.high, 4)],
        "questions": result.questions,
        "within_grid_interval": not result.excludes_zero,
    }


def last_step(run_path: str) -> int:
    from orchestrator import layout, storage
    from orchestrator.train import read_history

    history = read_history(storage.join(run_path, layout.RUN_METRICS))
    return int(history[-1].get("step", 0)) if history else 0


def tune_iterations(sweep_path: str, trial_id: str) -> int | None:
    """Tune reports (training_iteration) of one trial, from its result.json."""
    for result in glob.glob(str(Path(sweep_path) / f"*{trial_id}*" / "result.json")):
        rows = [json.loads(line) for line in Path(result).read_text().splitlines() if line.strip()]
        if rows:
            return int(rows[-1].get("training_iteration", 0))
    return None


def trial_rows(cfg, result) -> list[dict]:
    """Point, status, steps run and metric of every trial of a SweepResult."""
    from orchestrator import layout

    metric = cfg.sweep.metric
    out = []
    for trial in result.trials:
        run_path = layout.run_dir(cfg.storage.path, trial["run_name"])
        value = trial["eval"].get(metric.split("/", 1)[1] if metric.startswith("eval/") else metric)
        out.append(
            {
                "trial_id": trial["trial_id"],
                "run_name": trial["run_name"],
                "point": trial["point"],
                "status": trial["status"],
                "steps": last_step(run_path),
                "tune_reports": tune_iterations(result.path, trial["trial_id"]),
                "metric": value,
                "eval": trial["eval"],
            }
        )
    return sorted(out, key=lambda r: (r["point"].get(LAMBDA_I, 0), r["point"].get(LAMBDA_A, 0)))


def best(rows: list[dict], mode: str) -> tuple[dict | None, list[dict]]:
    """The best scored trial (ties broken by grid order) and every trial tied with it."""
    scored = [r for r in rows if isinstance(r["metric"], (int, float))]
    if not scored:
        return None, []
    top = (max if mode == "max" else min)(r["metric"] for r in scored)
    tied = [r for r in scored if r["metric"] == top]
    return tied[0], tied


def short(point: dict) -> str:
    return f"λ_I={point.get(LAMBDA_I)} λ_A={point.get(LAMBDA_A)}"


def run_one(label: str, cfg) -> dict:
    from orchestrator.sweep import run_sweep

    before = load_average()
    started = time.perf_counter()
    result = run_sweep(cfg)
    wall = time.perf_counter() - started
    rows = trial_rows(cfg, result)
    top, tied = best(rows, cfg.sweep.metric_mode)
    completed = sum(r["status"] == "completed" for r in rows)
    print(
        f"[bench] {label}: {len(rows)} trials ({completed} completed) in {wall:.0f} s; best {cfg.sweep.metric} "
        f"{top['metric'] if top else None} at {short(top['point']) if top else '-'}"
        + (f" (tied with {len(tied) - 1} more)" if len(tied) > 1 else ""),
        flush=True,
    )
    for r in rows:
        print(
            f"   {short(r['point'])}: {r['status']}, {r['steps']} steps, {cfg.sweep.metric} {r['metric']}", flush=True
        )
    return {
        "name": result.name,
        "path": result.path,
        "parent_run_id": result.parent_run_id,
        "wall_s": round(wall, 1),
        "completed": completed,
        "trials": rows,
        "best_point": top["point"] if top else None,
        "best_metric": top["metric"] if top else None,
        "best_tied_points": [r["point"] for r in tied],
        "load_average": [before, load_average()],
    }


def heatmap(cfg, sweep: dict, out_dir: Path, target: Path) -> dict:
    """`l2t compare` on the full grid: the table's best runs and the λ_I x λ_A heatmap of the sweep metric."""
    import mlflow

    from orchestrator.compare import compare
    from orchestrator.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri(cfg))
    started = time.perf_counter()
    comparison = compare(
        sweep["name"], out_dir, metrics=[cfg.sweep.metric, "train/loss_response"], experiment=cfg.tracking.experiment
    )
    png = out_dir / f"heatmap_{cfg.sweep.metric.replace('/', '_')}.png"
    copied = None
    if png.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, target)
        copied = str(target.relative_to(ROOT)) if target.resolve().is_relative_to(ROOT) else str(target)
    return {
        "best_runs": comparison.best,
        "runs": len(comparison.runs),
        "heatmap": copied,
        "compare_s": round(time.perf_counter() - started, 1),
    }


def write(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "lambda_grid.yaml")
    parser.add_argument("--steps", type=int, default=None, help="train.max_steps (default: the config's, 300)")
    parser.add_argument("--eval-rows", type=int, default=None, help="eval.max_rows (default: the config's, 200)")
    parser.add_argument(
        "--log-every",
        type=int,
        default=None,
        help="train.log_every, i.e. steps per Tune report (default: the config's, 10)",
    )
    parser.add_argument(
        "--grid-size", type=int, default=None, help="only the first K values of each λ axis (K x K trials)"
    )
    parser.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        help="sweep.max_concurrent_trials (default: derived from the cluster)",
    )
    parser.add_argument(
        "--asha-grace-period",
        type=int,
        default=None,
        help="optimizer steps before ASHA may stop a trial (default: 1/6 of the steps)",
    )
    parser.add_argument("--asha-reduction-factor", type=float, default=3.0)
    parser.add_argument(
        "--asha-metric", default="eval/accuracy", help="sweep.asha.metric: what rungs rank by (training or eval/...)"
    )
    parser.add_argument("--asha-eval-rows", type=int, default=64, help="sweep.asha.eval_rows: questions per rung")
    parser.add_argument("--skip-asha", action="store_true")
    parser.add_argument("--skip-compare", action="store_true")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="storage.path of both sweeps (default: a fresh temp folder)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp workdir")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from orchestrator.cluster import connect
    from orchestrator.config import with_overrides
    from orchestrator.experiment import prepare_inputs
    from orchestrator.sweep import sweep_points, trial_layout
    from orchestrator.tracking import tracking_uri

    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="l2t-bench-sweep-"))).resolve()
    storage = workdir / "store"
    cfg = base_config(args, storage)
    result: dict = {
        "load_average_before": load_average(),
        "cpu_count": os.cpu_count(),
        "config": str(args.config.resolve().relative_to(ROOT))
        if args.config.resolve().is_relative_to(ROOT)
        else str(args.config),
    }
    started = time.perf_counter()

    # One local Ray cluster for both sweeps ("local": never join another Ray instance on this machine).
    connect(os.environ.get("RAY_ADDRESS") or "local")

    # Warm-up, not timed as part of either sweep: synthetic data, tiny model, prepared shards, MLflow store.
    t = time.perf_counter()
    prepare_inputs(cfg)
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    mlflow.set_experiment(cfg.tracking.experiment)
    result["prepare_s"] = round(time.perf_counter() - t, 1)
    points = sweep_points(cfg)
    concurrent, worker_cpus = trial_layout(cfg, len(points))
    result.update(
        {
            "trials": len(points),
            "steps_per_trial": cfg.train.max_steps,
            "log_every": cfg.train.log_every,
            "eval_rows": cfg.eval.max_rows,
            "train_rows": cfg.data.synthetic.train_rows if cfg.data.synthetic else None,
            "num_workers": cfg.train.num_workers,
            "concurrent_trials": concurrent,
            "cpus_per_worker": worker_cpus,
            "metric": cfg.sweep.metric,
            "metric_mode": cfg.sweep.metric_mode,
            "lambda_instruction": cfg.sweep.lambda_instruction,
            "lambda_response": cfg.sweep.lambda_response,
        }
    )
    print(
        f"[bench] {len(points)} trials x {cfg.train.max_steps} steps, {concurrent} at a time, "
        f"{cfg.train.num_workers} workers x {worker_cpus:g} CPU; "
        f"prepared in {result['prepare_s']} s; storage {storage}",
        flush=True,
    )

    # (1) the full grid.
    grid_cfg = with_overrides(cfg, {"name": f"{cfg.name}-bench-grid"})
    grid = run_one("full grid", grid_cfg)
    result.update(
        {
            "trials_per_hour": round(grid["completed"] / (grid["wall_s"] / 3600), 2),
            "grid_wall_s": grid["wall_s"],
            "grid_best_point": grid["best_point"],
            "grid_best_metric": grid["best_metric"],
            "grid_best_tied_points": grid["best_tied_points"],
            "grid_trials": grid["trials"],
            "grid_sweep_name": grid["name"],
            "grid_load_average": grid["load_average"],
        }
    )
    print(
        f"[bench] trials/hour: {result['trials_per_hour']:.1f} ({grid['completed']} trials in {grid['wall_s']:.0f} s)",
        flush=True,
    )
    write(args.output, {**result, "partial": "full grid only; the ASHA sweep had not finished"})
    if not args.skip_compare:
        try:
            result["compare"] = heatmap(
                grid_cfg,
                grid,
                workdir / "compare" / grid["name"],
                args.output.with_name(f"{args.output.stem}_heatmap.png"),
            )
            print(
                f"[bench] compare: best runs {result['compare']['best_runs']}; "
                f"heatmap -> {result['compare']['heatmap']}",
                flush=True,
            )
        except Exception as error:  # the comparison is optional; the sweep numbers stand without it
            result["compare"] = {"error": repr(error)}
            print(f"[bench] compare failed: {error!r}", flush=True)

    # (2) the same grid under ASHA.
    if not args.skip_asha:
        settings = asha_settings(args, cfg)
        asha_cfg = with_overrides(
            cfg, {"name": f"{cfg.name}-bench-asha", **{k: v for k, v in settings.items() if not k.startswith("_")}}
        )
        asha = run_one("ASHA", asha_cfg)
        steps_run = sum(r["steps"] for r in asha["trials"])
        full = len(points) * cfg.train.max_steps
        result.update(
            {
                "asha_steps_saved_share": round(1 - steps_run / full, 4),
                "asha_same_best": asha["best_point"] == grid["best_point"],
                "asha_best_in_grid_ties": asha["best_point"] in grid["best_tied_points"]
                if asha["best_point"]
                else False,
                "asha_best_vs_grid_best": asha_best_within_grid_interval(grid_cfg, grid, asha["best_point"]),
                "asha_wall_s": asha["wall_s"],
                "asha_over_grid_wall": round(asha["wall_s"] / grid["wall_s"], 3),
                "asha_steps_run": steps_run,
                "grid_steps_run": sum(r["steps"] for r in grid["trials"]),
                "asha_settings": {
                    "metric": asha_cfg.sweep.asha.metric,
                    "mode": asha_cfg.sweep.asha.mode,
                    "eval_rows": asha_cfg.sweep.asha.eval_rows,
                    "grace_period_steps": asha_cfg.sweep.asha.grace_period,
                    "reduction_factor": asha_cfg.sweep.asha.reduction_factor,
                    "max_t_steps": settings["_max_t_steps"],
                    "rungs_steps": settings["_rungs_steps"],
                    "steps_per_report": cfg.train.log_every,
                },
                "asha_best_point": asha["best_point"],
                "asha_best_metric": asha["best_metric"],
                "asha_best_tied_points": asha["best_tied_points"],
                "asha_completed": asha["completed"],
                "asha_trials": asha["trials"],
                "asha_sweep_name": asha["name"],
                "asha_load_average": asha["load_average"],
            }
        )
        print(
            f"[bench] ASHA ran {steps_run} of {full} steps: saved {result['asha_steps_saved_share']:.1%}, "
            f"wall {asha['wall_s']:.0f} s vs {grid['wall_s']:.0f} s ({result['asha_over_grid_wall']:.2f}x); "
            f"same best point: {result['asha_same_best']} "
            f"(grid {short(grid['best_point'] or {})} = {grid['best_metric']}, "
            f"ASHA {short(asha['best_point'] or {})} = {asha['best_metric']}); "
            f"ASHA's best vs the grid's best on the grid's own evaluation: {result['asha_best_vs_grid_best']}",
            flush=True,
        )

    result["load_average_after"] = load_average()
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["workdir"] = str(workdir)
    write(args.output, result)
    print(
        f"load average {result['load_average_before']} -> {result['load_average_after']}; wrote {args.output}",
        flush=True,
    )
    if args.workdir is None and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
