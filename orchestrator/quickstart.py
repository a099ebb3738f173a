"""`l2t quickstart`: the whole product on a laptop, in one command.

Synthetic data -> Ray Data preparation -> a VIT baseline (response-only loss)
and an L2T run, each trained by Ray Train with DeepSpeed on CPU workers ->
held-out evaluation (accuracy, visual contribution) -> MLflow -> a
comparison table. Both runs share one prepared data set. The table shows
L2T's paired difference against VIT with a 95% interval over the evaluation
questions (one seed each: `l2t sweep` with `sweep.seeds` adds the seed-to-seed
spread), and one line says what the interval allows one to conclude.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from orchestrator.config import CONFIG_DIR, ExperimentConfig, load_config, with_overrides
from orchestrator.experiment import ExperimentResult, prepare_inputs, run_experiment

QUICKSTART_CONFIG = CONFIG_DIR / "quickstart.yaml"
RUNS = (("vit", {"masking.mode": "response"}), ("l2t", {"masking.mode": "l2t"}))

COMPARED = (
    ("final loss", lambda r: r.train.history[-1].get("loss") if r.train.history else None, "{:.3f}"),
    ("loss_response", lambda r: r.train.history[-1].get("loss_response") if r.train.history else None, "{:.3f}"),
    ("loss_instruction", lambda r: r.train.history[-1].get("loss_instruction") if r.train.history else None, "{:.3f}"),
    ("accuracy", lambda r: r.eval_metrics.get("accuracy"), "{:.1%}"),
    ("accuracy_color", lambda r: r.eval_metrics.get("accuracy_color"), "{:.1%}"),
    ("VC / token", lambda r: r.eval_metrics.get("vc_mean"), "{:+.3f}"),
    ("VC / sample", lambda r: r.eval_metrics.get("vc_sum"), "{:+.3f}"),
    ("caption CIDEr", lambda r: r.eval_metrics.get("caption_cider"), "{:.3f}"),
    ("wall time", lambda r: r.wall_s, "{:.0f} s"),
)


INTERVAL_METRICS = (("accuracy", "{:+.1%}"), ("vc_mean", "{:+.3f}"), ("caption_cider", "{:+.3f}"))


def read_samples(path: str) -> list[dict]:
    """An experiment's evaluation samples (JSONL)."""
    import json

    from orchestrator import storage

    if not storage.exists(path):
        return []
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def paired_rows(results: list[ExperimentResult]) -> dict[str, list]:
    """Per metric: the first run's and each other run's paired difference against it (None for the first)."""
    from orchestrator.study_statistics import paired_difference

    if len(results) < 2:
        return {}
    base = {0: read_samples(results[0].eval_samples_file)}
    out: dict[str, list] = {}
    for metric, _ in INTERVAL_METRICS:
        row = [None]
        for result in results[1:]:
            try:
                row.append(paired_difference({0: read_samples(result.eval_samples_file)}, base, metric))
            except ValueError:
                row.append(None)
        out[metric] = row
    return out


def comparison_table(results: list[ExperimentResult], title: str = "VIT vs L2T", intervals=None) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    for result in results:
        m = result.config.masking
        table.add_column(f"{m.mode} (λI={m.lambda_instruction:g}, λA={m.lambda_response:g})")
    for label, getter, fmt in COMPARED:
        values = [getter(r) for r in results]
        table.add_row(label, *("-" if v is None else fmt.format(v) for v in values))
    for metric, fmt in INTERVAL_METRICS:
        diffs = (intervals or {}).get(metric)
        if diffs and any(diffs):
            cells = ["" if d is None else f"{fmt.format(d.difference)} [{fmt.format(d.low)}, {fmt.format(d.high)}]"
                     + (" *" if d.excludes_zero else "") for d in diffs]  # fmt: skip
            table.add_row(f"Δ {metric} vs {results[0].config.masking.mode} [95%]", *cells)
    return table


def run_quickstart(
    output: Path, overrides: list[str] | None = None, console: Console | None = None
) -> list[ExperimentResult]:
    from orchestrator.cluster import connect
    from orchestrator.tracking import start_parent_run, tracking_uri

    console = console or Console()
    started = time.perf_counter()
    cfg: ExperimentConfig = load_config(QUICKSTART_CONFIG, [f"storage.path={output.resolve()}", *(overrides or [])])
    console.rule("[bold]l2t quickstart")
    connect()
    inputs = prepare_inputs(cfg)
    parent = start_parent_run(cfg, f"quickstart-{time.strftime('%Y%m%d-%H%M%S')}", tags={"l2t.group": "quickstart"})
    results = []
    for label, updates in RUNS:
        console.rule(f"[bold]{label}")
        run_cfg = with_overrides(cfg, updates)
        results.append(
            run_experiment(
                run_cfg,
                run_name=f"quickstart-{label}-{time.strftime('%Y%m%d-%H%M%S')}",
                parent_run_id=parent,
                inputs=inputs,
            )
        )
    console.rule("[bold]results")
    intervals = paired_rows(results)
    console.print(comparison_table(results, intervals=intervals))
    accuracy = intervals.get("accuracy", [None, None])[1]
    if accuracy is not None:
        from orchestrator.study_statistics import conclusion

        console.print(conclusion("L2T", "VIT", accuracy), highlight=False)
    uri = tracking_uri(cfg)
    console.print(f"quickstart finished in {time.perf_counter() - started:.0f} s; results under {output.resolve()}")
    console.print(f"open MLflow:  mlflow ui --backend-store-uri {uri}")
    return results
