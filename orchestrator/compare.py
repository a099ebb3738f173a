"""`l2t compare`: a sweep's (or an experiment's) runs side by side, from MLflow.

A table of trials by metric with the best value highlighted, a λ_I x λ_A
heatmap per metric (cells average the runs that share a λ pair), and the
training curves, written as PNG and CSV and logged to the sweep's parent run.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

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


def lower_is_better(metric: str) -> bool:
    name = metric.split("/")[-1]
    return "loss" in name or name.startswith("chair")


def find_runs(name: str, experiment: str | None = None) -> tuple[str, str | None, list]:
    """Child runs of the sweep `name` (its parent run), or every trial run of the experiment `name`."""
    import mlflow

    client = mlflow.tracking.MlflowClient()
    experiments = client.search_experiments()
    ids = [e.experiment_id for e in experiments if experiment is None or e.name == experiment]
    parents = mlflow.search_runs(
        experiment_ids=ids,
        filter_string=f"tags.`l2t.sweep` = '{name}' and tags.`l2t.kind` = 'parent'",
        output_format="list",
    ) or mlflow.search_runs(experiment_ids=ids, filter_string=f"tags.mlflow.runName = '{name}'", output_format="list")
    if parents:
        parent = parents[0]
        children = mlflow.search_runs(
            experiment_ids=[parent.info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
            output_format="list",
        )
        return f"sweep {name}", parent.info.run_id, children
    by_name = [e for e in experiments if e.name == name]
    if not by_name:
        raise LookupError(f"no sweep (parent run) and no MLflow experiment named {name!r}")
    runs = mlflow.search_runs(
        experiment_ids=[by_name[0].experiment_id], filter_string="tags.`l2t.kind` = 'trial'", output_format="list"
    )
    return f"experiment {name}", None, runs


def _row(run) -> dict[str, Any]:
    params = run.data.params
    row = {
        "run": run.info.run_name,
        "run_id": run.info.run_id,
        "mode": params.get("masking.mode", ""),
        LAMBDA_I: float(params.get(LAMBDA_I, "nan")),
        LAMBDA_A: float(params.get(LAMBDA_A, "nan")),
        "status": run.data.tags.get("l2t.trial_status", run.info.status.lower()),
    }
    row.update(run.data.metrics)
    return row


def compare(name: str, output: Path, *, metrics: list[str] | None = None, experiment: str | None = None) -> Comparison:
    """Build the table and plots for `name`; files go to `output` and to the parent run when there is one."""
    import mlflow

    title, parent_id, runs = find_runs(name, experiment)
    if not runs:
        raise LookupError(f"{title} has no runs yet")
    rows = sorted((_row(r) for r in runs), key=lambda r: (r["mode"], r[LAMBDA_I], r[LAMBDA_A], r["run"]))
    metrics = [m for m in (metrics or DEFAULT_METRICS) if any(m in r for r in rows)]
    result = Comparison(title=title, runs=rows, metrics=metrics, parent_run_id=parent_id)
    for metric in metrics:
        scored = [r for r in rows if isinstance(r.get(metric), float) and not math.isnan(r[metric])]
        if scored:
            pick = min if lower_is_better(metric) else max
            result.best[metric] = pick(scored, key=lambda r: r[metric])["run"]

    output.mkdir(parents=True, exist_ok=True)
    result.files.append(str(_write_csv(rows, metrics, output / "comparison.csv")))
    for metric in metrics:
        path = _heatmap(rows, metric, output / f"heatmap_{metric.replace('/', '_')}.png")
        if path:
            result.files.append(str(path))
    curves = _curves(runs, output / "training_curves.png")
    if curves:
        result.files.append(str(curves))
    if parent_id:
        client = mlflow.tracking.MlflowClient()
        for path in result.files:
            client.log_artifact(parent_id, path, artifact_path="compare")
    return result


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


def _write_csv(rows: list[dict], metrics: list[str], path: Path) -> Path:
    columns = ["run", "run_id", "mode", LAMBDA_I, LAMBDA_A, "status", *metrics]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _heatmap(rows: list[dict], metric: str, path: Path) -> Path | None:
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
    for i in range(len(lis)):
        for j in range(len(las)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.3g}", ha="center", va="center", color="white", fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
