"""The relevance stage of `l2t data prepare`: every instruction token scored by a reference model on Ray Data.

With `data.relevance` set, preparation runs one more stage after encoding: a pool of
`RelevanceActor`s (Ray Data `map_batches` with a class, `data.relevance.concurrency` actors on CPU
or one GPU each) loads the reference model once per actor and scores each block's rows with
`workloads.visual_relevance.RelevanceScorer` (two teacher-forced passes, with the image and with
V=∅ = `eval.null_image`, seeded by `eval.seed`, as evaluation does). The shards then carry the
float16 `relevance` column beside `segments`; `masking.mode=l2t_visual` weights by it at training
time, so every transform, temperature and floor trains on one scoring.

The prepared key includes the reference model's identity (`relevance_inputs`: its name and a hash
of its files' contents), so a sweep scores once and preparing again is a no-op, while a retrained
reference model scores again. A row whose image can't be opened now (it passed validation) keeps
relevance 0 and is counted (`rows_unscored`), never a failed stage. The manifest's `relevance`
entry holds the stage's seconds and rows/s and the per-segment distribution (`l2t data stats`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from orchestrator import storage
from orchestrator.images import open_confined_image
from workloads.visual_relevance import RELEVANCE_COLUMN, RelevanceHistogram, RelevanceScorer, RowToScore

__all__ = ["RELEVANCE_COLUMN", "model_identity", "relevance_inputs", "score_relevance"]

RELEVANCE_VERSION = 1
"""Bumped when the scoring changes what it writes (part of the prepared key)."""
PROBLEM_COLUMN = "relevance_problem"
FULL_HASH_BYTES = 256 << 20
"""Files up to this size are hashed whole; larger ones (big weights) by their size and three 8 MiB samples."""
SAMPLE_BYTES = 8 << 20


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as handle:
        if size <= FULL_HASH_BYTES:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        else:
            digest.update(str(size).encode())
            for offset in (0, size // 2, size - SAMPLE_BYTES):
                handle.seek(offset)
                digest.update(handle.read(SAMPLE_BYTES))
    return digest.hexdigest()


def model_identity(reference: str) -> dict[str, Any]:
    """What identifies a reference model: a local folder by its files' content hashes, a hub id by its name
    (and its cached snapshot's files when there is one; pin a revision by pointing at a local snapshot)."""
    folder = Path(reference)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(reference, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached here: the name is all there is
            return {"name": reference, "files": None}
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    return {"name": reference, "files": {str(p.relative_to(folder)): _file_hash(p) for p in files}}


def relevance_inputs(cfg) -> dict[str, Any] | None:
    """The part of the prepared key the scoring determines (None without `data.relevance`): the reference
    model's identity and evaluation's V=∅ (`eval.null_image`, `eval.seed` for noise); not the actor pool."""
    settings = cfg.data.relevance
    if settings is None:
        return None
    seed = cfg.eval.seed if cfg.eval.null_image == "noise" else None
    identity = model_identity(_resolved(settings.reference_model))
    identity["name"] = settings.reference_model
    return {"version": RELEVANCE_VERSION, "model": identity, "null_image": cfg.eval.null_image, "seed": seed}


def _resolved(reference: str) -> str:
    """A local folder as an absolute path (actors may run elsewhere in the tree); a hub id as given."""
    return str(Path(reference).resolve()) if Path(reference).is_dir() else reference


# ---------------------------------------------------------------- the Ray Data stage


class RelevanceActor:
    """Ray Data actor: loads the reference model once, adds each encoded block's `relevance` column."""

    def __init__(self, reference_model: str, model_dir: str, image_root: str | None, options: dict[str, Any]):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import torch

        if options.get("torch_threads") and not options["use_gpu"]:
            torch.set_num_threads(int(options["torch_threads"]))
        _check_compatible(reference_model, model_dir)
        self.scorer = RelevanceScorer.from_pretrained(
            reference_model,
            device="cuda" if options["use_gpu"] else "cpu",
            null_image=options["null_image"],
            seed=options["seed"],
        )
        self.image_root = image_root
        self.image_fs = storage.filesystem(image_root)[0] if image_root and storage.is_s3(image_root) else None
        self.batch_size = int(options["batch_size"])

    def _row(self, row_id: str, ids, segments, paths) -> tuple[RowToScore, str]:
        images = []
        for path in paths or []:
            try:
                images.append(open_confined_image(self.image_root, str(path), filesystem=self.image_fs))
            except Exception as error:  # noqa: BLE001 - the row keeps relevance 0, counted
                row = RowToScore(row_id, np.asarray(ids), np.asarray(segments), [])
                return row, f"image {str(path)!r}: {type(error).__name__}: {error}"
        return RowToScore(row_id, np.asarray(ids, np.int64), np.asarray(segments, np.int64), images), ""

    def __call__(self, batch: pa.Table) -> pa.Table:
        columns = {name: batch.column(name).to_pylist() for name in ("id", "input_ids", "segments", "images", "ok")}
        relevance: list[np.ndarray] = [np.zeros(len(ids), np.float16) for ids in columns["input_ids"]]
        problems = [""] * batch.num_rows
        rows = []
        for i, ok in enumerate(columns["ok"]):
            if ok:
                row, problems[i] = self._row(
                    str(columns["id"][i]), columns["input_ids"][i], columns["segments"][i], columns["images"][i]
                )
                rows.append((i, row))
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            for (i, _), values in zip(chunk, self.scorer([row for _, row in chunk])):
                relevance[i] = values
        scored = pa.ListArray.from_arrays(
            pa.array(np.concatenate([[0], np.cumsum([len(r) for r in relevance])]).astype(np.int32)),
            pa.array(np.concatenate(relevance) if relevance else np.zeros(0, np.float16), pa.float16()),
        )
        return batch.append_column(RELEVANCE_COLUMN, scored).append_column(PROBLEM_COLUMN, pa.array(problems))


def _check_compatible(reference_model: str, model_dir: str) -> None:
    """The reference model must read the prepared token ids as the trained model's tokenizer wrote them."""
    from transformers import AutoConfig, AutoTokenizer

    from workloads.model import num_image_tokens

    mine, theirs = AutoTokenizer.from_pretrained(model_dir), AutoTokenizer.from_pretrained(reference_model)
    if mine.get_vocab() != theirs.get_vocab():
        raise ValueError(
            f"data.relevance.reference_model={reference_model}: its tokenizer differs from the trained model's "
            f"({model_dir}); relevance is scored on the prepared token ids, so they must share one"
        )
    tokens = num_image_tokens(AutoConfig.from_pretrained(reference_model))
    if tokens != num_image_tokens(AutoConfig.from_pretrained(model_dir)):
        raise ValueError(
            f"data.relevance.reference_model={reference_model}: {tokens} image tokens per image, the prepared "
            "rows have a different count"
        )


def _block_summary(batch: pa.Table) -> pa.Table:
    """One row per block: scored and unscored rows, the relevance histogram per segment."""
    good = batch.filter(batch.column("ok"))
    histogram = RelevanceHistogram()
    for segments, values in zip(good.column("segments").to_pylist(), good.column(RELEVANCE_COLUMN).to_pylist()):
        histogram.add(np.asarray(segments), np.asarray(values, dtype=np.float32))
    unscored = sum(1 for p in good.column(PROBLEM_COLUMN).to_pylist() if p)
    summary = {"rows": good.num_rows, "unscored": unscored, "histogram": histogram.to_dict()}
    return pa.table({"summary": [json.dumps(summary)]})


def score_relevance(run, encoded):
    """The stage: `encoded` (prepare's `_Encoded`) with `relevance` beside its segments and the manifest entry
    in `.relevance`; unchanged without `data.relevance`. `run` is prepare's `_Run`."""
    import ray
    import ray.data

    from orchestrator.config import EvalConfig
    from orchestrator.evaluate import _pool

    cfg = run.cfg
    settings = cfg.data.relevance
    if settings is None:
        return encoded
    started = time.perf_counter()
    use_gpu = cfg.train.use_gpu if settings.use_gpu is None else settings.use_gpu
    pool = EvalConfig(use_gpu=use_gpu, concurrency=settings.concurrency, cpus_per_actor=settings.cpus_per_actor)
    actors, cpus, extra = _pool(pool, max(1, math.ceil(encoded.rows_written / settings.batch_size)))
    reference = _resolved(settings.reference_model)
    run.say(f"[prepare] score visual relevance of {encoded.rows_written:,} rows with {reference} ({actors} actor(s))")
    options = {"use_gpu": use_gpu, "null_image": cfg.eval.null_image, "seed": cfg.eval.seed}
    options.update(batch_size=settings.batch_size, torch_threads=None if use_gpu else max(1, round(cpus)))
    ds = encoded.ds.map_batches(
        RelevanceActor,
        fn_constructor_kwargs={
            "reference_model": reference,
            "model_dir": run.model_dir,
            "image_root": cfg.data.image_root,
            "options": options,
        },
        batch_size=None,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus,
        **extra,
    ).materialize()
    blocks = ds.map_batches(_block_summary, batch_size=None, batch_format="pyarrow", num_cpus=run.task_cpus)
    summaries = [json.loads(r["summary"]) for r in blocks.take_all()]
    histogram = RelevanceHistogram()
    for summary in summaries:
        histogram.merge(RelevanceHistogram.from_dict(summary["histogram"]))
    seconds = run.timings["relevance_s"] = time.perf_counter() - started
    rows = sum(s["rows"] for s in summaries)
    unscored = sum(s["unscored"] for s in summaries)
    entry = {
        "reference_model": settings.reference_model,
        "null_image": cfg.eval.null_image,
        "rows_scored": rows - unscored,
        "rows_unscored": unscored,
        "actors": actors,
        "use_gpu": use_gpu,
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows / seconds, 2) if seconds > 0 else None,
        "by_segment": histogram.summary(),
        "ray_version": ray.__version__,
    }
    by = entry["by_segment"].get("instruction", {})
    late = f", {unscored:,} rows unscored (image unreadable now)" if unscored else ""
    run.say(
        f"[prepare] scored {rows:,} rows in {seconds:.1f} s ({entry['rows_per_s']} rows/s); instruction tokens: "
        f"mean relevance {by.get('mean', float('nan')):+.3f}, median {by.get('q50', float('nan')):+.3f}{late}"
    )
    return dataclasses.replace(encoded, ds=ds, relevance=entry)


def score_here(cfg, model_dir: str, rows: list[tuple[str, Any, list[str]]]) -> list[np.ndarray]:
    """Relevance of (row id, EncodedRow, image paths) rows scored in this process, as preparation's actors score
    them (`l2t data inspect`); needs `data.relevance`."""
    settings = cfg.data.relevance
    options = {"use_gpu": False, "null_image": cfg.eval.null_image, "seed": cfg.eval.seed, "torch_threads": None}
    actor = RelevanceActor(
        _resolved(settings.reference_model),
        model_dir,
        cfg.data.image_root,
        options | {"batch_size": settings.batch_size},
    )
    table = pa.table(
        {
            "id": [row_id for row_id, _, _ in rows],
            "input_ids": [np.asarray(row.input_ids, np.int64).tolist() for _, row, _ in rows],
            "segments": [np.asarray(row.segments, np.int64).tolist() for _, row, _ in rows],
            "images": [list(paths) for _, _, paths in rows],
            "ok": [True] * len(rows),
        }
    )
    scored = actor(table)
    return [np.asarray(values, np.float32) for values in scored.column(RELEVANCE_COLUMN).to_pylist()]
