"""A study's arms, their spread over seeds, paired intervals against a baseline, and the report files.

Trials of a sweep that differ only in `train.seed` form one arm (their MLflow
runs carry the same `l2t.point` tag). Per arm and metric: mean ± std over
seeds (from the runs' `eval/<metric>` values); against a baseline arm chosen
by `key=value` (`mode=response`, `masking.lambda_instruction=0`): the paired
difference with a 95% hierarchical bootstrap interval over seeds and
evaluation questions (`orchestrator.study_statistics`), from each run's
evaluation samples. `write_report` writes `report.md` and a self-contained
`report.html` (tables, plots embedded), plus an error-bar plot per metric.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.study_statistics import PairedDifference, conclusion, mean_std, paired_difference

SHORT_KEYS = {"mode": "masking.mode", "lambda_instruction": "masking.lambda_instruction"}
SHORT_KEYS |= {"lambda_response": "masking.lambda_response", "li": "masking.lambda_instruction"}
SHORT_KEYS |= {"la": "masking.lambda_response", "seed": "train.seed"}


@dataclass
class Arm:
    """Runs of one sweep point over its seeds."""

    name: str
    point: dict[str, Any]
    runs: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, tuple[float, float]] = field(default_factory=dict)
    """metric -> (mean, std) over seeds."""
    versus_baseline: dict[str, PairedDifference] = field(default_factory=dict)

    @property
    def seeds(self) -> list[int]:
        return sorted({int(r["seed"]) for r in self.runs})


def arm_key(row: dict[str, Any]) -> str:
    """The point a run belongs to: its `l2t.point` tag, else its masking mode and λ pair."""
    if row.get("point"):
        return row["point"]
    keys = ("mode", "masking.lambda_instruction", "masking.lambda_response")
    return json.dumps({k: row.get(k) for k in keys}, sort_keys=True)


def arm_name(point: dict[str, Any]) -> str:
    parts = []
    for key, value in point.items():
        short = {v: k for k, v in SHORT_KEYS.items() if k not in ("li", "la")}.get(key, key)
        parts.append(f"{short}={value:g}" if isinstance(value, float) else f"{short}={value}")
    return " ".join(parts) or "all"


def group_arms(rows: list[dict[str, Any]], metrics: list[str]) -> list[Arm]:
    arms: dict[str, Arm] = {}
    for row in rows:
        key = arm_key(row)
        if key not in arms:
            point = json.loads(key)
            arms[key] = Arm(arm_name(point), point)
        arms[key].runs.append(row)
    for arm in arms.values():
        for metric in metrics:
            arm.summary[metric] = mean_std([r.get(metric, math.nan) for r in arm.runs])
    return list(arms.values())


def parse_baseline(text: str) -> tuple[str, str]:
    """`key=value` with a short or dotted key."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--baseline {text!r}: expected key=value, e.g. mode=response")
    return SHORT_KEYS.get(key.strip(), key.strip()), value.strip()


def pick_baseline(arms: list[Arm], text: str) -> Arm:
    """The one arm whose runs match `key=value` (compared as text, numbers by value)."""
    key, value = parse_baseline(text)

    def matches(run: dict[str, Any]) -> bool:
        have = run.get("mode") if key == "masking.mode" else run.get(key)
        if have is None:
            return False
        try:
            return float(have) == float(value)
        except (TypeError, ValueError):
            return str(have) == value

    chosen = [a for a in arms if a.runs and all(matches(r) for r in a.runs)]
    if len(chosen) != 1:
        names = ", ".join(a.name for a in arms)
        raise LookupError(f"--baseline {text}: {len(chosen)} arms match (arms: {names}); give a key=value naming one")
    return chosen[0]


def compare_to_baseline(arms: list[Arm], baseline: Arm, metrics: list[str], samples, replicates: int = 1000) -> None:
    """Fill each arm's `versus_baseline` (per metric) from `samples(run) -> rows` (the run's eval samples)."""
    by_seed = {a.name: {int(r["seed"]): samples(r) for r in a.runs} for a in arms}
    for arm in arms:
        if arm is baseline:
            continue
        for metric in metrics:
            name = metric.removeprefix("eval/")
            if not name or metric.startswith("train/"):
                continue
            try:
                arm.versus_baseline[metric] = paired_difference(
                    by_seed[arm.name], by_seed[baseline.name], name, replicates=replicates
                )
            except ValueError:
                continue


def _png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def error_bars(arms: list[Arm], metric: str, path: Path, baseline: Arm | None = None) -> Path | None:
    """Mean ± std over seeds per arm (and the paired interval against the baseline as a second panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [a for a in arms if not math.isnan(a.summary.get(metric, (math.nan,))[0])]
    if not shown:
        return None
    panels = 2 if baseline is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels + 1, 0.5 * len(shown) + 2), squeeze=False)
    names = [a.name for a in shown]
    axes[0][0].errorbar([a.summary[metric][0] for a in shown], range(len(shown)), fmt="o", capsize=4,
                        xerr=[a.summary[metric][1] for a in shown])  # fmt: skip
    axes[0][0].set_yticks(range(len(shown)), names, fontsize=8)
    axes[0][0].set_title(f"{metric}: mean ± std over seeds", fontsize=9)
    if baseline is not None:
        diffs = [(i, a.versus_baseline[metric]) for i, a in enumerate(shown) if metric in a.versus_baseline]
        ax = axes[0][1]
        for i, d in diffs:
            ax.errorbar([d.difference], [i], xerr=[[d.difference - d.low], [d.high - d.difference]], fmt="o",
                        capsize=4, color="tab:red" if d.excludes_zero else "tab:gray")  # fmt: skip
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(shown)), names, fontsize=8)
        ax.set_title(f"Δ vs {baseline.name} (95% interval)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cells(arm: Arm, metric: str, baseline: Arm | None) -> tuple[str, str]:
    mean, std = arm.summary.get(metric, (math.nan, math.nan))
    spread = "-" if math.isnan(mean) else f"{mean:.4g} ± {std:.2g}"
    if baseline is None:
        return spread, ""
    if arm is baseline:
        return spread, "baseline"
    diff = arm.versus_baseline.get(metric)
    return spread, diff.text() if diff else "-"


def write_report(
    title: str, arms: list[Arm], metrics: list[str], baseline: Arm | None, output: Path, plots: list[Path]
) -> list[Path]:
    """report.md and a self-contained report.html: the arms table, conclusions, plots embedded."""
    header = ["arm", "seeds", *[f"{m} (mean ± std)" + (" / Δ [95%]" if baseline else "") for m in metrics]]
    rows = [
        [arm.name, str(len(arm.seeds)), *[" / ".join(c for c in _cells(arm, m, baseline) if c) for m in metrics]]
        for arm in arms
    ]
    notes = [f"{len(arms)} arms; seeds per arm: " + ", ".join(f"{a.name}: {len(a.seeds)}" for a in arms)]
    conclusions = []
    if baseline is not None:
        notes.append(
            f"Baseline: {baseline.name}. Δ is the paired difference (arm − baseline) with its 95% interval over "
            "seeds and evaluation questions (hierarchical bootstrap); * marks an interval that excludes 0."
        )
        conclusions = [conclusion(a.name, baseline.name, d) for a in arms for d in a.versus_baseline.values()]
    markdown = [f"# {title}", "", *notes, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    markdown += ["| " + " | ".join(row) + " |" for row in rows]
    if conclusions:
        markdown += ["", "## Conclusions", "", *[f"- {c}" for c in conclusions]]
    markdown += ["", "## Plots", "", *[f"![{p.stem}]({p.name})" for p in plots]]
    md_path, html_path = output / "report.md", output / "report.html"
    md_path.write_text("\n".join(markdown) + "\n")

    def cells(tag: str, values: list[str]) -> str:
        return "<tr>" + "".join(f"<{tag}>{html.escape(v)}</{tag}>" for v in values) + "</tr>"

    page = [f"<h1>{html.escape(title)}</h1>", *[f"<p>{html.escape(n)}</p>" for n in notes]]
    page += ["<table border='1' cellpadding='4'>", cells("th", header), *[cells("td", r) for r in rows], "</table>"]
    if conclusions:
        page += ["<h2>Conclusions</h2>", "<ul>", *[f"<li>{html.escape(c)}</li>" for c in conclusions], "</ul>"]
    page += ["<h2>Plots</h2>", *[f'<p><img alt="{html.escape(p.stem)}" src="{_png(p)}"></p>' for p in plots]]
    head = f"<head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
    html_path.write_text(f"<!doctype html><html>{head}<body>\n" + "\n".join(page) + "\n</body></html>\n")
    return [md_path, html_path]
