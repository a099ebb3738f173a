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
    from orchestrator.cli.run_commands import checked

    cfg = checked(load(config, overrides), training=False)
    from orchestrator.cluster import connect
    from orchestrator.inputs import materialize_synthetic, resolve_model
    from orchestrator.prepare import PrepareError, prepare

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
    from workloads.segment_codes import token_shares

    for mode, share in token_shares(manifest.get("tokens_by_segment", {})).items():
        table.add_row(
            f"  trained by {mode}",
            f"{share['trained']} ({share['instruction']:.1%} instruction, {share['response']:.1%} response)",
        )
    _relevance_rows(table, manifest.get("relevance"))
    console.print(table)


def _relevance_rows(table: Table, relevance: dict | None) -> None:
    """The relevance stage's reference model, cost and per-segment distribution (prepared with data.relevance)."""
    if not relevance:
        return
    table.add_row("relevance: reference model", str(relevance["reference_model"]))
    table.add_row(
        "relevance: scoring",
        f"{relevance['rows_scored']} rows in {relevance['seconds']:.1f} s ({relevance['rows_per_s']} rows/s), "
        f"V=∅ {relevance['null_image']}"
        + (f", {relevance['rows_unscored']} unscored" if relevance["rows_unscored"] else ""),
    )
    for segment, entry in relevance["by_segment"].items():
        quantiles = " ".join(f"{k} {v:+.2f}" for k, v in entry.items() if k.startswith("q"))
        table.add_row(
            f"  relevance: {segment}",
            f"mean {entry['mean']:+.3f} ± {entry['std']:.3f} over {entry['tokens']} tokens; {quantiles}",
        )


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
    """Show each token with its segment and weight (terminal colors, standalone HTML, or JSON).

    Rows are encoded as training encodes them: the prepared data's spec and task templates when the
    config's data is prepared, else the configured template file, else statistics over `data.sources`.
    """
    from transformers import AutoTokenizer

    from orchestrator.encoding import encode_with_images
    from orchestrator.inputs import materialize_synthetic, resolve_model
    from orchestrator.inspection import training_encode_spec
    from workloads.conversations import ConversationError, parse_record
    from workloads.mask_inspect import inspect_rows, to_html, to_json, to_plain_text, to_rich_text
    from workloads.segment_codes import MASKING_MODES

    cfg = load(config, overrides)
    mode = mode or cfg.masking.mode
    if mode not in MASKING_MODES:
        fail(f"--mode must be one of {MASKING_MODES}")
    if fmt not in ("text", "html", "json"):
        fail("--format must be text, html or json")
    cfg = materialize_synthetic(cfg)  # the tiny preset's tokenizer (and the statistics) need the training data
    model_dir, root = resolve_model(cfg), cfg.data.image_root  # images: each one's token count (families.py)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    spec, origin = training_encode_spec(cfg, model_dir)
    err.print(f"task templates: {len(spec.task_templates)} from {origin}", highlight=False)
    conversations = []
    text = file.read_text(encoding="utf-8")
    records = (
        json.loads(text) if file.suffix == ".json" else [json.loads(line) for line in text.splitlines() if line.strip()]
    )
    for number, record in enumerate(records, start=1):
        if len(conversations) == limit:
            break
        try:
            conversations.append(parse_record(record, cfg.data.format, default_id=f"{file.name}:{number}"))
        except ConversationError as error:
            err.print(f"[yellow]skipped[/yellow] {error} ({error.reason})")
    encoded = []
    for conversation, row in zip(conversations, encode_with_images(conversations, tokenizer, spec, model_dir, root)):
        if isinstance(row, ConversationError):
            err.print(f"[yellow]skipped[/yellow] {row} ({row.reason})")
        else:
            encoded.append((conversation.id, row))
    m = cfg.masking
    relevance = None
    if cfg.data.relevance is not None:  # scored here as preparation's actors score them
        from orchestrator.relevance import score_here

        images = {c.id: c.images for c in conversations}
        relevance = score_here(cfg, model_dir, [(i, row, images[i][: row.images_kept]) for i, row in encoded])
    weights = (mode, m.lambda_instruction, m.lambda_response, m.weights.model_dump())
    try:
        rows = inspect_rows(encoded, tokenizer, *weights, relevance=relevance, visual=m.visual)
    except ValueError as error:
        fail(str(error))
    if fmt == "json":
        print(to_json(rows))
    elif fmt == "html":
        print(to_html(rows))
    elif console.is_terminal:  # FORCE_COLOR keeps the colors in a pipe
        console.print(to_rich_text(rows))
    else:
        print(to_plain_text(rows), end="")
