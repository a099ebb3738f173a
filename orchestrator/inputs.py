"""The steps that make a fit's inputs: the synthetic data set and the model folder.

Each is a step (`orchestrator.steps`): its folder under `storage.path`
(`orchestrator.layout`) is keyed by what determines it, so a second run
reuses it. The synthetic set is keyed by its settings; the tiny preset by its
shape, the chat template, the corpus its tokenizer is trained on and the seed.
A model that is not `tiny` is a local folder or a hub id (`preflight.model_reference`) and is used as is.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from orchestrator import layout, storage
from orchestrator.config import ExperimentConfig, sources_over_synthetic, with_overrides
from orchestrator.console import log
from orchestrator.preflight import model_reference
from orchestrator.readers import list_source_files, local_records
from orchestrator.steps import run_once, stable_hash


def materialize_synthetic(cfg: ExperimentConfig) -> ExperimentConfig:
    """Write the synthetic data set (once per settings) and point `data` at its files.

    Explicit `data.sources` win: with both set (`l2t train configs/quickstart.yaml data.sources=[my.json]`)
    the synthetic set is ignored, and one line says so.
    """
    from workloads.synthetic import write_from_config

    synthetic = cfg.data.synthetic
    if synthetic is None:
        return cfg
    if cfg.data.sources:  # explicit sources win (orchestrator.config.sources_over_synthetic)
        return sources_over_synthetic(cfg)
    if storage.is_s3(layout.root(cfg.storage.path)):
        raise ValueError("data.synthetic needs a local storage.path (generate once, then upload)")
    out = layout.synthetic_dir(cfg.storage.path, stable_hash(synthetic.model_dump(mode="json"), length=12))

    def generate(folder: str) -> None:
        rows = f"{synthetic.train_rows} train rows, {synthetic.eval_rows} eval questions"
        log(f"[data] generating synthetic data set: {rows} -> {folder}")
        write_from_config(Path(folder), synthetic)

    run_once(out, generate)
    return with_overrides(
        cfg,
        {
            "data.sources": [storage.join(out, "train.jsonl")],
            "data.image_root": out,
            "data.eval_file": storage.join(out, "eval.jsonl") if synthetic.eval_rows else None,
            "data.synthetic": None,
        },
    )


def tokenizer_corpus(files: list[str], template: str, limit: int = 50_000) -> Iterator[str]:
    """Text of the training conversations, rendered with the chat template (so system prompt and
    role markers get their own tokens), for training the tiny model's tokenizer.

    Records are split as preparation splits them (`readers.local_records`: JSONL, JSON arrays, Parquet);
    one that can't be read, parsed or rendered (invalid UTF-8, bad JSON, a bad row) is left out here,
    and preparation quarantines it with its reason.
    """
    from workloads.chat_templates import render
    from workloads.conversations import parse_record

    seen = 0
    for _, _, raw in local_records(files):
        if seen >= limit:
            return
        try:
            conversation = parse_record(json.loads(raw))
            if template == "tokenizer":
                texts = [turn.text for turn in conversation.turns]
            else:
                texts = [render(conversation, template).text]
            for text in texts:
                text.encode("utf-8")  # a lone surrogate from a JSON escape can't be trained on
        except Exception:  # noqa: BLE001 - whatever one row does, it is left out of the corpus, never fatal
            continue
        seen += 1
        yield from texts


def resolve_model(cfg: ExperimentConfig) -> str:
    """The model folder or hub id to train; builds the `tiny` preset once per shape and corpus."""
    kind, model = model_reference(cfg.model.name_or_path)  # PreflightError: neither a folder nor a hub id
    if kind != "tiny":
        return model
    from workloads.tiny_model import build_tiny_model

    files = list_source_files(cfg.data.sources)
    key = stable_hash(
        {
            "tiny": cfg.model.tiny.model_dump(mode="json"),
            "template": cfg.data.chat_template,
            "corpus": [storage.file_fingerprint(f) for f in files],
            "seed": cfg.train.seed,
        },
        length=12,
    )

    def build(folder: str) -> None:
        log(f"[model] building the tiny {cfg.model.tiny.family} preset -> {folder}")
        corpus = tokenizer_corpus([f for f in files if not storage.is_s3(f)], cfg.data.chat_template)
        build_tiny_model(Path(folder), corpus, cfg.model.tiny, seed=cfg.train.seed)

    return run_once(layout.tiny_model_dir(cfg.storage.path, key), build)
