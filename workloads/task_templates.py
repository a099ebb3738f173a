"""Task templates: the instruction sentences that recur across the training set.

L2T drops "task templates" from the instruction loss: sentences such as
"Answer the question using a single word or phrase." that carry no
information about the image and would otherwise dominate the instruction
loss. They are found statistically: split every user turn into sentences,
count in how many user turns each sentence occurs, keep the most frequent.

The functions here are pure so that a Ray Data aggregation can call
`instruction_sentences` per row, merge the counters and call
`select_task_templates` once. `render` (chat_templates.py) marks matches with
`sentence_spans`, so splitting and normalization are defined in one place.

Splitting rules: a sentence ends after a run of ``. ? !`` that is followed by
whitespace or the end of the text, at a newline, and at an ``<image>``
placeholder (the placeholder itself belongs to no sentence). Whitespace is
normalized (stripped, inner runs collapsed to one space); case is kept.
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from workloads.conversations import IMAGE_PLACEHOLDER, USER, Conversation

FORMAT_VERSION = 1

# Boundaries: the placeholder, a newline, or the empty position after
# sentence punctuation that is followed by whitespace.
_BOUNDARY = re.compile(re.escape(IMAGE_PLACEHOLDER) + r"|\n|(?<=[.?!])(?=\s)")


def normalize_sentence(text: str) -> str:
    return " ".join(text.split())


def sentence_spans(text: str) -> list[tuple[int, int, str]]:
    """`(start, end, normalized)` for each sentence of `text`; `text[start:end]` has no outer whitespace."""
    spans: list[tuple[int, int, str]] = []
    position = 0
    for match in _BOUNDARY.finditer(text):
        _append_span(text, position, match.start(), spans)
        position = match.end()
    _append_span(text, position, len(text), spans)
    return spans


def _append_span(text: str, start: int, end: int, spans: list) -> None:
    chunk = text[start:end]
    stripped = chunk.strip()
    if stripped:
        start += len(chunk) - len(chunk.lstrip())
        spans.append((start, start + len(stripped), normalize_sentence(stripped)))


def split_sentences(text: str) -> list[str]:
    """Normalized sentences of `text`, in order (duplicates kept)."""
    return [normalized for _, _, normalized in sentence_spans(text)]


def instruction_sentences(conv: Conversation) -> list[str]:
    """Sentences of every user turn; a sentence repeated within one turn counts once."""
    sentences: list[str] = []
    for turn in conv.turns:
        if turn.role == USER:
            sentences.extend(dict.fromkeys(split_sentences(turn.text)))
    return sentences


def count_sentences(convs: Iterable[Conversation]) -> tuple[collections.Counter, int]:
    """(sentence -> number of user turns containing it, number of user turns)."""
    counts: collections.Counter = collections.Counter()
    user_turns = 0
    for conv in convs:
        counts.update(instruction_sentences(conv))
        user_turns += sum(1 for turn in conv.turns if turn.role == USER)
    return counts, user_turns


@dataclass(frozen=True)
class TemplateEntry:
    sentence: str
    count: int
    share: float  # count / number of user turns


@dataclass
class TaskTemplateList:
    entries: list[TemplateEntry]
    version: str = ""  # stable content hash; computed when left empty
    total_instructions: int = 0
    _sentences: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self):
        if not self.version:
            self.version = content_version(self.entries, self.total_instructions)
        self._sentences = tuple(entry.sentence for entry in self.entries)

    def sentences(self) -> tuple[str, ...]:
        return self._sentences

    @classmethod
    def from_sentences(cls, sentences: Iterable[str]) -> TaskTemplateList:
        """A hand-written list (no statistics): counts and shares are zero."""
        unique = dict.fromkeys(normalize_sentence(s) for s in sentences)
        entries = [TemplateEntry(s, 0, 0.0) for s in unique if s]
        return cls(entries=entries)

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "version": self.version,
            "total_instructions": self.total_instructions,
            "entries": [{"sentence": e.sentence, "count": e.count, "share": e.share} for e in self.entries],
        }

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def from_dict(cls, data: dict) -> TaskTemplateList:
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unsupported task-template format_version {data.get('format_version')!r}")
        entries = [TemplateEntry(e["sentence"], int(e["count"]), float(e["share"])) for e in data["entries"]]
        total = int(data.get("total_instructions", 0))
        expected = content_version(entries, total)
        version = data.get("version") or expected
        if version != expected:
            raise ValueError(
                f"task-template list version {version!r} does not match its content ({expected!r}); "
                "if it was edited by hand, delete the 'version' key to accept the edit"
            )
        return cls(entries=entries, version=version, total_instructions=total)

    @classmethod
    def load(cls, path) -> TaskTemplateList:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def content_version(entries: Iterable[TemplateEntry], total_instructions: int) -> str:
    """A hash of the sentences, counts and total: equal content, equal version, on any machine."""
    canonical = json.dumps(
        {"total": total_instructions, "entries": [[e.sentence, e.count] for e in entries]},
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def select_task_templates(
    counts: Mapping[str, int],
    total_instructions: int,
    *,
    top_k: int | None = None,
    min_share: float | None = None,
) -> TaskTemplateList:
    """The most frequent sentences: those with share >= `min_share`, then at most `top_k` of them.

    Ordered by count (descending), ties by sentence text, so the result does
    not depend on the order in which counts were merged. With neither limit
    every sentence is kept.
    """
    if total_instructions <= 0:
        return TaskTemplateList(entries=[], total_instructions=max(total_instructions, 0))
    ranked = sorted(((s, int(c)) for s, c in counts.items() if c > 0), key=lambda sc: (-sc[1], sc[0]))
    entries = [TemplateEntry(s, c, c / total_instructions) for s, c in ranked]
    if min_share is not None:
        entries = [e for e in entries if e.share >= min_share]
    if top_k is not None:
        entries = entries[:top_k]
    return TaskTemplateList(entries=entries, total_instructions=total_instructions)
