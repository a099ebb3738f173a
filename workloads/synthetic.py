"""The synthetic visual instruction sets in LLaVA JSON format: two worlds, one entry point.

No data set can be downloaded here, yet the L2T comparison (docs/design.md) only
means something when the instructions can be predicted from the image: L2T
trains the model to predict what is asked, which needs a data set whose
questions are about what is in the picture. Every question of both worlds is
answerable from the image alone: a model that ignores the image is at chance.

- ``world="shapes"`` (the default, this module): one to a few colored shapes with
  distinct shapes and colors, and one-round caption, color, shape, count and
  POPE-style existence questions (plus multi-turn mixes of them). Answers are one
  or two tokens; the tiny model's unit tests and the fast test fixtures use it.
- ``world="scenes"`` (`workloads.synthetic_scenes`, whose docstring gives the
  figures it targets): multi-object scenes, questions about attributes, counts and
  relations with a long tail of phrasings, and LLaVA-665K's mix of short answers
  and long descriptive, reasoning and conversation answers. The quickstart and the
  λ grid use it.

Everything about row ``index`` is a pure function of ``(seed, index)``, so rows
can be generated in any order, in parallel, and millions of rows of text can
be produced without rendering a single image; PNGs are rendered lazily by
``write_images`` (or ``render_scene(make_scene(seed, index))``) when needed.

In the shapes world, question phrasings come with unequal weights, and the LLaVA
task-template sentence "Answer the question using a single word or phrase." is
appended to most short-answer questions, so that task-template statistics over the
data set see a frequency distribution with that sentence on top.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from workloads import synthetic_scenes as scenes
from workloads.synthetic_common import (  # noqa: F401 - re-exported
    BACKGROUND_RGB,
    COLOR_RGB,
    COLORS,
    EVAL_START,
    SHAPES,
    SHORT_ANSWER_SENTENCE,
    SIZES,
    YES_NO_SENTENCE,
    Scene,
    SceneObject,
    check_kinds,
    image_path,
    index_from_id,
    layout_grid,
    pick,
    pick_weighted,
    place_object,
    record_id,
    render_scene,
    rng_for,
    sample,
    size_geometry,
)

WORLDS: tuple[str, ...] = ("shapes", "scenes")
ALL_KINDS: tuple[str, ...] = ("caption", "color", "shape", "count", "exists", "multi_turn")
SINGLE_ROUND_KINDS: tuple[str, ...] = ("caption", "color", "shape", "count", "exists")

# Phrasings with relative weights (the first is the canonical one used for eval).
CAPTION_PROMPTS: tuple[tuple[str, int], ...] = (
    ("Describe the image.", 4),
    ("Describe the image briefly.", 2),
    ("What is in this picture?", 2),
    ("Write a one-sentence caption for this image.", 1),
    ("Give a short description of the image.", 1),
)
COLOR_QUESTIONS: tuple[tuple[str, int], ...] = (
    ("What color is the {shape}?", 5),
    ("What is the color of the {shape}?", 3),
    ("Which color does the {shape} have?", 1),
)
SHAPE_QUESTIONS: tuple[tuple[str, int], ...] = (
    ("What shape is the {color} object?", 5),
    ("Which shape is {color}?", 3),
    ("What is the {color} shape?", 1),
)
COUNT_QUESTIONS: tuple[tuple[str, int], ...] = (
    ("How many shapes are there?", 5),
    ("How many objects are in the image?", 3),
    ("Count the shapes in the picture.", 1),
)
EXISTS_QUESTIONS: tuple[tuple[str, int], ...] = (
    ("Is there a {color} {shape} in the image?", 5),
    ("Does the image contain a {color} {shape}?", 3),
    ("Can you see a {color} {shape}?", 1),
)
# Which instruction suffix follows a short-answer question, with weights.
SHORT_ANSWER_SUFFIXES: tuple[tuple[str, int], ...] = ((SHORT_ANSWER_SENTENCE, 7), ("", 3))
EXISTS_SUFFIXES: tuple[tuple[str, int], ...] = ((SHORT_ANSWER_SENTENCE, 5), (YES_NO_SENTENCE, 3), ("", 2))

_POSITION_GRID = 3  # positions are named by thirds of the image, whatever the layout grid
_POSITION_PHRASES = (
    ("at the top left", "at the top", "at the top right"),
    ("on the left", "in the center", "on the right"),
    ("at the bottom left", "at the bottom", "at the bottom right"),
)
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")


@dataclass(frozen=True)
class SyntheticDataset:
    train_file: Path  # LLaVA JSON lines
    eval_file: Path  # eval question rows, JSON lines
    image_root: Path  # image paths in both files are relative to this (images/...)
    seed: int
    max_objects: int
    image_size: int
    train_rows: int
    eval_rows: int
    world: str = "shapes"


# ---------------------------------------------------------------- scenes (shapes world)


def _draw_scene(rng: random.Random, max_objects: int, image_size: int) -> Scene:
    if not 1 <= max_objects <= len(SHAPES):
        raise ValueError(f"max_objects must be in 1..{len(SHAPES)}, got {max_objects}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16, got {image_size}")
    grid = layout_grid(max_objects)
    count = 1 + int(rng.random() * max_objects)
    # Distinct shapes, colors and grid cells: "the circle" and "the red object"
    # always name one object, and objects never overlap.
    shapes, colors, cells = list(SHAPES), list(COLORS), list(range(grid * grid))
    cell = image_size / grid
    geometry = size_geometry(image_size, grid)
    random_ = rng.random
    objects = []
    for _ in range(count):
        shape = shapes.pop(int(random_() * len(shapes)))
        color = colors.pop(int(random_() * len(colors)))
        objects.append(place_object(random_, shape, color, cells, grid, cell, geometry))
    return Scene(tuple(objects), image_size)


def make_scene(
    seed: int, index: int, *, max_objects: int | None = None, image_size: int = 32, world: str = "shapes"
) -> Scene:
    """The scene of row ``index``: in the shapes world 1..max_objects objects with distinct shapes, colors and
    grid cells; in the scenes world `synthetic_scenes.make_scene`. ``max_objects`` None: the world's default."""
    max_objects = _max_objects(world, max_objects)
    if world == "scenes":
        return scenes.make_scene(seed, index, max_objects=max_objects, image_size=image_size)
    return _draw_scene(rng_for(seed, index), max_objects, image_size)


def _max_objects(world: str, max_objects: int | None) -> int:
    """``max_objects``, or the world's default when None (shapes 2, scenes 4); checks the world's name."""
    if world not in WORLDS:
        raise ValueError(f"unknown synthetic world {world!r}; expected one of {WORLDS}")
    if max_objects is not None:
        return max_objects
    return scenes.DEFAULT_MAX_OBJECTS if world == "scenes" else 2


# ---------------------------------------------------------------- text


def _position_phrase(obj: SceneObject, image_size: int) -> str:
    col = min(_POSITION_GRID - 1, obj.x * _POSITION_GRID // image_size)
    row = min(_POSITION_GRID - 1, obj.y * _POSITION_GRID // image_size)
    return _POSITION_PHRASES[row][col]


def _relation(a: SceneObject, b: SceneObject) -> str:
    """Where ``a`` is relative to ``b``, along the axis on which they are further apart."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dy) >= abs(dx):
        return "above" if dy < 0 else "below"
    return "to the left of" if dx < 0 else "to the right of"


def caption(scene: Scene) -> str:
    """The reference caption: what, of which color and size, and where."""
    objects = scene.objects
    if len(objects) == 1:
        obj = objects[0]
        return f"A {obj.size} {obj.color} {obj.shape} {_position_phrase(obj, scene.image_size)}."
    if len(objects) == 2:
        a, b = objects
        return f"A {a.size} {a.color} {a.shape} {_relation(a, b)} a {b.size} {b.color} {b.shape}."
    parts = [f"a {o.size} {o.color} {o.shape} {_position_phrase(o, scene.image_size)}" for o in objects]
    return f"{_NUMBER_WORDS[len(objects)].capitalize()} shapes: {', '.join(parts[:-1])} and {parts[-1]}."


def _with_suffix(question: str, suffix: str) -> str:
    return f"{question}\n{suffix}" if suffix else question


def _question_and_answer(rng: random.Random, scene: Scene, kind: str, canonical: bool = False) -> tuple[str, str]:
    """One (question, answer) pair of ``kind`` about ``scene``.

    ``canonical`` picks the first phrasing and the standard suffix (eval rows).
    """

    def phrasing(weighted: Sequence[tuple[str, int]]) -> str:
        return weighted[0][0] if canonical else pick_weighted(rng, weighted)

    if kind == "caption":
        return phrasing(CAPTION_PROMPTS), caption(scene)
    if kind == "color":
        target = pick(rng, scene.objects)
        question = phrasing(COLOR_QUESTIONS).format(shape=target.shape)
        return _with_suffix(question, phrasing(SHORT_ANSWER_SUFFIXES)), target.color.capitalize()
    if kind == "shape":
        target = pick(rng, scene.objects)
        question = phrasing(SHAPE_QUESTIONS).format(color=target.color)
        return _with_suffix(question, phrasing(SHORT_ANSWER_SUFFIXES)), target.shape.capitalize()
    if kind == "count":
        question = phrasing(COUNT_QUESTIONS)
        return _with_suffix(question, phrasing(SHORT_ANSWER_SUFFIXES)), str(len(scene.objects))
    if kind == "exists":
        # Balanced: half ask about an object that is there, half about a
        # color/shape pair that is not (often a present shape in another color).
        present = {(o.color, o.shape) for o in scene.objects}
        if rng.random() < 0.5:
            target = pick(rng, scene.objects)
            color, shape, answer = target.color, target.shape, "Yes"
        else:
            while True:
                color, shape = pick(rng, COLORS), pick(rng, SHAPES)
                if (color, shape) not in present:
                    break
            answer = "No"
        question = phrasing(EXISTS_QUESTIONS).format(color=color, shape=shape)
        return _with_suffix(question, phrasing(EXISTS_SUFFIXES)), answer
    raise ValueError(f"unknown conversation kind {kind!r}; expected one of {ALL_KINDS}")


def _conversation(rng: random.Random, scene: Scene, kind: str) -> list[dict[str, str]]:
    if kind == "multi_turn":
        rounds = 2 + int(rng.random() * 2)
        round_kinds = sample(rng, SINGLE_ROUND_KINDS, rounds)
    else:
        round_kinds = [kind]
    turns = []
    for round_index, round_kind in enumerate(round_kinds):
        question, answer = _question_and_answer(rng, scene, round_kind)
        if round_index == 0:
            question = "<image>\n" + question
        turns.append({"from": "human", "value": question})
        turns.append({"from": "gpt", "value": answer})
    return turns


def generate_records(
    n: int,
    *,
    seed: int,
    start: int = 0,
    max_objects: int | None = None,
    image_size: int = 32,
    kinds: Sequence[str] | None = None,
    world: str = "shapes",
    mix: Mapping[str, float] | None = None,
    long_answer_share: float | None = None,
) -> Iterator[dict]:
    """LLaVA records for rows ``start .. start+n-1``; renders nothing.

    ``kinds``: the conversation kinds to generate (shapes: ALL_KINDS by default; scenes: a subset of
    `synthetic_scenes.SCENE_KINDS`); ``mix`` and ``long_answer_share`` weigh the scenes world's kinds."""
    max_objects = _max_objects(world, max_objects)
    if world == "scenes":
        yield from scenes.generate_scene_records(
            n,
            seed=seed,
            start=start,
            max_objects=max_objects,
            image_size=image_size,
            mix=mix,
            long_answer_share=long_answer_share,
            kinds=kinds,
        )
        return
    if mix is not None or long_answer_share is not None:
        raise ValueError("mix and long_answer_share are settings of the scenes world (world='scenes')")
    kinds = check_kinds(ALL_KINDS if kinds is None else kinds, ALL_KINDS)
    for index in range(start, start + n):
        rng = rng_for(seed, index)
        scene = _draw_scene(rng, max_objects, image_size)  # same draws as make_scene(seed, index)
        kind = pick(rng, kinds)
        yield {"id": record_id(index), "image": image_path(index), "conversations": _conversation(rng, scene, kind)}


def generate_eval_questions(
    n: int,
    *,
    seed: int,
    start: int = EVAL_START,
    max_objects: int | None = None,
    image_size: int = 32,
    kinds: Sequence[str] | None = None,
    world: str = "shapes",
) -> Iterator[dict]:
    """LLaVA-style eval question rows, canonical phrasing, one question per row.

    ``text`` has no image placeholder (eval code adds it, as LLaVA's does);
    ``objects`` names what is in the image, for hallucination checks. Kinds:
    SINGLE_ROUND_KINDS (shapes) or `synthetic_scenes.EVAL_KINDS` (scenes), all by default.
    """
    max_objects = _max_objects(world, max_objects)
    if world == "scenes":
        yield from scenes.generate_scene_eval_questions(
            n, seed=seed, start=start, max_objects=max_objects, image_size=image_size, kinds=kinds
        )
        return
    kinds = check_kinds(SINGLE_ROUND_KINDS if kinds is None else kinds, SINGLE_ROUND_KINDS)
    for index in range(start, start + n):
        rng = rng_for(seed, index)
        scene = _draw_scene(rng, max_objects, image_size)
        kind = pick(rng, kinds)
        question, answer = _question_and_answer(rng, scene, kind, canonical=True)
        yield {
            "question_id": record_id(index),
            "image": image_path(index),
            "text": question,
            "answer": answer,
            "kind": kind,
            "objects": [obj.name for obj in scene.objects],
        }


# ---------------------------------------------------------------- files


def write_images(
    records: Iterable[dict],
    image_root: Path,
    *,
    seed: int,
    max_objects: int | None = None,
    image_size: int = 32,
    world: str = "shapes",
) -> int:
    """Render the PNGs that ``records`` (train records or eval rows) refer to; returns how many were written.

    Existing files are kept, so an interrupted or repeated call only fills gaps.
    """
    max_objects = _max_objects(world, max_objects)
    image_root = Path(image_root)
    written = 0
    made_dirs: set[Path] = set()
    for record in records:
        path = image_root / record["image"]
        if path.exists():
            continue
        if path.parent not in made_dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            made_dirs.add(path.parent)
        index = index_from_id(record.get("id") or record["question_id"])
        scene = make_scene(seed, index, max_objects=max_objects, image_size=image_size, world=world)
        temporary = path.with_name(path.name + ".tmp")
        render_scene(scene).save(temporary, format="PNG")
        temporary.replace(path)  # atomic: parallel writers never leave half a PNG
        written += 1
    return written


def _write_jsonl(path: Path, rows: Iterable[dict]) -> list[dict]:
    kept = []
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            kept.append(row)
    return kept


def write_synthetic_dataset(
    out_dir: Path,
    *,
    train_rows: int,
    eval_rows: int,
    seed: int,
    max_objects: int | None = None,
    image_size: int = 32,
    kinds: Sequence[str] | None = None,
    world: str = "shapes",
    mix: Mapping[str, float] | None = None,
    long_answer_share: float | None = None,
) -> SyntheticDataset:
    """Write train.jsonl, eval.jsonl and every image they refer to under ``out_dir/images``.

    Train rows are indices 0..train_rows-1, eval rows start at EVAL_START. The shapes world's eval
    questions are of the training kinds; the scenes world's are always its whole EVAL_KINDS suite.
    """
    if train_rows > EVAL_START:
        raise ValueError(f"train_rows must be at most {EVAL_START} to stay disjoint from eval rows")
    max_objects = _max_objects(world, max_objects)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_file, eval_file = out_dir / "train.jsonl", out_dir / "eval.jsonl"
    geometry = dict(seed=seed, max_objects=max_objects, image_size=image_size, world=world)
    records = generate_records(train_rows, kinds=kinds, mix=mix, long_answer_share=long_answer_share, **geometry)
    train = _write_jsonl(train_file, records)
    eval_kinds = None
    if world == "shapes":
        eval_kinds = tuple(k for k in (kinds or ALL_KINDS) if k in SINGLE_ROUND_KINDS) or SINGLE_ROUND_KINDS
    questions = _write_jsonl(
        eval_file, generate_eval_questions(eval_rows, start=EVAL_START, kinds=eval_kinds, **geometry)
    )
    for rows in (train, questions):
        write_images(rows, out_dir, **geometry)
    return SyntheticDataset(
        train_file=train_file,
        eval_file=eval_file,
        image_root=out_dir,
        seed=seed,
        max_objects=max_objects,
        image_size=image_size,
        train_rows=train_rows,
        eval_rows=eval_rows,
        world=world,
    )


def write_from_config(out_dir: Path, synthetic) -> SyntheticDataset:
    """`write_synthetic_dataset` with the settings of a `SyntheticConfig` (``data.synthetic``)."""
    return write_synthetic_dataset(Path(out_dir), **dataset_options(synthetic))


def dataset_options(synthetic) -> dict:
    """The keyword arguments of `write_synthetic_dataset` that a `SyntheticConfig` sets."""
    return {
        "train_rows": synthetic.train_rows,
        "eval_rows": synthetic.eval_rows,
        "seed": synthetic.seed,
        "max_objects": synthetic.max_objects,
        "image_size": synthetic.image_size,
        "kinds": tuple(synthetic.kinds) if synthetic.kinds else None,
        "world": synthetic.world,
        "mix": dict(synthetic.mix) if synthetic.mix else None,
        "long_answer_share": synthetic.long_answer_share,
    }


# ---------------------------------------------------------------- token shares
