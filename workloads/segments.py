"""Token segments: the one label every token carries, and the weights made from them.

Preparation stores segments, never weights, so one prepared data set serves a
whole λ grid: the training step turns segments into weights with the trial's
masking mode and λ values (see the segment table in docs/design.md).

`encode_conversations` makes the segments: render with character pieces,
tokenize once per batch with offsets, look every token's piece up with numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain

import numpy as np

from workloads.segment_codes import Segment

# --- encoding: rendered conversations -> token ids and segments (see encode_conversations) -----

_IMAGE, _RESPONSE = int(Segment.IMAGE), int(Segment.RESPONSE)
_WHITESPACE_TABLE = np.zeros(0x3001, dtype=bool)
_WHITESPACE_TABLE[[c for c in range(0x3001) if chr(c).isspace()]] = True


def _is_space(codepoints: np.ndarray) -> np.ndarray:
    """str.isspace for an array of code points."""
    return _WHITESPACE_TABLE[np.minimum(codepoints, 0x3000)] & (codepoints <= 0x3000)


@dataclass(frozen=True)
class EncodeSpec:
    template: str
    num_image_tokens: int  # each <image> placeholder expands to this many copies of the image token id
    max_length: int
    task_templates: tuple[str, ...] = ()
    image_token: str = "<image>"
    system_prompt: str | None = None

    def __post_init__(self):
        if self.num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {self.num_image_tokens}")
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")
        object.__setattr__(self, "task_templates", tuple(self.task_templates))


@dataclass
class EncodedRow:
    input_ids: np.ndarray  # int32
    segments: np.ndarray  # int8 Segment codes, same length
    truncated: bool
    images_kept: int  # images whose tokens survive truncation; feed only the first images_kept images


def image_token_id(tokenizer, image_token: str = "<image>") -> int:
    """The id of the image placeholder, which must be one special token of `tokenizer`."""
    ids = tokenizer(image_token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or ids[0] == getattr(tokenizer, "unk_token_id", None):
        raise ValueError(
            f"image token {image_token!r} must be a single (special) token of the tokenizer, got ids {ids}; "
            "add it with tokenizer.add_special_tokens"
        )
    return int(ids[0])


def encode_conversations(convs: Sequence, tokenizer, spec: EncodeSpec, *, chunk_rows: int = 256) -> list:
    """Render, tokenize and segment a batch; one `EncodedRow` or `ConversationError` per input, in order.

    The procedure (docs/design.md, "Token segments"): render each conversation to
    text with character pieces (chat_templates.render_spans), tokenize the
    texts in one batched call with the fast tokenizer's offsets, and give
    every token the segment of the piece that holds its key character, by one
    numpy searchsorted over the whole batch. No round is tokenized apart.

    Key character, i.e. how a token that straddles two pieces is labeled: the
    token's FIRST NON-WHITESPACE character (a token of whitespace only, or
    with an empty span, goes by its first character). Tokenizers glue a word's
    leading space to the word (" The", "▁The"), so the space after
    "ASSISTANT:" sits inside the first answer token; keying on the first
    visible character gives that token to the answer, where its content is.
    So only whitespace ever crosses a piece boundary, and the property tests
    compare segment texts up to whitespace at the boundaries. A token holding
    visible characters of two pieces needs a merge between two visible
    characters across a boundary; every template puts whitespace or a special
    token at its boundaries, but a task-template sentence ends at a newline
    inside the user's text, and a tokenizer that merges across newlines
    (".\nWhat") would make such a token: it goes by its first visible
    character too (tested), the rule is the same everywhere.

    Each image placeholder token (a single special token, checked) becomes
    `spec.num_image_tokens` copies of its id with segment IMAGE. Truncation to
    `spec.max_length` never cuts an image block: the cut moves to the start of
    the block, and `images_kept` says how many images the caller must feed.
    A row with no RESPONSE token left (or none at all) is returned as
    ConversationError("no_trained_tokens"), never as an all-zero-weight row.
    Template and validation failures are returned per row the same way, so
    one bad row does not fail the batch.

    Rows go through in chunks of `chunk_rows`, one batched tokenizer call per
    chunk, run on a helper thread: the Rust tokenizer releases the GIL, so
    this thread renders the next chunk and segments the previous one
    meanwhile (rendering and segmentation are Python, tokenization is Rust;
    benchmarks/masking.py measures the overlap). Results do not depend on
    `chunk_rows`.
    """
    from workloads.chat_templates import RenderContext

    image_id = image_token_id(tokenizer, spec.image_token)
    context = RenderContext.create(spec.template, tokenizer, spec.task_templates, spec.image_token, spec.system_prompt)
    results: list = [None] * len(convs)
    step = max(1, chunk_rows)
    chunk_starts = range(0, len(convs), step)
    if len(chunk_starts) == 1:  # nothing to overlap with
        chunk = _render_chunk(convs, 0, step, context, results)
        _finish_chunk(chunk, _tokenize(tokenizer, chunk.texts), spec, image_id, results)
        return results
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="l2t-tokenize") as tokenizer_thread:
        pending = None
        for start in chunk_starts:
            chunk = _render_chunk(convs, start, start + step, context, results)
            tokenized = tokenizer_thread.submit(_tokenize, tokenizer, chunk.texts)
            if pending is not None:
                _finish_chunk(pending[0], pending[1].result(), spec, image_id, results)
            pending = (chunk, tokenized)
        if pending is not None:
            _finish_chunk(pending[0], pending[1].result(), spec, image_id, results)
    return results


@dataclass
class _RenderedChunk:
    texts: list[str]
    piece_starts: list[list[int]]
    piece_segments: list[list[int]]
    positions: list[int]  # index of each rendered row in the caller's batch
    row_ids: list[str]


def _render_chunk(convs: Sequence, start: int, stop: int, context, results: list) -> _RenderedChunk:
    from workloads.chat_templates import render_spans
    from workloads.conversations import ConversationError

    chunk = _RenderedChunk([], [], [], [], [])
    for i in range(start, min(stop, len(convs))):
        conv = convs[i]
        try:
            text, starts, segments = render_spans(conv, context)
        except ConversationError as error:
            results[i] = error
            continue
        chunk.texts.append(text)
        chunk.piece_starts.append(starts)
        chunk.piece_segments.append(segments)
        chunk.positions.append(i)
        chunk.row_ids.append(conv.id)
    return chunk


def _finish_chunk(chunk: _RenderedChunk, tokenized, spec: EncodeSpec, image_id: int, results: list) -> None:
    ids_lists, offset_lists = tokenized
    rows = _segment(
        chunk.texts, chunk.piece_starts, chunk.piece_segments, chunk.row_ids, ids_lists, offset_lists, spec, image_id
    )
    for i, row in zip(chunk.positions, rows):
        results[i] = row


def segment_tokens(rendered, tokenizer, spec: EncodeSpec, row_id: str = "?") -> EncodedRow:
    """One already rendered row (chat_templates.Rendered); raises ConversationError if it is unusable."""
    starts = [p.start for p in rendered.pieces]
    segments = [int(p.segment) for p in rendered.pieces]
    image_id = image_token_id(tokenizer, spec.image_token)
    ids_lists, offset_lists = _tokenize(tokenizer, [rendered.text])
    (row,) = _segment([rendered.text], [starts], [segments], [row_id], ids_lists, offset_lists, spec, image_id)
    if isinstance(row, Exception):
        raise row
    return row


def _tokenize(tokenizer, texts: list[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """ids and character offsets, one batched call, no special tokens added.

    Same result as `tokenizer(texts, add_special_tokens=False,
    return_offsets_mapping=True)`, but straight from the Rust backend when it
    has no truncation or padding configured: this skips building the
    attention-mask and type-id lists that masking does not need.
    """
    if not texts:
        return [], []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        encodings = backend.encode_batch(texts, add_special_tokens=False)
        return [e.ids for e in encodings], [e.offsets for e in encodings]
    batch = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return batch["input_ids"], batch["offset_mapping"]


def _segment(
    texts, piece_starts, piece_segments, row_ids, ids_lists, offset_lists, spec: EncodeSpec, image_id: int
) -> list:
    """Segments for tokenized rows: the vectorized lookup, image expansion and truncation."""
    from workloads.conversations import ConversationError

    n_rows = len(texts)
    if n_rows == 0:
        return []

    # Everything below works on the whole batch at once: rows are concatenated.
    token_counts = np.fromiter(map(len, ids_lists), dtype=np.int64, count=n_rows)
    n_tokens = int(token_counts.sum())
    ids = np.fromiter(chain.from_iterable(ids_lists), dtype=np.int32, count=n_tokens)
    offsets = np.fromiter(
        chain.from_iterable(chain.from_iterable(offset_lists)), dtype=np.int64, count=2 * n_tokens
    ).reshape(n_tokens, 2)
    text_lengths = np.fromiter(map(len, texts), dtype=np.int64, count=n_rows)
    text_base = np.zeros(n_rows, dtype=np.int64)
    np.cumsum(text_lengths[:-1], out=text_base[1:])
    token_text_base = np.repeat(text_base, token_counts)
    starts = offsets[:, 0] + token_text_base
    ends = offsets[:, 1] + token_text_base

    keys = _key_characters(texts, starts, ends)
    # An empty span at the very end of a row would otherwise point into the next row.
    np.minimum(keys, np.repeat(text_base + text_lengths - 1, token_counts), out=keys)

    pieces_per_row = np.fromiter(map(len, piece_starts), dtype=np.int64, count=n_rows)
    global_piece_starts = np.fromiter(chain.from_iterable(piece_starts), dtype=np.int64) + np.repeat(
        text_base, pieces_per_row
    )
    segment_of_piece = np.fromiter(chain.from_iterable(piece_segments), dtype=np.int8)
    segments = segment_of_piece[np.searchsorted(global_piece_starts, keys, side="right") - 1]

    # Per-row facts, from the unexpanded tokens.
    row_token_starts = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(token_counts, out=row_token_starts[1:])

    def per_row(flags: np.ndarray) -> np.ndarray:  # how many flagged tokens each row has
        cumulative = np.zeros(len(flags) + 1, dtype=np.int64)
        np.cumsum(flags, out=cumulative[1:])
        return np.diff(cumulative[row_token_starts])

    is_image = ids == image_id
    images_per_row = per_row(is_image)
    misplaced_images = per_row(is_image != (segments == _IMAGE)).tolist()
    responses_per_row = per_row(segments == _RESPONSE).tolist()

    block = spec.num_image_tokens
    ids, segments, row_bounds = _expand_images(ids, segments, is_image, token_counts, images_per_row, block)
    images_per_row = images_per_row.tolist()

    results: list = []
    max_length = spec.max_length
    for r in range(n_rows):
        a, z = row_bounds[r], row_bounds[r + 1]
        if misplaced_images[r]:
            results.append(
                ConversationError(
                    "image_placeholder_mismatch",
                    f"row {row_ids[r]!r}: the image token appears outside an image placeholder "
                    "(e.g. in a system prompt)",
                )
            )
        elif z - a <= max_length:
            if responses_per_row[r]:
                results.append(EncodedRow(ids[a:z], segments[a:z], False, images_per_row[r]))
            else:
                results.append(ConversationError("no_trained_tokens", f"row {row_ids[r]!r}: no response token"))
        else:
            results.append(_truncated(ids[a:z], segments[a:z], image_id, block, max_length, row_ids[r]))
    return results


def _key_characters(texts, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Key character of each token (global offsets into the joined texts): its first non-whitespace
    character, or its first character when it has none (whitespace only, or an empty span)."""
    codepoints = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)
    keys = starts.copy()
    moving = np.flatnonzero(starts < ends)  # tokens whose key may still move right
    moving = moving[_is_space(codepoints[keys[moving]])]
    while moving.size:  # one step per leading whitespace character; tokens rarely carry more than one
        keys[moving] += 1
        moving = moving[keys[moving] < ends[moving]]
        moving = moving[_is_space(codepoints[keys[moving]])]
    whitespace_only = keys >= ends
    keys[whitespace_only] = starts[whitespace_only]
    return keys


def _expand_images(
    ids: np.ndarray,
    segments: np.ndarray,
    is_image: np.ndarray,
    token_counts: np.ndarray,
    images_per_row: np.ndarray,
    block: int,
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Expand each image placeholder token into its block of `block` image tokens.

    Returns the expanded ids and segments of the whole batch and the row bounds in them
    (row r is [bounds[r], bounds[r + 1]))."""
    if block > 1 and images_per_row.any():
        repeats = np.where(is_image, block, 1)
        ids = np.repeat(ids, repeats)
        segments = np.repeat(segments, repeats)
    row_bounds = np.zeros(len(token_counts) + 1, dtype=np.int64)
    np.cumsum(token_counts + images_per_row * (block - 1), out=row_bounds[1:])
    return ids, segments, row_bounds.tolist()


def _truncated(ids: np.ndarray, segments: np.ndarray, image_id: int, block: int, max_length: int, row_id: str):
    from workloads.conversations import ConversationError

    cut, images_kept = _truncation_point(ids, image_id, block, max_length)
    if not (segments[:cut] == _RESPONSE).any():
        return ConversationError(
            "no_trained_tokens",
            f"row {row_id!r}: no response token within max_length={max_length} "
            f"({len(ids)} tokens with images expanded)",
        )
    return EncodedRow(ids[:cut], segments[:cut], True, images_kept)


def _truncation_point(ids: np.ndarray, image_id: int, block: int, max_length: int) -> tuple[int, int]:
    """Where to cut an expanded row to at most `max_length` tokens without splitting an image block.

    Returns (cut, number of image blocks before the cut). Image blocks are
    recognized from their positions (adjacent blocks are not merged).
    """
    image_positions = np.flatnonzero(ids == image_id)
    if len(image_positions):
        block_starts = image_positions[::block]
        block_ends = block_starts + block
        inside = (block_starts < max_length) & (block_ends > max_length)
        cut = int(block_starts[inside][0]) if inside.any() else max_length
        return cut, int((block_ends <= cut).sum())
    return max_length, 0
