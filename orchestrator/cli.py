"""The `l2t` command line. Every command that takes a config accepts trailing `key=value` overrides."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from orchestrator import storage
from orchestrator.config import ConfigError, json_schema, load_config

app = typer.Typer(
    help="l2t: visual instruction tuning with the L2T loss on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Validate configs and print their schema.", no_args_is_help=True)
data_app = typer.Typer(help="Prepare, inspect and summarize data.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")
model_app = typer.Typer(help="Build model folders that `model.name_or_path` can point at.", no_args_is_help=True)
app.add_typer(model_app, name="model")
console = Console()
err = Console(stderr=True)

Overrides = Annotated[
    Optional[list[str]], typer.Argument(help="Dotted overrides, e.g. train.lr=1e-4", show_default=False)
]


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


def _load(path: Path, overrides: list[str] | None):
    try:
        return load_config(path, overrides or [])
    except ConfigError as error:
        _fail(str(error))


@model_app.command("compose")
def model_compose(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write (model, tokenizer with <image>, LlavaProcessor).")],
    language_model: Annotated[str, typer.Option(help="Causal LM: hub id or folder, e.g. Qwen/Qwen2-0.5B.")],
    vision_tower: Annotated[
        str, typer.Option(help="CLIP or SigLIP model: hub id or folder, e.g. google/siglip-so400m-patch14-384.")
    ],
    vision_feature_layer: Annotated[
        int, typer.Option(help="Hidden layer of the tower whose features go to the connector.")
    ] = -2,
    seed: Annotated[int, typer.Option(help="Seed of the fresh connector's weights.")] = 0,
) -> None:
    """TinyLLaVA-style composition: a pretrained LM and vision tower joined by a fresh connector,
    saved as a LlavaForConditionalGeneration folder (then pre-train the connector with
    model.freeze=connector_only and fine-tune with vision_tower)."""
    from workloads.model import compose_llava

    try:
        out = compose_llava(out_dir, language_model, vision_tower, vision_feature_layer=vision_feature_layer, seed=seed)
    except (OSError, ValueError) as error:
        _fail(str(error))
    console.print(f"[green]wrote[/green] {out}")


@config_app.command("validate")
def config_validate(file: Path, overrides: Overrides = None) -> None:
    """Check a config file (and overrides); prints the resolved config."""
    cfg = _load(file, overrides)
    console.print(f"[green]ok[/green] {file}")
    console.print_json(json.dumps(cfg.model_dump(mode="json")))


@config_app.command("schema")
def config_schema() -> None:
    """JSON Schema of experiment configs, for editors."""
    print(json.dumps(json_schema(), indent=2))


@app.command()
def quickstart(
    output: Annotated[Path, typer.Option(help="Folder for data, models, runs and the MLflow store.")] = Path(
        "l2t_quickstart"
    ),
    overrides: Overrides = None,
) -> None:
    """Synthetic data -> Ray Data -> VIT and L2T runs on Ray Train + DeepSpeed -> evaluation -> MLflow."""
    from orchestrator.prepare import PrepareError
    from orchestrator.quickstart import run_quickstart

    try:
        run_quickstart(output, overrides, console)
    except (ConfigError, PrepareError) as error:
        _fail(str(error), code=1)


@app.command()
def train(config: Path, overrides: Overrides = None) -> None:
    """Prepare (or reuse) the data, train with Ray Train, evaluate, log to MLflow."""
    from orchestrator.cluster import connect
    from orchestrator.pipeline import run_experiment
    from orchestrator.prepare import PrepareError
    from orchestrator.quickstart import comparison_table
    from orchestrator.tracking import TrackingError, tracking_uri

    cfg = _load(config, overrides)
    try:
        connect()
        result = run_experiment(cfg)
    except (TrackingError, PrepareError) as error:
        _fail(str(error))
    console.print(comparison_table([result], title=result.run_name))
    console.print(f"model: {result.train.model_dir}")
    console.print(f"MLflow run {result.mlflow_run_id} in {storage.redact(tracking_uri(cfg))}")


@app.command()
def sweep(config: Path, overrides: Overrides = None) -> None:
    """Ray Tune over λ_I, λ_A and other keys; one MLflow parent run, one child per trial. Re-run to resume."""
    from orchestrator.cluster import connect
    from orchestrator.compare import compare as build_comparison
    from orchestrator.compare import table
    from orchestrator.prepare import PrepareError
    from orchestrator.sweep import run_sweep
    from orchestrator.tracking import TrackingError, tracking_uri

    cfg = _load(config, overrides)
    try:
        connect()
        result = run_sweep(cfg)
    except (TrackingError, PrepareError, ConfigError) as error:
        _fail(str(error), code=1)
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    comparison = build_comparison(
        result.name,
        Path(result.path) if not result.path.startswith("s3://") else Path("l2t_compare") / result.name,
        metrics=[cfg.sweep.metric, *_default_metrics()],
        experiment=cfg.tracking.experiment,
    )
    console.print(table(comparison))
    console.print(
        f"sweep {result.name}: {len(result.trials)} trials; MLflow parent run {result.parent_run_id} in {storage.redact(tracking_uri(cfg))}"
    )


from orchestrator.evaluate import eval_command  # noqa: E402
from orchestrator.submit import command as submit_command  # noqa: E402

app.command("submit")(submit_command)
app.command("eval")(eval_command)


def _default_metrics() -> list[str]:
    from orchestrator.compare import DEFAULT_METRICS

    return list(DEFAULT_METRICS)


@app.command()
def compare(
    name: Annotated[str, typer.Argument(help="A sweep name (its MLflow parent run) or an MLflow experiment name.")],
    config: Annotated[
        Optional[Path], typer.Option("--config", help="Take the tracking URI and experiment from this config.")
    ] = None,
    tracking_uri: Annotated[
        Optional[str], typer.Option(help="MLflow tracking URI (else the config's, else MLFLOW_TRACKING_URI).")
    ] = None,
    metric: Annotated[Optional[list[str]], typer.Option(help="Metrics to compare (repeatable).")] = None,
    output: Annotated[Path, typer.Option(help="Folder for the table (CSV) and the plots (PNG).")] = Path("l2t_compare"),
) -> None:
    """Trials side by side: a table (best highlighted), λ_I x λ_A heatmaps and training curves."""
    import os

    import mlflow

    from orchestrator.compare import compare as build_comparison
    from orchestrator.compare import table

    experiment = None
    if config is not None:
        from orchestrator.tracking import tracking_uri as config_uri

        cfg = _load(config, [])
        tracking_uri = tracking_uri or config_uri(cfg)
        experiment = cfg.tracking.experiment
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        _fail("give --tracking-uri or --config (or set MLFLOW_TRACKING_URI)")
    mlflow.set_tracking_uri(tracking_uri)
    try:
        result = build_comparison(name, output / name, metrics=metric or None, experiment=experiment)
    except LookupError as error:
        _fail(str(error), code=1)
    console.print(table(result))
    for path in result.files:
        console.print(f"wrote {path}")


@data_app.command("prepare")
def data_prepare(
    config: Path,
    overrides: Overrides = None,
    force: bool = typer.Option(False, help="Prepare again even if the output exists."),
) -> None:
    """Validate, quarantine, count task templates, tokenize and segment into Parquet shards."""
    from orchestrator.cluster import connect
    from orchestrator.pipeline import materialize_synthetic, resolve_model
    from orchestrator.prepare import PrepareError, prepare

    cfg = _load(config, overrides)
    connect()
    cfg = materialize_synthetic(cfg)
    try:
        prepared = prepare(cfg, resolve_model(cfg), force=force)
    except PrepareError as error:
        _fail(str(error), code=1)
    _print_manifest(prepared.manifest)
    console.print(f"prepared data: {prepared.path}")


def _print_manifest(manifest: dict) -> None:
    table = Table(title=f"prepared data {manifest['key']}")
    table.add_column("what")
    table.add_column("value", justify="right")
    for key in (
        "rows_in",
        "rows_written",
        "rows_quarantined",
        "truncated_rows",
        "tokens_total",
        "length_mean",
        "length_max",
        "num_image_tokens",
        "task_templates",
        "task_templates_version",
        "chat_template",
    ):
        value = manifest.get(key)
        table.add_row(key, f"{value:.1f}" if isinstance(value, float) else str(value))
    for reason, count in manifest.get("quarantined_by_reason", {}).items():
        table.add_row(f"  quarantined: {reason}", str(count))
    total = max(1, manifest.get("tokens_total", 0))
    for segment, count in manifest.get("tokens_by_segment", {}).items():
        table.add_row(f"  tokens: {segment}", f"{count} ({count / total:.1%})")
    console.print(table)


@data_app.command("stats")
def data_stats(directory: str) -> None:
    """The manifest of a prepared data folder, as a table."""
    from orchestrator.prepare import PreparedData

    try:
        _print_manifest(PreparedData.load(directory).manifest)
    except FileNotFoundError as error:
        _fail(str(error))


@data_app.command("inspect")
def data_inspect(
    file: Path,
    config: Annotated[Path, typer.Option("--config", help="Experiment config (chat template, model, masking).")],
    mode: Annotated[Optional[str], typer.Option(help="Masking mode; the config's when unset.")] = None,
    limit: Annotated[int, typer.Option(help="Rows to show.")] = 3,
    fmt: Annotated[str, typer.Option("--format", help="text, html or json")] = "text",
    overrides: Overrides = None,
) -> None:
    """Show each token with its segment and weight (terminal colors, standalone HTML, or JSON)."""
    from transformers import AutoConfig, AutoTokenizer

    from orchestrator.pipeline import materialize_synthetic, resolve_model
    from workloads.conversations import ConversationError, parse_record
    from workloads.mask_inspect import inspect_rows, to_html, to_json, to_rich_text
    from workloads.model import num_image_tokens
    from workloads.segment_codes import MASKING_MODES
    from workloads.segments import EncodeSpec, encode_conversations

    cfg = _load(config, overrides)
    mode = mode or cfg.masking.mode
    if mode not in MASKING_MODES:
        _fail(f"--mode must be one of {MASKING_MODES}")
    if fmt not in ("text", "html", "json"):
        _fail("--format must be text, html or json")
    if cfg.model.name_or_path == "tiny":
        cfg = materialize_synthetic(cfg)  # the tiny preset's tokenizer is trained on the training data
    model_dir = resolve_model(cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    conversations = []
    text = file.read_text(encoding="utf-8")
    records = (
        json.loads(text) if file.suffix == ".json" else [json.loads(line) for line in text.splitlines() if line.strip()]
    )
    for number, record in enumerate(records, start=1):
        try:
            conversations.append(parse_record(record, cfg.data.format, default_id=f"{file.name}:{number}"))
        except ConversationError as error:
            if number <= limit:
                err.print(f"[yellow]skipped[/yellow] {error} ({error.reason})")
    templates = _task_templates_for(cfg, conversations)
    conversations = conversations[:limit]
    spec = EncodeSpec(
        template=cfg.data.chat_template,
        num_image_tokens=num_image_tokens(AutoConfig.from_pretrained(model_dir)),
        max_length=cfg.data.max_length,
        task_templates=templates,
        system_prompt=cfg.data.system_prompt,
    )
    encoded = []
    for conversation, row in zip(conversations, encode_conversations(conversations, tokenizer, spec)):
        if isinstance(row, ConversationError):
            err.print(f"[yellow]skipped[/yellow] {row} ({row.reason})")
        else:
            encoded.append((conversation.id, row))
    rows = inspect_rows(encoded, tokenizer, mode, cfg.masking.lambda_instruction, cfg.masking.lambda_response)
    if fmt == "json":
        print(to_json(rows))
    elif fmt == "html":
        print(to_html(rows))
    else:
        console.print(to_rich_text(rows))


def _task_templates_for(cfg, conversations) -> tuple[str, ...]:
    """The configured task-template list, else one selected from the inspected rows themselves."""
    from workloads.task_templates import TaskTemplateList, count_sentences, select_task_templates

    selection = cfg.masking.task_templates
    if selection.file:
        return TaskTemplateList.load(selection.file).sentences()
    counts, turns = count_sentences(conversations)
    return select_task_templates(counts, turns, top_k=selection.top_k, min_share=selection.min_share).sentences()


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
