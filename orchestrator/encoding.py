"""Encoding of validated rows into token ids and segment codes, the third stage of `l2t data prepare`.

Render with the chat template, tokenize once with offsets, segment
(`workloads.segments.encode_conversations`), and pack the results into
compact Arrow list columns. This is the only stage that loads a tokenizer
(once per worker process); rows that fail here (a chat template that fails,
no response token left within max_length, anything that breaks the
tokenizer) get a reason like validation's and go to the quarantine. `SHARD_SCHEMA` is the format of the written shards
that training reads.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from orchestrator.validation import _reason_counts, conversations_of

SHARD_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("segments", pa.list_(pa.int8())),
        ("images", pa.list_(pa.string())),
        ("length", pa.int32()),
        ("truncated", pa.bool_()),
        ("image_tokens", pa.list_(pa.int32())),  # tokens of each image (workloads/families.py), in order
    ]
)
ENCODED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("line", pa.int64()),
        ("raw", pa.string()),  # kept only for rows that failed encoding (for the quarantine)
        ("input_ids", pa.list_(pa.int32())),
        ("segments", pa.list_(pa.int8())),
        ("images", pa.list_(pa.string())),
        ("length", pa.int32()),
        ("truncated", pa.bool_()),
        ("image_tokens", pa.list_(pa.int32())),
        ("ok", pa.bool_()),
        ("reason", pa.string()),
        ("message", pa.string()),
    ]
)


@functools.lru_cache(maxsize=4)
def _tokenizer(model_dir: str):
    """One tokenizer per worker process: Ray reuses processes across tasks.

    Ray runs one task per CPU, so the Rust tokenizer must not start a thread
    pool of its own on top (TOKENIZERS_PARALLELISM=false).
    """
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _list_array(arrays: list[np.ndarray], dtype) -> pa.Array:
    """A list<dtype> Arrow array from numpy arrays, with one copy."""
    lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = (
        np.concatenate(arrays).astype(dtype.to_pandas_dtype(), copy=False)
        if arrays
        else np.zeros(0, dtype.to_pandas_dtype())
    )
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, dtype))


def encode_rows(batch: pa.Table, model_dir: str, spec_kwargs: dict[str, Any], image_root: str | None = None):
    """Ray Data stage: render, tokenize once with offsets, segment; rows that fail get a reason.

    Input: good rows of VALIDATED_SCHEMA. Output: ENCODED_SCHEMA, `raw` kept
    only for failed rows. A model whose image-token count depends on the image's size (spec
    `num_image_tokens` 0) has each image's header read under `image_root` (`images.image_token_counts`).
    """
    from workloads.conversations import ConversationError
    from workloads.segments import EncodeSpec

    conversations = conversations_of(batch)
    results = encode_with_images(conversations, _tokenizer(model_dir), EncodeSpec(**spec_kwargs), model_dir, image_root)
    empty_ids, empty_segments = np.zeros(0, np.int32), np.zeros(0, np.int8)
    input_ids, segments, images, truncated, ok, reasons, messages = [], [], [], [], [], [], []
    image_tokens = []
    failed = np.zeros(len(results), dtype=bool)
    for i, (conversation, result) in enumerate(zip(conversations, results)):
        if isinstance(result, ConversationError):
            failed[i] = True
            input_ids.append(empty_ids)
            segments.append(empty_segments)
            images.append([])
            image_tokens.append([])
            truncated.append(False)
            ok.append(False)
            reasons.append(result.reason)
            messages.append(str(result))
        else:
            input_ids.append(result.input_ids)
            segments.append(result.segments)
            images.append(list(conversation.images[: result.images_kept]))
            image_tokens.append(list(result.image_tokens))
            truncated.append(bool(result.truncated))
            ok.append(True)
            reasons.append("")
            messages.append("")
    raw = batch.column("raw")
    if not failed.any():
        raw = pa.array([""] * batch.num_rows, pa.string())
    else:
        raw = pc.if_else(pa.array(failed), raw, pa.scalar("", pa.string()))
    return pa.table(
        {
            "id": batch.column("id"),
            "source": batch.column("source"),
            "line": batch.column("line"),
            "raw": raw,
            "input_ids": _list_array(input_ids, pa.int32()),
            "segments": _list_array(segments, pa.int8()),
            "images": pa.array(images, pa.list_(pa.string())),
            "length": pa.array(np.fromiter(map(len, input_ids), np.int32, count=len(input_ids))),
            "truncated": pa.array(truncated, pa.bool_()),
            "image_tokens": pa.array(image_tokens, pa.list_(pa.int32())),
            "ok": pa.array(ok, pa.bool_()),
            "reason": pa.array(reasons, pa.string()),
            "message": pa.array(messages, pa.string()),
        },
        schema=ENCODED_SCHEMA,
    )


def encode_with_images(conversations: list, tokenizer, spec, model_dir: str, image_root: str | None) -> list:
    """`EncodedRow` or `ConversationError` per conversation, encoded as preparation encodes rows: with each
    image's token count from its size when the model's family needs it (`images.image_token_counts`)."""
    from orchestrator.images import image_token_counts

    counts = image_token_counts(conversations, model_dir, image_root) if spec.num_image_tokens == 0 else None
    return _encode_each(conversations, tokenizer, spec, counts)


def _encode_each(conversations: list, tokenizer, spec, counts: list | None = None) -> list:
    """`encode_conversations`, and row by row when the block fails: a row that breaks the template, the
    tokenizer or the segmenter becomes its own `ConversationError` ("encode_failed"), never a failed stage.
    `counts`: per row its images' token counts, or the error that reading them gave (which the row gets)."""
    from workloads.conversations import ConversationError
    from workloads.segments import encode_conversations

    unreadable = {i: c for i, c in enumerate(counts or ()) if isinstance(c, ConversationError)}
    image_tokens = None if counts is None else [None if i in unreadable else c for i, c in enumerate(counts)]
    try:
        # one thread: a preparation task holds one CPU of a cluster whose other CPUs run tasks too
        results = encode_conversations(conversations, tokenizer, spec, image_tokens=image_tokens, overlap=False)
    except Exception:  # noqa: BLE001 - find the row(s) that did it
        results = []
        for i, conversation in enumerate(conversations):
            try:
                row_tokens = None if image_tokens is None else [image_tokens[i]]
                results.extend(encode_conversations([conversation], tokenizer, spec, image_tokens=row_tokens))
            except Exception as error:  # noqa: BLE001
                message = f"row {conversation.id!r}: can't be encoded: {type(error).__name__}: {error}"
                results.append(ConversationError("encode_failed", message))
    for i, error in unreadable.items():
        results[i] = error
    return results


def _encoding_summary(batch: pa.Table) -> pa.Table:
    """One row per block: written rows, tokens per segment, truncations, lengths, failures by reason."""
    from workloads.segment_codes import Segment

    good = batch.filter(batch.column("ok"))
    flat = pc.list_flatten(good.column("segments")).to_numpy(zero_copy_only=False)
    lengths = good.column("length").to_numpy(zero_copy_only=False)
    summary = {
        "rows": good.num_rows,
        "segment_counts": np.bincount(flat.astype(np.int64), minlength=len(Segment)).tolist(),
        "truncated": int(pc.sum(pc.cast(good.column("truncated"), pa.int64())).as_py() or 0),
        "length_sum": int(lengths.sum()),
        "length_max": int(lengths.max()) if len(lengths) else 0,
        "reasons": _reason_counts(batch),
    }
    return pa.table({"summary": [json.dumps(summary)]})


def encoding_totals(summaries: list[dict]) -> dict[str, Any]:
    """The manifest's token statistics, from the per-block `_encoding_summary` rows."""
    from workloads.segment_codes import Segment

    counts = np.sum([t["segment_counts"] for t in summaries], axis=0) if summaries else np.zeros(len(Segment), int)
    rows = sum(t["rows"] for t in summaries)
    length_sum = sum(t["length_sum"] for t in summaries)
    return {
        "truncated_rows": int(sum(t["truncated"] for t in summaries)),
        "tokens_total": int(counts.sum()),
        "tokens_by_segment": {s.name.lower(): int(counts[int(s)]) for s in Segment},
        "length_mean": length_sum / rows if rows else 0.0,
        "length_max": max((t["length_max"] for t in summaries), default=0),
    }
