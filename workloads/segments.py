"""Token segments: the one label every token carries, and the weights made from them.

Preparation stores segments, never weights, so one prepared data set serves a
whole λ grid: the training step turns segments into weights with the trial's
masking mode and λ values (see the segment table in docs/design.md).

`encode_conversations` makes the segments: render with character pieces,
tokenize once per batch with offsets, look every token's piece up with numpy.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain

import numpy as np

from workloads.conversations import ConversationError
from workloads.segment_codes import Segment
from workloads.special_tokens import SpecialTokens, content_specials, respell

# --- encoding: rendered conversations -> token ids and segments (see encode_conversations) -----

_ROLE, _IMAGE, _RESPONSE = int(Segment.ROLE), int(Segment.IMAGE), int(Segment.RESPONSE)
_IS_RESPONSE = np.isin(np.arange(len(Segment)), [Segment.RESPONSE])
_IS_INSTRUCTION = np.isin(np.arange(len(Segment)), [Segment.INSTRUCTION, Segment.TASK_TEMPLATE])
_IS_CONTENT = _IS_RESPONSE | _IS_INSTRUCTION
_WHITESPACE_TABLE = np.zeros(0x3001, dtype=bool)
_WHITESPACE_TABLE[[c for c in range(0x3001) if chr(c).isspace()]] = True


def _is_space(codepoints: np.ndarray) -> np.ndarray:
    """str.isspace for an array of code points."""
    return _WHITESPACE_TABLE[np.minimum(codepoints, 0x3000)] & (codepoints <= 0x3000)


@dataclass(frozen=True)
class EncodeSpec:
    template: str
    num_image_tokens: int  # copies of the image token id per <image> (0: per image, given to encode_conversations)
    max_length: int
    task_templates: tuple[str, ...] = ()
    image_token: str = "<image>"
    system_prompt: str | None = None
    image_placement: str = "auto"  # front | as_written | auto (see DataConfig.image_placement)

    def __post_init__(self):
        if self.num_image_tokens < 0:
            raise ValueError(f"num_image_tokens must be >= 0 (0: per image), got {self.num_image_tokens}")
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")
        object.__setattr__(self, "task_templates", tuple(self.task_templates))


@dataclass
class EncodedRow:
    input_ids: np.ndarray  # int32
    segments: np.ndarray  # int8 Segment codes, same length
    truncated: bool
    images_kept: int  # images whose tokens survive truncation; feed only the first images_kept images
    image_tokens: tuple[int, ...] = ()  # tokens of each kept image (its IMAGE block), in order


def image_token_id(tokenizer, image_token: str = "<image>") -> int:
    """The id of the image placeholder, which must be one special token of `tokenizer`."""
    ids = tokenizer(image_token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or ids[0] == getattr(tokenizer, "unk_token_id", None):
        raise ValueError(
            f"image token {image_token!r} must be a single (special) token of the tokenizer, got ids {ids}; "
            "add it with tokenizer.add_special_tokens"
        )
    return int(ids[0])


def encode_conversations(
    convs: Sequence, tokenizer, spec: EncodeSpec, *, chunk_rows=256, image_tokens=None, overlap: bool | None = None
) -> list:
    """Render, tokenize and segment a batch; one `EncodedRow` or `ConversationError` per input, in order.

    The procedure (docs/design.md, "Token segments"): render each conversation to
    text with character pieces (chat_templates.render_spans), tokenize the
    texts in one batched call with the fast tokenizer's offsets, and label
    every token from the pieces its span covers, by numpy lookups over the
    whole batch. No round is tokenized apart.

    The rule, i.e. how a token is labeled, first match wins:

    1. A token that holds ANY character of a reply (a RESPONSE piece) is
       RESPONSE: Qwen2's byte-level BPE makes "\n\n" one token when a reply
       starting with "\n" follows "<|im_start|>assistant\n", and that token
       is trained. The EOS/"<|im_end|>" after a reply stays END_OF_TURN.
    2. A token that holds a visible (non-whitespace) character of the human's
       words is INSTRUCTION or TASK_TEMPLATE, by the piece of the first one.
    3. A token of whitespace only that holds a character of the human's words
       is formatting, ROLE: the "\n" of "<image>\n", spaces or a newline
       between sentences, a newline that starts the user's text.
    4. Any other token goes by its first visible character, or its first
       character when it has none (template whitespace, empty spans).

    Tokenizers glue a word's leading space to the word (" The", "▁The"), so
    the space after "ASSISTANT:" sits in the first answer token, which rules
    1 and 2 give to the answer. Templates put whitespace or a special token
    at their boundaries, so only whitespace crosses a piece boundary, and the
    property tests compare segment texts up to whitespace at the boundaries.
    A merge across a boundary between visible characters (".\nWhat" after a
    task-template sentence) goes by the first visible character (tested).
    Only tokens that cover two pieces are looked at past one searchsorted.

    Content never yields a special token (special_tokens.py): a row where a
    special token lands on content (a reply quoting "</s>", a user typing
    "<|im_end|>") is encoded again with that text spelled as text and the
    template's own special tokens kept, or refused as
    ConversationError("special_token_in_content"). Other rows pay nothing.

    Each image placeholder token (a single special token, checked) becomes
    `spec.num_image_tokens` copies of its id with segment IMAGE (or its image's count from `image_tokens`,
    per conversation: workloads/families.py; needed when that is 0). Truncation to
    `spec.max_length` never cuts an image block: the cut moves to the start of
    the block, and `images_kept` says how many images the caller must feed.
    A row with no RESPONSE token left (or none at all) is returned as
    ConversationError("no_trained_tokens"), never as an all-zero-weight row.
    Template and validation failures are returned per row the same way, so
    one bad row does not fail the batch.

    Rows go through in chunks of `chunk_rows`, one tokenizer call each, on a helper thread when `overlap` (None:
    when this process may use more than one core; a Ray task of one CPU passes False, as two threads on one busy
    core cost more CPU than one): the Rust tokenizer releases the GIL, so this thread renders the next chunk and
    segments the last meanwhile (benchmarks/masking.py). Results depend on neither `chunk_rows` nor `overlap`.
    """
    from workloads.chat_templates import RenderContext

    image_id = image_token_id(tokenizer, spec.image_token)
    specials = SpecialTokens(tokenizer)
    context = RenderContext.create(
        spec.template, tokenizer, spec.task_templates, spec.image_token, spec.system_prompt, spec.image_placement
    )
    results: list = [None] * len(convs)
    step = max(1, chunk_rows)
    chunk_starts = range(0, len(convs), step)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if len(chunk_starts) == 1 or not (cores > 1 if overlap is None else overlap):  # nothing to overlap
        for start in chunk_starts:
            chunk = _render_chunk(convs, start, start + step, context, results, image_tokens)
            _finish_chunk(chunk, _tokenize(tokenizer, chunk.texts), spec, image_id, specials, results)
        return results
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="l2t-tokenize") as tokenizer_thread:
        pending = None
        for start in chunk_starts:
            chunk = _render_chunk(convs, start, start + step, context, results, image_tokens)
            tokenized = tokenizer_thread.submit(_tokenize, tokenizer, chunk.texts)
            if pending is not None:
                _finish_chunk(pending[0], pending[1].result(), spec, image_id, specials, results)
            pending = (chunk, tokenized)
        if pending is not None:
            _finish_chunk(pending[0], pending[1].result(), spec, image_id, specials, results)
    return results


@dataclass
class _RenderedChunk:
    texts: list[str]
    piece_starts: list[list[int]]
    piece_segments: list[list[int]]
    positions: list[int]  # index of each rendered row in the caller's batch
    row_ids: list[str]
    image_tokens: list = field(default_factory=list)  # per row: its images' token counts, or None (the spec's)


def _render_chunk(convs: Sequence, start: int, stop: int, context, results: list, image_tokens=None) -> _RenderedChunk:
    from workloads.chat_templates import render_spans

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
        chunk.image_tokens.append(None if image_tokens is None else image_tokens[i])
    return chunk


def _finish_chunk(chunk: _RenderedChunk, tokenized, spec: EncodeSpec, image_id: int, specials, results) -> None:
    for i, row in zip(chunk.positions, _segment(chunk, *tokenized, spec, image_id, specials)):
        results[i] = row


def segment_tokens(rendered, tokenizer, spec: EncodeSpec, row_id: str = "?") -> EncodedRow:
    """One already rendered row (chat_templates.Rendered); raises ConversationError if it is unusable."""
    starts = [p.start for p in rendered.pieces]
    segments = [int(p.segment) for p in rendered.pieces]
    chunk = _RenderedChunk([rendered.text], [starts], [segments], [0], [row_id])
    image_id = image_token_id(tokenizer, spec.image_token)
    (row,) = _segment(chunk, *_tokenize(tokenizer, chunk.texts), spec, image_id, SpecialTokens(tokenizer))
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
    chunk: _RenderedChunk,
    ids_lists,
    offset_lists,
    spec: EncodeSpec,
    image_id: int,
    specials: SpecialTokens,
    respelled: bool = False,
) -> list:
    """Segments for tokenized rows: the vectorized lookup, image expansion and truncation.

    Rows where a special token lands on content are encoded again with the
    special-token text of their content spelled as text (`respelled` marks
    that second pass: a row where one still does is refused)."""
    n_rows, row_ids = len(chunk.texts), chunk.row_ids
    if n_rows == 0:
        return []
    batch = _Batch.of(chunk.texts, chunk.piece_starts, chunk.piece_segments, ids_lists, offset_lists)
    ids, token_counts = batch.ids, batch.token_counts
    segments = _token_segments(batch)

    is_image = ids == image_id
    images_per_row = batch.per_row(is_image)
    misplaced_images = batch.per_row(is_image != (segments == _IMAGE)).tolist()
    responses_per_row = batch.per_row(segments == _RESPONSE).tolist()
    on_content = content_specials(batch, specials, image_id)

    blocks, block_errors = _image_blocks(chunk, images_per_row.tolist(), spec.num_image_tokens)
    ids, segments, row_bounds = _expand_images(ids, segments, is_image, token_counts, images_per_row, blocks)
    images_per_row = images_per_row.tolist()

    results: list = []
    max_length = spec.max_length
    for r in range(n_rows):
        a, z = row_bounds[r], row_bounds[r + 1]
        if block_errors[r] is not None:
            on_content.pop(r, None)
            results.append(block_errors[r])
        elif misplaced_images[r]:
            on_content.pop(r, None)
            results.append(
                ConversationError(
                    "image_placeholder_mismatch",
                    f"row {row_ids[r]!r}: the image token appears outside an image placeholder "
                    "(e.g. in a system prompt)",
                )
            )
        elif z - a <= max_length:
            if responses_per_row[r]:
                results.append(EncodedRow(ids[a:z], segments[a:z], False, images_per_row[r], tuple(blocks[r])))
            else:
                results.append(ConversationError("no_trained_tokens", f"row {row_ids[r]!r}: no response token"))
        else:
            results.append(_truncated(ids[a:z], segments[a:z], image_id, blocks[r], max_length, row_ids[r]))
    if on_content:  # rare: these rows are encoded again, on their own
        again = _RenderedChunk([], [], [], [], [])
        tokenized: tuple[list, list] = ([], [])
        for r, (tokens, spans_template) in on_content.items():
            text, r_ids, r_offsets = chunk.texts[r], ids_lists[r], offset_lists[r]
            encoded = respell(text, r_ids, r_offsets, tokens, spans_template or respelled, specials, row_ids[r])
            if isinstance(encoded, ConversationError):
                results[r] = encoded
                continue
            again.texts.append(text)
            again.piece_starts.append(chunk.piece_starts[r])
            again.piece_segments.append(chunk.piece_segments[r])
            again.positions.append(r)
            again.row_ids.append(row_ids[r])
            again.image_tokens.append(chunk.image_tokens[r] if chunk.image_tokens else None)
            tokenized[0].append(encoded[0])
            tokenized[1].append(encoded[1])
        for r, row in zip(again.positions, _segment(again, *tokenized, spec, image_id, specials, respelled=True)):
            results[r] = row
    return results


@dataclass
class _Batch:
    """Tokenized rows concatenated: token spans and pieces in offsets into the joined texts."""

    ids: np.ndarray  # int32, all tokens of all rows
    starts: np.ndarray  # int64 global character span of each token (empty spans at a row's end moved inside it)
    ends: np.ndarray
    token_counts: np.ndarray
    row_token_starts: np.ndarray  # row r's tokens are [row_token_starts[r], row_token_starts[r + 1])
    piece_starts: np.ndarray  # global
    piece_ends: np.ndarray
    piece_segments: np.ndarray  # int8
    before: dict  # kind -> how many non-empty pieces of that kind precede each piece (length n_pieces + 1)
    texts: list

    @classmethod
    def of(cls, texts, piece_starts, piece_segments, ids_lists, offset_lists) -> _Batch:
        n_rows = len(texts)
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
        row_token_starts = np.zeros(n_rows + 1, dtype=np.int64)
        np.cumsum(token_counts, out=row_token_starts[1:])
        # An empty span at the very end of a row would otherwise point into the next row.
        empty = np.flatnonzero(starts >= ends)
        if empty.size:
            row_ends = (text_base + text_lengths)[np.searchsorted(row_token_starts, empty, side="right") - 1]
            starts[empty] = ends[empty] = np.minimum(starts[empty], row_ends - 1)

        pieces_per_row = np.fromiter(map(len, piece_starts), dtype=np.int64, count=n_rows)
        global_starts = np.fromiter(chain.from_iterable(piece_starts), dtype=np.int64) + np.repeat(
            text_base, pieces_per_row
        )
        global_ends = np.append(global_starts[1:], int(text_lengths.sum()))
        segments = np.fromiter(chain.from_iterable(piece_segments), dtype=np.int8, count=len(global_starts))
        nonempty = global_ends > global_starts
        before = {}
        for kind, table in (("response", _IS_RESPONSE), ("instruction", _IS_INSTRUCTION), ("content", _IS_CONTENT)):
            before[kind] = np.concatenate([[0], np.cumsum(table[segments] & nonempty)])
        before["any"] = np.concatenate([[0], np.cumsum(nonempty)])
        return cls(
            ids, starts, ends, token_counts, row_token_starts, global_starts, global_ends, segments, before, texts
        )

    def per_row(self, flags: np.ndarray) -> np.ndarray:
        """How many flagged tokens each row has."""
        cumulative = np.zeros(len(flags) + 1, dtype=np.int64)
        np.cumsum(flags, out=cumulative[1:])
        return np.diff(cumulative[self.row_token_starts])

    def piece_of(self, positions: np.ndarray) -> np.ndarray:
        """The piece holding each global character position (the last one starting at or before it)."""
        return np.searchsorted(self.piece_starts, positions, side="right") - 1

    def holds(self, kind: str, first: np.ndarray, last: np.ndarray) -> np.ndarray:
        """Whether pieces first..last (inclusive) include a non-empty piece of `kind`."""
        before = self.before[kind]
        return before[last + 1] > before[first]

    @functools.cached_property
    def joined(self) -> str:
        return "".join(self.texts)

    @functools.cached_property
    def codepoints(self) -> np.ndarray:
        return np.frombuffer(self.joined.encode("utf-32-le"), dtype=np.uint32)


def _token_segments(batch: _Batch) -> np.ndarray:
    """Each token's segment, by the rule of `encode_conversations`, for the whole batch at once."""
    starts, ends = batch.starts, batch.ends
    first = batch.piece_of(starts)
    segments = batch.piece_segments[first]
    straddling = ends > batch.piece_ends[first]
    # A token within one piece has that piece's segment, but whitespace on the instruction side is ROLE.
    instruction_side = np.flatnonzero(_IS_INSTRUCTION[segments] & ~straddling)
    keys = _first_visible(batch.codepoints, starts[instruction_side], ends[instruction_side])
    blank = (keys >= ends[instruction_side]) & (starts[instruction_side] < ends[instruction_side])
    segments[instruction_side[blank]] = _ROLE
    straddlers = np.flatnonzero(straddling)
    if straddlers.size:
        segments[straddlers] = _straddler_segments(batch, straddlers, first[straddlers])
    return segments


def _straddler_segments(batch: _Batch, tokens: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Segments of tokens whose span covers more than one piece."""
    starts, ends = batch.starts[tokens], batch.ends[tokens]
    last = batch.piece_of(ends - 1)
    keys = _first_visible(batch.codepoints, starts, ends)
    visible = keys < ends
    key_piece = np.where(visible, batch.piece_of(np.minimum(keys, ends - 1)), first)
    segments = batch.piece_segments[key_piece]
    blank_formatting = ~visible & batch.holds("instruction", first, last)
    segments[blank_formatting] = _ROLE
    # Rare: the first visible character is the template's, a later one the human's.
    later = np.flatnonzero(visible & ~_IS_INSTRUCTION[segments] & batch.holds("instruction", key_piece + 1, last))
    for i in later.tolist():
        positions = np.arange(keys[i], ends[i])
        pieces = batch.piece_of(positions)
        human = _IS_INSTRUCTION[batch.piece_segments[pieces]] & ~_is_space(batch.codepoints[positions])
        if human.any():
            segments[i] = batch.piece_segments[pieces[np.argmax(human)]]
    segments[batch.holds("response", first, last)] = _RESPONSE
    return segments


def _first_visible(codepoints: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Global position of each span's first non-whitespace character; its end when it has none."""
    keys = starts.copy()
    moving = np.flatnonzero(keys < ends)
    moving = moving[_is_space(codepoints[keys[moving]])]
    while moving.size:  # one step per leading whitespace character; tokens rarely carry more than one
        keys[moving] += 1
        moving = moving[keys[moving] < ends[moving]]
        moving = moving[_is_space(codepoints[keys[moving]])]
    return keys


def _image_blocks(chunk: _RenderedChunk, images_per_row: list[int], block: int) -> tuple[list[list[int]], list]:
    """Each row's image-token count per placeholder (the caller's, else `block` each), and per row the
    ConversationError when they can't be known (else None); a failed row gets blocks of 1."""
    blocks, errors = [], []
    for r, images in enumerate(images_per_row):
        given, row, error = chunk.image_tokens[r] if chunk.image_tokens else None, chunk.row_ids[r], None
        if given is None and images and block < 1:
            error = ConversationError("image_tokens_unknown", f"row {row!r}: no image-token count per image given")
        elif given is not None and (len(given) != images or min(given, default=1) < 1):
            message = f"row {row!r}: {images} image placeholder(s) but image-token counts {list(given)[:8]}"
            error = ConversationError("image_placeholder_mismatch", message)
        errors.append(error)
        blocks.append([1] * images if error else [block] * images if given is None else [int(n) for n in given])
    return blocks, errors


def _expand_images(
    ids: np.ndarray,
    segments: np.ndarray,
    is_image: np.ndarray,
    token_counts: np.ndarray,
    images_per_row: np.ndarray,
    blocks: list[list[int]],
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Expand each image placeholder token into its block of image tokens (`blocks`: per row, per image).

    Returns the expanded ids and segments of the whole batch and the row bounds in them
    (row r is [bounds[r], bounds[r + 1]))."""
    image_tokens = np.fromiter((n for row in blocks for n in row), dtype=np.int64, count=int(images_per_row.sum()))
    if image_tokens.size and (image_tokens > 1).any():
        repeats = np.ones(len(ids), dtype=np.int64)
        repeats[np.flatnonzero(is_image)] = image_tokens
        ids = np.repeat(ids, repeats)
        segments = np.repeat(segments, repeats)
    row_bounds = np.zeros(len(token_counts) + 1, dtype=np.int64)
    extra = np.fromiter((sum(row) - len(row) for row in blocks), dtype=np.int64, count=len(blocks))
    np.cumsum(token_counts + extra, out=row_bounds[1:])
    return ids, segments, row_bounds.tolist()


def _truncated(ids: np.ndarray, segments: np.ndarray, image_id: int, blocks, max_length: int, row_id: str):
    cut, images_kept = _truncation_point(ids, image_id, blocks, max_length)
    if not (segments[:cut] == _RESPONSE).any():
        return ConversationError(
            "no_trained_tokens",
            f"row {row_id!r}: no response token within max_length={max_length} "
            f"({len(ids)} tokens with images expanded)",
        )
    return EncodedRow(ids[:cut], segments[:cut], True, images_kept, tuple(blocks[:images_kept]))


def _truncation_point(ids: np.ndarray, image_id: int, blocks, max_length: int) -> tuple[int, int]:
    """Where to cut an expanded row to at most `max_length` tokens without splitting an image block.

    `blocks`: the tokens of each image block in order (or one count for all). Returns (cut, number of
    image blocks before the cut). Image blocks are recognized from their positions (adjacent blocks are
    not merged).
    """
    image_positions = np.flatnonzero(ids == image_id)
    if len(image_positions):
        sizes = np.asarray(blocks, dtype=np.int64).reshape(-1)
        if sizes.size == 1:
            sizes = np.full(len(image_positions) // int(sizes[0]), int(sizes[0]))
        block_starts = image_positions[np.concatenate([[0], np.cumsum(sizes)[:-1]])]
        block_ends = block_starts + sizes
        inside = (block_starts < max_length) & (block_ends > max_length)
        cut = int(block_starts[inside][0]) if inside.any() else max_length
        return cut, int((block_ends <= cut).sum())
    return max_length, 0
