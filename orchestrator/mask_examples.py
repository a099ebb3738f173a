"""A run's mask example: its first prepared rows as HTML, each token colored by segment, with the run's weights.

Logged with every training run, so the weights a run trained with can be
seen beside its curves. Shards scored for visual relevance (`data.relevance`)
show each token's stored relevance as a heat bar, and `l2t_visual`'s weights
come from it, as the training step computes them.
"""

from __future__ import annotations

from orchestrator import storage
from orchestrator.config import ExperimentConfig
from orchestrator.prepare import PreparedData


def mask_example_html(
    cfg: ExperimentConfig, prepared: PreparedData, model_dir: str, out_uri: str, rows: int = 3
) -> str:
    """Write a standalone HTML page of the first `rows` prepared rows to `out_uri`; returns it."""
    import numpy as np
    import pyarrow.dataset as pads
    from transformers import AutoTokenizer

    from workloads.mask_inspect import inspect_rows, to_html
    from workloads.segments import EncodedRow
    from workloads.visual_relevance import RELEVANCE_COLUMN

    fs, path = storage.filesystem(prepared.shards)
    dataset = pads.dataset(path, filesystem=fs, format="parquet")
    columns = ["id", "input_ids", "segments"] + ([RELEVANCE_COLUMN] if RELEVANCE_COLUMN in dataset.schema.names else [])
    table = dataset.head(rows, columns=columns).to_pylist()
    encoded = [
        (r["id"], EncodedRow(np.asarray(r["input_ids"], np.int32), np.asarray(r["segments"], np.int8), False, 0))
        for r in table
    ]
    relevance = [r[RELEVANCE_COLUMN] for r in table] if RELEVANCE_COLUMN in columns else None
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    m = cfg.masking
    # the configured λ (a schedule's start value) and the per-segment overrides
    weights = (m.mode, m.lambda_instruction, m.lambda_response, m.weights.model_dump())
    page = to_html(inspect_rows(encoded, tokenizer, *weights, relevance=relevance, visual=m.visual))
    storage.write_text(out_uri, page)
    return out_uri
