"""The steps that make a fit's inputs: the synthetic data set and the model folder.

Each is a step (`orchestrator.steps`): its folder under `storage.path`
(`orchestrator.layout`) is keyed by what determines it, so a second run
reuses it. The synthetic set is keyed by its settings; the tiny preset by its
shape, the chat template, the corpus its tokenizer is trained on and the seed.
A model that is not `tiny` is a local folder or a hub id and is used as is.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from orchestrator import layout, storage
from orchestrator.config import ExperimentConfig, with_overrides
from orchestrator.console import log
from orchestrator.readers import list_source_files
from orchestrator.steps import run_once, stable_hash


def materialize_synthetic(cfg: ExperimentConfig) -> ExperimentConfig:
    """Write the synthetic data set (once per settings) and point `data` at its files."""
    from workloads.synthetic import ALL_KINDS, write_synthetic_dataset

    synthetic = cfg.data.synthetic
    if synthetic is None:
        return cfg
    if storage.is_s3(layout.root(cfg.storage.path)):
        raise ValueError("data.synthetic needs a local storage.path (generate once, then upload)")
    out = layout.synthetic_dir(cfg.storage.path, stable_hash(synthetic.model_dump(mode="json"), length=12))

    def generate(folder: str) -> None:
        rows = f"{synthetic.train_rows} train rows, {synthetic.eval_rows} eval questions"
        log(f"[data] generating synthetic data set: {rows} -> {folder}")
        write_synthetic_dataset(
            Path(folder),
            train_rows=synthetic.train_rows,
            eval_rows=synthetic.eval_rows,
            seed=synthetic.seed,
            max_objects=synthetic.max_objects,
            image_size=synthetic.image_size,
            kinds=tuple(synthetic.kinds or ALL_KINDS),
        )

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
    role markers get their own tokens), for training the tiny model's tokenizer."""
    from workloads.chat_templates import render
    from workloads.conversations import ConversationError, parse_record

    seen = 0
    for path in files:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if seen >= limit:
                    return
                try:
                    conversation = parse_record(json.loads(line))
                except (json.JSONDecodeError, ConversationError):
                    continue
                seen += 1
                if template == "tokenizer":
                    yield from (turn.text for turn in conversation.turns)
                else:
                    yield render(conversation, template).text


def resolve_model(cfg: ExperimentConfig) -> str:
    """The model folder or hub id to train; builds the `tiny` preset once per shape and corpus."""
    if cfg.model.name_or_path != "tiny":
        local = Path(cfg.model.name_or_path).expanduser()
        return str(local.resolve()) if local.exists() else cfg.model.name_or_path
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
        log(f"[model] building the tiny LLaVA preset -> {folder}")
        corpus = tokenizer_corpus([f for f in files if not storage.is_s3(f)], cfg.data.chat_template)
        build_tiny_model(Path(folder), corpus, cfg.model.tiny, seed=cfg.train.seed)

    return run_once(layout.tiny_model_dir(cfg.storage.path, key), build)
