"""`l2t compare`: a sweep's (or an experiment's) runs side by side, from MLflow.

A table of trials by metric with the best value highlighted, a λ_I x λ_A
heatmap per metric (cells average the runs that share a λ pair), and the
training curves, written as PNG and CSV and logged to the sweep's parent run.
Trials that differ only in their seed form an arm (`orchestrator.study_report`):
each arm's mean ± std over seeds, and with `--baseline key=value` the paired
difference of every arm against the baseline arm with a 95% interval over
seeds and evaluation questions; `report.md` and `report.html` hold it all.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from orchestrator.study_report import Arm, compare_to_baseline, error_bars, group_arms, pick_baseline, write_report

DEFAULT_METRICS = ("eval/accuracy", "eval/vc_mean", "eval/caption_cider", "train/loss_response")
LAMBDA_I = "masking.lambda_instruction"
LAMBDA_A = "masking.lambda_response"


@dataclass
class Comparison:
    title: str
    runs: list[dict[str, Any]]
    metrics: list[str]
    best: dict[str, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    parent_run_id: str | None = None
    arms: list[Arm] = field(default_factory=list)
    baseline: Arm | None = None


def lower_is_better(metric: str) -> bool:
    name = metric.split("/")[-1]
    return "loss" in name or name.startswith("chair")


def find_runs(name: str, experiment: str | None = None) -> tuple[str, str | None, list]:
    """Child runs of the sweep `name` (its parent run; a unique prefix of the sweep's name will do, e.g.
    `lambda-grid` for `lambda-grid-sweep-<hash>`), or every trial run of the experiment `name`."""
    import mlflow

    client = mlflow.tracking.MlflowClient()
    experiments = client.search_experiments()
    ids = [e.experiment_id for e in experiments if experiment is None or e.name == experiment]
    parents = (
        mlflow.search_runs(
            experiment_ids=ids,
            filter_string=f"tags.`l2t.sweep` = '{name}' and tags.`l2t.kind` = 'parent'",
            output_format="list",
        )
        or mlflow.search_runs(experiment_ids=ids, filter_string=f"tags.mlflow.runName = '{name}'", output_format="list")
        if ids
        else []
    )
    by_name = [e for e in experiments if e.name == name]
    if not parents and not by_name:
        parents = _sweeps_by_prefix(name, ids)
    if parents:
        parent = parents[0]
        children = mlflow.search_runs(
            experiment_ids=[parent.info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
            output_format="list",
        )
        return f"sweep {parent.data.tags.get('l2t.sweep', name)}", parent.info.run_id, children
    if not by_name:
        raise LookupError(f"no sweep (parent run) and no MLflow experiment named {name!r}{_candidates(ids)}")
    runs = mlflow.search_runs(
        experiment_ids=[by_name[0].experiment_id], filter_string="tags.`l2t.kind` = 'trial'", output_format="list"
    )
    return f"experiment {name}", None, runs


def _sweep_parents(ids: list[str]) -> list:
    import mlflow

    if not ids:
        return []
    return mlflow.search_runs(
        experiment_ids=ids, filter_string="tags.`l2t.kind` = 'parent'", output_format="list", max_results=1000
    )


def _sweeps_by_prefix(name: str, ids: list[str]) -> list:
    """The parent run of the one sweep whose name starts with `name` (newest first); LookupError naming the
    candidates when several sweeps do."""
    matches = [r for r in _sweep_parents(ids) if r.data.tags.get("l2t.sweep", "").startswith(name)]
    names = sorted({r.data.tags["l2t.sweep"] for r in matches})
    if len(names) > 1:
        raise LookupError(f"{name!r} matches several sweeps: {', '.join(names)}; give more of the name")
    return sorted(matches, key=lambda r: r.info.start_time or 0, reverse=True)


def _candidates(ids: list[str]) -> str:
    names = sorted({r.data.tags.get("l2t.sweep") for r in _sweep_parents(ids)} - {None})
    if not names:
        return " (no sweeps in this store yet)"
    return "; sweeps here: " + ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")


def _row(run) -> dict[str, Any]:
    params = run.data.params
    row = {
        "run": run.info.run_name,
        "run_id": run.info.run_id,
        "mode": params.get("masking.mode", ""),
        LAMBDA_I: float(params.get(LAMBDA_I, "nan")),
        LAMBDA_A: float(params.get(LAMBDA_A, "nan")),
        "status": run.data.tags.get("l2t.trial_status", run.info.status.lower()),
        "seed": int(float(params.get("train.seed", 0))),
        "point": run.data.tags.get("l2t.point", ""),
    }
    row.update(run.data.metrics)
    return row


def compare(
    name: str,
    output: Path,
    *,
    metrics: list[str] | None = None,
    experiment: str | None = None,
    baseline: str | None = None,
    replicates: int = 1000,
) -> Comparison:
    """Build the table, the arms, the plots and the report for `name`; files go to `output` and to the
    parent run when there is one. `baseline`: `key=value` picking the arm the others are compared with."""
    import mlflow

    title, parent_id, runs = find_runs(name, experiment)
    if not runs:
        raise LookupError(f"{title} has no runs yet")
    rows = sorted((_row(r) for r in runs), key=lambda r: (r["mode"], r[LAMBDA_I], r[LAMBDA_A], r["seed"], r["run"]))
    metrics = [m for m in (metrics or DEFAULT_METRICS) if any(m in r for r in rows)]
    result = Comparison(title=title, runs=rows, metrics=metrics, parent_run_id=parent_id)
    for metric in metrics:
        scored = [r for r in rows if isinstance(r.get(metric), float) and not math.isnan(r[metric])]
        if scored:
            pick = min if lower_is_better(metric) else max
            result.best[metric] = pick(scored, key=lambda r: r[metric])["run"]
    result.arms = group_arms(rows, metrics)
    if baseline:
        result.baseline = pick_baseline(result.arms, baseline)
        compare_to_baseline(result.arms, result.baseline, metrics, _eval_samples, replicates=replicates)

    output.mkdir(parents=True, exist_ok=True)
    result.files.append(str(_write_csv(rows, metrics, output / "comparison.csv")))
    plots = []
    for metric in metrics:
        path = _heatmap(rows, metric, output / f"heatmap_{metric.replace('/', '_')}.png", result)
        plots.append(path)
        if metric.startswith("eval/"):
            plots.append(
                error_bars(result.arms, metric, output / f"arms_{metric.replace('/', '_')}.png", result.baseline)
            )
    plots.append(_curves(runs, output / "training_curves.png"))
    plots = [p for p in plots if p]
    result.files += [str(p) for p in plots]
    result.files += [str(p) for p in write_report(title, result.arms, metrics, result.baseline, output, plots)]
    if parent_id:
        client = mlflow.tracking.MlflowClient()
        for path in result.files:
            client.log_artifact(parent_id, path, artifact_path="compare")
    return result


def _eval_samples(row: dict[str, Any]) -> list[dict]:
    """A run's evaluation samples, from its `eval` artifact (the JSONL `l2t train` and sweeps log)."""
    import json
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(run_id=row["run_id"], artifact_path="eval", dst_path=tmp))
        except Exception:  # noqa: BLE001 - a run without samples (stopped early) has nothing to pair
            return []
        files = sorted(local.rglob("*.jsonl")) if local.is_dir() else [local]
        return [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]


def table(result: Comparison) -> Table:
    out = Table(title=f"{result.title}: {len(result.runs)} runs (best in bold green)")
    for column in ("run", "mode", "λ_I", "λ_A", "status", *result.metrics):
        out.add_column(column, justify="right" if column not in ("run", "mode", "status") else "left")
    for row in result.runs:
        cells = [row["run"], row["mode"], f"{row[LAMBDA_I]:g}", f"{row[LAMBDA_A]:g}", row["status"]]
        for metric in result.metrics:
            value = row.get(metric)
            text = "-" if value is None else f"{value:.4g}"
            if result.best.get(metric) == row["run"]:
                text = f"[bold green]{text}[/bold green]"
            cells.append(text)
        out.add_row(*cells)
    return out


def arms_table(result: Comparison) -> Table | None:
    """Arms over seeds (mean ± std) and, with a baseline, Δ [95% interval] (* where it excludes 0)."""
    if not result.arms or (result.baseline is None and all(len(a.runs) == 1 for a in result.arms)):
        return None
    title = f"{len(result.arms)} arms" + (f", Δ vs {result.baseline.name} [95%]" if result.baseline else "")
    out = Table(title=title)
    out.add_column("arm")
    out.add_column("seeds", justify="right")
    for metric in result.metrics:
        out.add_column(metric, justify="right")
    for arm in result.arms:
        cells = []
        for metric in result.metrics:
            mean, std = arm.summary.get(metric, (math.nan, math.nan))
            text = "-" if math.isnan(mean) else f"{mean:.4g} ± {std:.2g}"
            diff = arm.versus_baseline.get(metric)
            if diff is not None:
                text += f"\nΔ {diff.text()}"
            elif arm is result.baseline:
                text += "\n(baseline)"
            cells.append(text)
        out.add_row(arm.name, str(len(arm.seeds)), *cells)
    return out


def _write_csv(rows: list[dict], metrics: list[str], path: Path) -> Path:
    columns = ["run", "run_id", "mode", LAMBDA_I, LAMBDA_A, "status", *metrics]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _heatmap(rows: list[dict], metric: str, path: Path, result: Comparison | None = None) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells: dict[tuple[float, float], list[float]] = defaultdict(list)
    for row in rows:
        value = row.get(metric)
        if isinstance(value, float) and not math.isnan(value):
            cells[(row[LAMBDA_I], row[LAMBDA_A])].append(value)
    if not cells:
        return None
    lis = sorted({k[0] for k in cells})
    las = sorted({k[1] for k in cells})
    grid = np.full((len(lis), len(las)), np.nan)
    for (li, la), values in cells.items():
        grid[lis.index(li), las.index(la)] = float(np.mean(values))
    fig, ax = plt.subplots(figsize=(1.4 * len(las) + 2.5, 1.1 * len(lis) + 2))
    cmap = "viridis_r" if lower_is_better(metric) else "viridis"
    image = ax.imshow(grid, cmap=cmap, aspect="auto", origin="lower")
    ax.set_xticks(range(len(las)), [f"{v:g}" for v in las])
    ax.set_yticks(range(len(lis)), [f"{v:g}" for v in lis])
    ax.set_xlabel("λ_A (response)")
    ax.set_ylabel("λ_I (instruction)")
    ax.set_title(metric)
    notes = _interval_notes(result, metric)
    for i in range(len(lis)):
        for j in range(len(las)):
            if not np.isnan(grid[i, j]):
                text = f"{grid[i, j]:.3g}" + notes.get((lis[i], las[j]), "")
                ax.text(j, i, text, ha="center", va="center", color="white", fontsize=8)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _interval_notes(result: Comparison | None, metric: str) -> dict[tuple[float, float], str]:
    """Per λ cell: ± std over seeds, and the interval against the baseline (one arm per cell only)."""
    if result is None:
        return {}
    by_cell: dict[tuple[float, float], list[Arm]] = defaultdict(list)
    for arm in result.arms:
        by_cell[(arm.runs[0][LAMBDA_I], arm.runs[0][LAMBDA_A])].append(arm)
    notes = {}
    for cell, arms in by_cell.items():
        if len(arms) != 1:
            continue
        arm = arms[0]
        mean, std = arm.summary.get(metric, (math.nan, math.nan))
        note = f"\n± {std:.2g}" if len(arm.seeds) > 1 and not math.isnan(std) else ""
        diff = arm.versus_baseline.get(metric)
        if diff is not None:
            note += f"\nΔ [{diff.low:+.2g}, {diff.high:+.2g}]" + ("*" if diff.excludes_zero else "")
        notes[cell] = note
    return notes


def _curves(runs: list, path: Path, metric: str = "train/loss_response") -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    client = mlflow.tracking.MlflowClient()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plotted = 0
    for run in runs:
        history = client.get_metric_history(run.info.run_id, metric)
        if not history:
            continue
        points = sorted((m.step, m.value) for m in history)
        ax.plot([p[0] for p in points], [p[1] for p in points], label=run.info.run_name, linewidth=1.2)
        plotted += 1
    if not plotted:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
