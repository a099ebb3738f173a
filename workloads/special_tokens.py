"""Content never yields a special token.

A fast tokenizer matches its special tokens (``</s>``, ``<|im_end|>``,
``<|im_start|>``, ``<image>``) anywhere in the text it is given, so a reply
that quotes ``</s>`` would teach end-of-sequence in the middle of an answer,
and a user who types ``<|im_end|>`` would close their own turn. Rows are
tokenized in one batched call all the same (segments.py); a row in which a
special token lands on content (instruction, task-template or response
characters) is then tokenized again on its own, here, so that the special
tokens of its content are spelled as text while the template's own (BOS/EOS,
role markers, image placeholders: the special tokens of the first
tokenization that lie in SYSTEM, ROLE, IMAGE or END_OF_TURN pieces) stay the
single special ids they were.

How, exactly as the tokenizer would cut the text: a tokenizer splits its
input at the special tokens it finds and tokenizes the stretches between them
independently (a stretch that does not start the text gets no prefix space
from a Metaspace pre-tokenizer with ``prepend_scheme="first"``). The row is
encoded again with a copy of the backend that has ``encode_special_tokens``
on (every special token spelled as text) and one extra, non-special added
token, a sentinel, written in place of each template special: the sentinel
splits the text at the same places, so every stretch tokenizes as before, and
each sentinel token becomes its template special again. Spelling the
template's specials as text instead would let a pre-tokenizer glue them to
their neighbours ("|>\\n" with Qwen2's pattern, "</s>USER:" with Metaspace).
A model whose own vocabulary holds a special's string (a BPE trained with
its specials in the vocabulary merges "<|im_start|>" back together) gets
that text spelled one character at a time. A row where none of this works
is refused: ConversationError("special_token_in_content").
"""

from __future__ import annotations

import numpy as np

from workloads.conversations import ConversationError

SENTINEL = "\U0010fffd"  # a private-use character: marks where a template special token stood


class SpecialTokens:
    """The special token ids of one tokenizer, and a copy of its backend that spells them as text.

    Made once per `encode_conversations` call; the copy is made on first need
    (most batches have no row that needs it) and shares no state with the
    tokenizer's own backend, which the tokenizing helper thread is using.
    """

    def __init__(self, tokenizer):
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        ids = {int(i) for i in getattr(tokenizer, "all_special_ids", ()) if i is not None}
        if self.backend is not None:
            ids |= {int(i) for i, token in self.backend.get_added_tokens_decoder().items() if token.special}
        # One extra False entry at the end: larger ids are clipped onto it.
        self._table = np.zeros(max(ids, default=-1) + 2, dtype=bool)
        self._table[sorted(ids)] = True
        # The unknown token is also what the model itself gives a character it cannot spell (no byte
        # fallback): only the literal "<unk>" text counts as a special token.
        unk_id = getattr(tokenizer, "unk_token_id", None)
        self.unk = (int(unk_id), str(tokenizer.unk_token)) if unk_id is not None and unk_id in ids else None
        if self.unk:
            self._table[self.unk[0]] = False
        self._as_text = None
        self.sentinel_id = -1

    def flags(self, ids: np.ndarray, starts: np.ndarray, ends: np.ndarray, text: str) -> np.ndarray:
        """Whether each token (ids, character spans in `text`) is a special token."""
        flags = self._table.take(ids, mode="clip")
        if self.unk:
            unk_id, unk_text = self.unk
            for i in np.flatnonzero(ids == unk_id).tolist():
                flags[i] = text[starts[i] : ends[i]] == unk_text
        return flags

    def as_text_backend(self):
        """The backend copy: `encode_special_tokens` on, SENTINEL added (None without a Rust backend)."""
        if self._as_text is None and self.backend is not None:
            from tokenizers import AddedToken, Tokenizer

            copy = Tokenizer.from_str(self.backend.to_str())
            copy.encode_special_tokens = True
            copy.no_truncation()
            copy.no_padding()
            copy.add_tokens([AddedToken(SENTINEL, special=False, normalized=False)])
            self.sentinel_id = copy.token_to_id(SENTINEL)
            self._as_text = copy
        return self._as_text


def content_specials(batch, specials: SpecialTokens, image_id: int) -> dict[int, tuple[list[int], bool]]:
    """Rows of `batch` (segments._Batch) with special tokens other than the image's on content characters.

    Returns row -> (the row's indices of those tokens, whether one of them also holds template text)."""
    flags = specials.flags(batch.ids, batch.starts, batch.ends, batch.joined)
    tokens = np.flatnonzero(flags & (batch.ids != image_id))
    if not tokens.size:
        return {}
    starts, ends = batch.starts[tokens], batch.ends[tokens]
    first, last = batch.piece_of(starts), batch.piece_of(np.maximum(ends - 1, starts))
    on_content = batch.holds("content", first, last)
    if not on_content.any():
        return {}
    held = batch.before["any"][last + 1] - batch.before["any"][first]
    content_held = batch.before["content"][last + 1] - batch.before["content"][first]
    spans_template = (held > content_held)[on_content].tolist()
    tokens = tokens[on_content]
    rows = np.searchsorted(batch.row_token_starts, tokens, side="right") - 1
    found: dict[int, tuple[list[int], bool]] = {}
    for r, i, spans in zip(rows.tolist(), (tokens - batch.row_token_starts[rows]).tolist(), spans_template):
        indices, spanning = found.get(r, ([], False))
        found[r] = (indices + [i], spanning or spans)
    return found


def respell(text: str, ids, offsets, on_content: list[int], refuse: bool, specials: SpecialTokens, row_id: str):
    """Token ids and offsets of one row with the special-token text of its content spelled as text.

    `ids` and `offsets` are its first tokenization, `on_content` the indices
    of its special tokens on content; its other special tokens are the
    template's and stay. Returns (ids, offsets), or a ConversationError
    ("special_token_in_content") when that cannot be done or `refuse` is set
    (a special token that also covers template text, or one still found
    after spelling).
    """
    shown = [text[slice(*offsets[i])] for i in on_content]
    if refuse:
        return _refused(row_id, f"special-token text {shown} in the content cannot be spelled as text")
    backend = specials.as_text_backend()
    if backend is None or SENTINEL in text:
        why = "no fast tokenizer to spell it with" if backend is None else "the text holds the sentinel"
        return _refused(row_id, f"special-token text {shown} in the content; {why}")
    skip = set(on_content)
    spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    flags = specials.flags(np.asarray(ids, dtype=np.int64), spans[:, 0], spans[:, 1], text)
    template_specials = [(*offsets[i], ids[i]) for i in np.flatnonzero(flags).tolist() if i not in skip]
    # The text with each template special replaced by the sentinel, and where its stretches start.
    parts, original_starts, marked_starts, position, length = [], [0], [0], 0, 0
    for start, end, _ in template_specials:
        parts += [text[position:start], SENTINEL]
        length += start - position + len(SENTINEL)
        original_starts.append(end)
        marked_starts.append(length)
        position = end
    parts.append(text[position:])
    encoding = backend.encode("".join(parts), add_special_tokens=False)
    new_ids = np.asarray(encoding.ids, dtype=np.int64)
    new_offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
    marks = np.flatnonzero(new_ids == specials.sentinel_id)
    if len(marks) != len(template_specials):
        return _refused(row_id, "the template's special tokens could not be kept apart from its content")
    stretch = np.searchsorted(np.asarray(marked_starts), new_offsets[:, 0], side="right") - 1
    new_offsets += (np.asarray(original_starts) - np.asarray(marked_starts))[stretch][:, None]
    if len(marks):
        spans = np.asarray(template_specials, dtype=np.int64)
        new_ids[marks] = spans[:, 2]
        new_offsets[marks] = spans[:, :2]
    ids_out, offsets_out = new_ids.tolist(), [tuple(o) for o in new_offsets.tolist()]
    stray = np.flatnonzero(specials.flags(new_ids, new_offsets[:, 0], new_offsets[:, 1], text)).tolist()
    for i in reversed(sorted(set(stray) - set(marks.tolist()))):
        spelled = _spelled_out(text, *offsets_out[i], backend, specials)
        if spelled is None:
            return _refused(row_id, f"special-token text {shown} in the content cannot be spelled as text")
        ids_out[i : i + 1], offsets_out[i : i + 1] = spelled
    return ids_out, offsets_out


def _spelled_out(text: str, start: int, end: int, backend, specials: SpecialTokens):
    """Tokens for text[start:end] one character at a time, for a model whose vocabulary itself turns the
    whole string into a special token (a BPE trained with its specials in the vocabulary can merge
    "<|im_start|>" back together). Each character is its own stretch, after a sentinel, as above."""
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    for k in range(start, end):
        encoding = backend.encode(SENTINEL + text[k], add_special_tokens=False)
        char_ids = [i for i in encoding.ids if i != specials.sentinel_id]
        spans = np.full(len(char_ids), k)
        if specials.flags(np.asarray(char_ids, dtype=np.int64), spans, spans + 1, text).any():
            return None
        ids += char_ids
        offsets += [(k, k + 1)] * len(char_ids)
    return ids, offsets


def _refused(row_id: str, why: str) -> ConversationError:
    return ConversationError("special_token_in_content", f"row {row_id!r}: {why}")
