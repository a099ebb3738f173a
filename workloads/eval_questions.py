"""Evaluation questions: reading question files into normalized rows, the synthetic suite.

Questions are LLaVA-style evaluation rows (one JSON object per line)::

    {"question_id": ..., "image": "path/relative/to/image_root.jpg",   # or a list of paths
     "text": "What is the man holding?\\nAnswer the question using a single word or phrase.",
     "answer": "frisbee"                        # one reference, or
     "answers": ["frisbee", "disc", ...]        # VQAv2-style lists (strings or {"answer": ...}), or
     "label": "yes"                             # POPE files
     "choices": ["red", "green", "blue"]        # multiple choice (answer: option text or letter)
     "kind": "vqa" | "caption" | "pope" | "exists" | "multiple_choice" | "color" | ...
     "objects": ["red circle"]                  # what is in the image (CHAIR)
     "category": ...}                           # kept in the outputs, e.g. POPE's split

``text`` may also be called ``question`` or ``prompt``; it is used verbatim
(multiple-choice rows must list their options in it, as LLaVA's files do), and
``<image>\\n`` is prepended (once per image) when the row has images and no
placeholder; a row with placeholders must have one per image, in order (as
training rows do). Normalized rows list their images in ``images``.
A row without any reference is still answered (its prediction is written) but
neither scored nor used for VC.

`normalize_question` gives every row the one shape `evaluator.Evaluator` and
`eval_summary` read; `question_conversation` turns a row into the one-round
conversation that is encoded exactly as training data is, `question_prompt`
into its user turn alone, from which the generation prompt is rendered. The synthetic suite
(`synthetic_questions`, `synthetic_chair_vocabularies`) is held out from the
synthetic training world of synthetic.py.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

from workloads.answer_matching import normalize_vqa_answer
from workloads.conversations import IMAGE_PLACEHOLDER, Conversation, Turn

CAPTION_KINDS = frozenset({"caption"})
POPE_KINDS = frozenset({"pope", "exists"})
MULTIPLE_CHOICE = "multiple_choice"
SYNTHETIC_SUITE = "synthetic"
TEXT_KEYS = ("text", "question", "prompt")


class QuestionError(ValueError):
    """An evaluation row that can't be used; the message names the row."""


def _reference_list(row: dict) -> list[str]:
    """Every reference answer of a row, in file order (duplicates kept: they weigh in the soft score).

    `answers` (VQAv2's ten, a caption's references) when present, else `answer` (a string or a
    list) or POPE's `label`; a lone `answer` beside `answers` only picks the VC target."""
    answers = row.get("answers")
    if answers is None or answers == []:
        answers = row.get("answer", row.get("label"))
    if answers is None:
        return []
    if not isinstance(answers, (list, tuple)):
        answers = [answers]
    refs = [str(item["answer"] if isinstance(item, dict) else item) for item in answers]
    return [r for r in refs if r.strip()]


def primary_answer(row: dict, references: Sequence[str]) -> str | None:
    """The answer the model is teacher-forced on for VC: `answer` (or `label`) when it is one string,
    else the most frequent reference after VQA normalization (first seen wins a tie)."""
    answer = row.get("answer", row.get("label"))
    if isinstance(answer, str) and answer.strip():
        return answer
    if not references:
        return None
    counts = Counter(normalize_vqa_answer(r) for r in references)
    best = max(counts.values())
    return next(r for r in references if counts[normalize_vqa_answer(r)] == best)


def normalize_question(row: dict, position: int = 0, default_kind: str | None = None) -> dict:
    """One evaluation row in the shape `Evaluator` reads (see the module docstring for the input)."""
    if not isinstance(row, dict):
        raise QuestionError(f"question {position}: not a JSON object")
    text = next((row[k] for k in TEXT_KEYS if isinstance(row.get(k), str) and row[k].strip()), None)
    if text is None:
        raise QuestionError(f"question {position}: no question text (one of {TEXT_KEYS})")
    images = _image_list(row.get("image", row.get("images")), position)
    placeholders = text.count(IMAGE_PLACEHOLDER)
    if placeholders and placeholders != len(images):
        raise QuestionError(
            f"question {position}: {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) in the text "
            f"for {len(images)} image(s)"
        )
    references = _reference_list(row)
    choices = row.get("choices", row.get("options"))
    if choices is not None:
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices) or len(choices) < 2:
            raise QuestionError(f"question {position}: choices must be a list of at least 2 strings")
    kind = row.get("kind") or default_kind
    if not kind:
        kind = MULTIPLE_CHOICE if choices else ("pope" if "label" in row else "vqa")
    if kind == MULTIPLE_CHOICE and not choices:
        raise QuestionError(f"question {position}: kind {MULTIPLE_CHOICE!r} needs choices")
    objects = row.get("objects")
    return {
        "question_id": str(row.get("question_id", row.get("id", position))),
        "images": images,
        "text": text,
        "answer": primary_answer(row, references),
        "references": references,
        "choices": list(choices) if choices else None,
        "kind": str(kind),
        "objects": [str(o) for o in objects] if objects is not None else None,
        "category": None if row.get("category") is None else str(row["category"]),
    }


def _image_list(value, position: int) -> list[str]:
    """A question's images: one path, a list of paths, or none."""
    if value is None or value == "":
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) and v.strip() for v in values):
        raise QuestionError(f"question {position}: image must be a path or a list of paths, got {value!r}")
    return [str(v) for v in values]


def parse_question_lines(
    lines: Iterable[str], *, limit: int | None = None, default_kind: str | None = None
) -> list[dict]:
    """Normalized questions from JSONL lines (or the text of a JSON list, as one item)."""
    rows: list[dict] = []
    for number, line in enumerate(lines, start=1):
        if limit is not None and len(rows) >= limit:
            break
        line = line.strip()
        if not line:
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise QuestionError(f"line {number}: not JSON ({error})") from None
        for row in value if isinstance(value, list) else [value]:
            if limit is not None and len(rows) >= limit:
                break
            rows.append(normalize_question(row, len(rows), default_kind))
    ids = Counter(r["question_id"] for r in rows)
    duplicated = [q for q, n in ids.items() if n > 1]
    if duplicated:
        raise QuestionError(f"question ids must be unique; repeated: {duplicated[:5]}")
    return rows


def synthetic_questions(
    out_dir: str | Path,
    *,
    rows: int = 200,
    seed: int = 0,
    max_objects: int = 1,
    image_size: int = 32,
    kinds: Sequence[str] | None = None,
    world: str = "shapes",
) -> tuple[list[dict], str]:
    """The synthetic suite: held-out scenes (indices from synthetic.EVAL_START, disjoint from every
    training row) with captioning, short-answer and POPE-style questions; renders their images
    under `out_dir`. Returns (normalized questions, image root).

    `world` "shapes": color, shape, count, existence and caption questions (kinds: a subset of
    synthetic.SINGLE_ROUND_KINDS); "scenes": color, shape, size, count, relation (balanced yes/no),
    POPE-balanced existence and caption questions over multi-object scenes (synthetic_scenes.EVAL_KINDS).
    Use the training set's `world`, `max_objects` and `image_size`: the suite is only held out, not shifted."""
    from workloads.synthetic import generate_eval_questions, write_images

    geometry = dict(seed=seed, max_objects=max_objects, image_size=image_size, world=world)
    raw = list(generate_eval_questions(rows, kinds=tuple(kinds) if kinds else None, **geometry))
    write_images(raw, Path(out_dir), **geometry)
    return [normalize_question(r, i) for i, r in enumerate(raw)], str(out_dir)


def synthetic_chair_vocabularies() -> dict[str, list[str]]:
    """CHAIR vocabularies of the synthetic worlds (both): objects are colored shapes ("red circle"), so a
    caption naming a color-shape pair that is not in the scene hallucinates (``chair_*``); the
    coarse ``chair_*_shape`` counts only shapes that are not there."""
    from workloads.synthetic import COLORS, SHAPES

    return {"": [f"{c} {s}" for c in COLORS for s in SHAPES] + list(SHAPES), "_shape": list(SHAPES)}


def question_conversation(row: dict, answer: str | None = None) -> Conversation:
    """A question row as a one-round conversation answered by `answer` (default: its reference;
    "?" stands in when it has none), the row that teacher-forced scoring encodes."""
    if answer is None:
        answer = row.get("answer")
        if isinstance(answer, list):
            answer = answer[0] if answer else None
    question = question_prompt(row)
    return replace(question, turns=question.turns + (Turn("assistant", answer or "?"),))


def question_prompt(row: dict) -> Conversation:
    """A question row as a conversation of its user turn alone: what the generation prompt is
    rendered from (chat_templates.render_prompt_spans), so that it never depends on an answer."""
    text = row["text"]
    images = tuple(row["images"])
    if images and IMAGE_PLACEHOLDER not in text:
        text = f"{IMAGE_PLACEHOLDER}\n" * len(images) + text
    return Conversation(id=str(row["question_id"]), turns=(Turn("user", text),), images=images)
