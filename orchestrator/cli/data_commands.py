"""`l2t data prepare`, `l2t data stats` and `l2t data inspect`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from orchestrator.cli.common import Overrides, console, err, fail, load

app = typer.Typer(help="Prepare, inspect and summarize data.", no_args_is_help=True)


@app.command("prepare")
def data_prepare(
    config: Path,
    overrides: Overrides = None,
    force: bool = typer.Option(False, help="Prepare again even if the output exists."),
) -> None:
    """Validate, quarantine, count task templates, tokenize and segment into Parquet shards."""
    from orchestrator.cluster import connect
    from orchestrator.inputs import materialize_synthetic, resolve_model
    from orchestrator.prepare import PrepareError, prepare

    cfg = load(config, overrides)
    connect()
    cfg = materialize_synthetic(cfg)
    try:
        prepared = prepare(cfg, resolve_model(cfg), force=force)
    except PrepareError as error:
        fail(str(error), code=1)
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


@app.command("stats")
def data_stats(directory: str) -> None:
    """The manifest of a prepared data folder, as a table."""
    from orchestrator.prepare import PreparedData

    try:
        _print_manifest(PreparedData.load(directory).manifest)
    except FileNotFoundError as error:
        fail(str(error))


@app.command("inspect")
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

    from orchestrator.inputs import materialize_synthetic, resolve_model
    from workloads.conversations import ConversationError, parse_record
    from workloads.mask_inspect import inspect_rows, to_html, to_json, to_rich_text
    from workloads.model import num_image_tokens
    from workloads.segment_codes import MASKING_MODES
    from workloads.segments import EncodeSpec, encode_conversations

    cfg = load(config, overrides)
    mode = mode or cfg.masking.mode
    if mode not in MASKING_MODES:
        fail(f"--mode must be one of {MASKING_MODES}")
    if fmt not in ("text", "html", "json"):
        fail("--format must be text, html or json")
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
