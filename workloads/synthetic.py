"""A visually grounded synthetic instruction set in LLaVA JSON format.

No data set can be downloaded here, yet the L2T comparison (docs/design.md) only
means something when the instructions can be predicted from the image: L2T
trains the model to predict what is asked, which needs a data set whose
questions are about what is in the picture. So each row is a small scene of
colored shapes on a light background and every question (caption, color,
shape, count, POPE-style existence, multi-turn mixes) is answerable from the
image alone: a model that ignores the image is at chance.

Everything about row ``index`` is a pure function of ``(seed, index)``, so rows
can be generated in any order, in parallel, and millions of rows of text can
be produced without rendering a single image; PNGs are rendered lazily by
``write_images`` (or ``render_scene(make_scene(seed, index))``) when needed.

Question phrasings come with unequal weights, and the LLaVA task-template
sentence "Answer the question using a single word or phrase." is appended to
most short-answer questions, so that task-template statistics over the data
set see a realistic frequency distribution with that sentence on top.
"""

from __future__ import annotations

import functools
import json
import math
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
# Saturated, far-apart colors; shapes are drawn without antialiasing, so every
# object pixel has exactly its color, even at 32 px.
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "green": (20, 160, 40),
    "blue": (20, 60, 220),
    "yellow": (240, 200, 0),
    "purple": (140, 30, 170),
    "orange": (245, 120, 0),
}
COLORS: tuple[str, ...] = tuple(COLOR_RGB)
SIZES: tuple[str, ...] = ("small", "large")
BACKGROUND_RGB: tuple[int, int, int] = (238, 238, 232)

ALL_KINDS: tuple[str, ...] = ("caption", "color", "shape", "count", "exists", "multi_turn")
SINGLE_ROUND_KINDS: tuple[str, ...] = ("caption", "color", "shape", "count", "exists")

SHORT_ANSWER_SENTENCE = "Answer the question using a single word or phrase."
YES_NO_SENTENCE = "Please answer yes or no."
# Eval indices start here, far from any train index, so the sets are disjoint.
EVAL_START = 10**9

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

# Objects sit in distinct cells of a g x g grid, g the smallest that holds
# max_objects, and are as large as their cell allows: a tiny LLaVA learns the
# color of a shape covering ~15% of a 32 px image within ~100 steps, but stayed
# at chance for 300 steps at ~8% (measured here).
_RADIUS_PER_CELL = {"small": 0.3, "large": 0.44}
_POSITION_GRID = 3  # positions are named by thirds of the image, whatever the layout grid
_POSITION_PHRASES = (
    ("at the top left", "at the top", "at the top right"),
    ("on the left", "in the center", "on the right"),
    ("at the bottom left", "at the bottom", "at the bottom right"),
)
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")


@dataclass(frozen=True, slots=True)
class SceneObject:
    shape: str
    color: str
    size: str
    x: int  # center, pixels
    y: int
    radius: int | None = None  # half the drawn extent, pixels; None: the 3x3-layout radius for `size`

    @property
    def name(self) -> str:
        """The object's name as questions and hallucination checks use it: "red circle"."""
        return f"{self.color} {self.shape}"


@dataclass(frozen=True, slots=True)
class Scene:
    objects: tuple[SceneObject, ...]
    image_size: int


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


# ---------------------------------------------------------------- scenes


def _rng(seed: int, index: int) -> random.Random:
    """The one random stream of row ``index``: injective in (seed, index) for index < 2**64."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed} index={index}")
    return random.Random((seed << 64) | index)


def _pick(rng: random.Random, items: Sequence):
    return items[int(rng.random() * len(items))]


def _pick_weighted(rng: random.Random, weighted: Sequence[tuple[str, int]]) -> str:
    point = rng.random() * _total_weight(weighted)
    for item, weight in weighted:
        point -= weight
        if point < 0:
            return item
    return weighted[-1][0]


_TOTAL_WEIGHTS: dict[int, int] = {}


def _total_weight(weighted: Sequence[tuple[str, int]]) -> int:
    total = _TOTAL_WEIGHTS.get(id(weighted))
    if total is None:
        total = _TOTAL_WEIGHTS[id(weighted)] = sum(weight for _, weight in weighted)
    return total


def _sample(rng: random.Random, items: Sequence, k: int) -> list:
    """``k`` distinct items; like ``rng.sample`` but several times faster for tiny pools."""
    pool = list(items)
    return [pool.pop(int(rng.random() * len(pool))) for _ in range(k)]


def _layout_grid(max_objects: int) -> int:
    """Side of the layout grid: the smallest square grid with a cell for every object."""
    return math.ceil(math.sqrt(max_objects))


def _draw_scene(rng: random.Random, max_objects: int, image_size: int) -> Scene:
    if not 1 <= max_objects <= len(SHAPES):
        raise ValueError(f"max_objects must be in 1..{len(SHAPES)}, got {max_objects}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16, got {image_size}")
    grid = _layout_grid(max_objects)
    count = 1 + int(rng.random() * max_objects)
    # Distinct shapes, colors and grid cells: "the circle" and "the red object"
    # always name one object, and objects never overlap.
    shapes, colors, cells = list(SHAPES), list(COLORS), list(range(grid * grid))
    cell = image_size / grid
    geometry = _size_geometry(image_size, grid)
    random_ = rng.random
    objects = []
    for _ in range(count):
        shape = shapes.pop(int(random_() * len(shapes)))
        color = colors.pop(int(random_() * len(colors)))
        row, col = divmod(cells.pop(int(random_() * len(cells))), grid)
        size = SIZES[int(random_() * 2)]
        radius, slack = geometry[size]
        x = int((col + 0.5) * cell + (random_() * 2 - 1) * slack)
        y = int((row + 0.5) * cell + (random_() * 2 - 1) * slack)
        objects.append(SceneObject(shape, color, size, x, y, radius))
    return Scene(tuple(objects), image_size)


def make_scene(seed: int, index: int, *, max_objects: int = 2, image_size: int = 32) -> Scene:
    """The scene of row ``index``: 1..max_objects objects with distinct shapes, colors and grid cells."""
    return _draw_scene(_rng(seed, index), max_objects, image_size)


@functools.cache
def _size_geometry(image_size: int, grid: int) -> dict[str, tuple[int, float]]:
    """Per size: the radius, and how far the center may move off its cell's center with the object staying inside."""
    cell = image_size / grid
    geometry = {}
    for size in SIZES:
        radius = max(2, round(cell * _RADIUS_PER_CELL[size]))
        geometry[size] = (radius, max(0.0, cell / 2 - radius - 1))
    return geometry


def render_scene(scene: Scene) -> Image.Image:
    """Draw the scene: flat colors, no antialiasing, each object's center pixel has its color."""
    image = Image.new("RGB", (scene.image_size, scene.image_size), BACKGROUND_RGB)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        fill = COLOR_RGB[obj.color]
        r = obj.radius if obj.radius is not None else _size_geometry(scene.image_size, 3)[obj.size][0]
        x, y = obj.x, obj.y
        if obj.shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif obj.shape == "square":
            side = round(r * 0.85)
            draw.rectangle((x - side, y - side, x + side, y + side), fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
        elif obj.shape == "diamond":
            draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)
        elif obj.shape == "cross":
            arm = max(1, round(r / 3))
            draw.rectangle((x - r, y - arm, x + r, y + arm), fill=fill)
            draw.rectangle((x - arm, y - r, x + arm, y + r), fill=fill)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}")
    return image


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
        return weighted[0][0] if canonical else _pick_weighted(rng, weighted)

    if kind == "caption":
        return phrasing(CAPTION_PROMPTS), caption(scene)
    if kind == "color":
        target = _pick(rng, scene.objects)
        question = phrasing(COLOR_QUESTIONS).format(shape=target.shape)
        return _with_suffix(question, phrasing(SHORT_ANSWER_SUFFIXES)), target.color.capitalize()
    if kind == "shape":
        target = _pick(rng, scene.objects)
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
            target = _pick(rng, scene.objects)
            color, shape, answer = target.color, target.shape, "Yes"
        else:
            while True:
                color, shape = _pick(rng, COLORS), _pick(rng, SHAPES)
                if (color, shape) not in present:
                    break
            answer = "No"
        question = phrasing(EXISTS_QUESTIONS).format(color=color, shape=shape)
        return _with_suffix(question, phrasing(EXISTS_SUFFIXES)), answer
    raise ValueError(f"unknown conversation kind {kind!r}; expected one of {ALL_KINDS}")


def _conversation(rng: random.Random, scene: Scene, kind: str) -> list[dict[str, str]]:
    if kind == "multi_turn":
        rounds = 2 + int(rng.random() * 2)
        round_kinds = _sample(rng, SINGLE_ROUND_KINDS, rounds)
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


def record_id(index: int) -> str:
    return f"syn-{index:08d}"


def image_path(index: int) -> str:
    """The image path of row ``index``, relative to the data set's image root."""
    return f"images/syn-{index:08d}.png"


def index_from_id(row_id: str) -> int:
    """Inverse of ``record_id``: the row index that determines the row's scene."""
    prefix, _, digits = row_id.rpartition("-")
    if prefix != "syn" or not digits.isdigit():
        raise ValueError(f"not a synthetic row id: {row_id!r}")
    return int(digits)


def _check_kinds(kinds: Sequence[str], allowed: Sequence[str]) -> tuple[str, ...]:
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in allowed]
    if not kinds or unknown:
        raise ValueError(f"kinds must be a non-empty subset of {tuple(allowed)}, got {kinds}")
    return kinds


def generate_records(
    n: int,
    *,
    seed: int,
    start: int = 0,
    max_objects: int = 2,
    image_size: int = 32,
    kinds: Sequence[str] = ALL_KINDS,
) -> Iterator[dict]:
    """LLaVA records for rows ``start .. start+n-1``; renders nothing."""
    kinds = _check_kinds(kinds, ALL_KINDS)
    for index in range(start, start + n):
        rng = _rng(seed, index)
        scene = _draw_scene(rng, max_objects, image_size)  # same draws as make_scene(seed, index)
        kind = _pick(rng, kinds)
        yield {"id": record_id(index), "image": image_path(index), "conversations": _conversation(rng, scene, kind)}


def generate_eval_questions(
    n: int,
    *,
    seed: int,
    start: int = EVAL_START,
    max_objects: int = 2,
    image_size: int = 32,
    kinds: Sequence[str] = SINGLE_ROUND_KINDS,
) -> Iterator[dict]:
    """LLaVA-style eval question rows, canonical phrasing, one question per row.

    ``text`` has no image placeholder (eval code adds it, as LLaVA's does);
    ``objects`` names what is in the image, for hallucination checks.
    """
    kinds = _check_kinds(kinds, SINGLE_ROUND_KINDS)
    for index in range(start, start + n):
        rng = _rng(seed, index)
        scene = _draw_scene(rng, max_objects, image_size)
        kind = _pick(rng, kinds)
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
    records: Iterable[dict], image_root: Path, *, seed: int, max_objects: int = 2, image_size: int = 32
) -> int:
    """Render the PNGs that ``records`` (train records or eval rows) refer to; returns how many were written.

    Existing files are kept, so an interrupted or repeated call only fills gaps.
    """
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
        image = render_scene(make_scene(seed, index, max_objects=max_objects, image_size=image_size))
        temporary = path.with_name(path.name + ".tmp")
        image.save(temporary, format="PNG")
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
    max_objects: int = 2,
    image_size: int = 32,
    kinds: Sequence[str] = ALL_KINDS,
) -> SyntheticDataset:
    """Write train.jsonl, eval.jsonl and every image they refer to under ``out_dir/images``.

    Train rows are indices 0..train_rows-1, eval rows start at EVAL_START.
    """
    if train_rows > EVAL_START:
        raise ValueError(f"train_rows must be at most {EVAL_START} to stay disjoint from eval rows")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_file, eval_file = out_dir / "train.jsonl", out_dir / "eval.jsonl"
    train = _write_jsonl(
        train_file,
        generate_records(train_rows, seed=seed, max_objects=max_objects, image_size=image_size, kinds=kinds),
    )
    eval_kinds = tuple(k for k in kinds if k in SINGLE_ROUND_KINDS) or SINGLE_ROUND_KINDS
    questions = _write_jsonl(
        eval_file,
        generate_eval_questions(
            eval_rows, seed=seed, start=EVAL_START, max_objects=max_objects, image_size=image_size, kinds=eval_kinds
        ),
    )
    for rows in (train, questions):
        write_images(rows, out_dir, seed=seed, max_objects=max_objects, image_size=image_size)
    return SyntheticDataset(
        train_file=train_file,
        eval_file=eval_file,
        image_root=out_dir,
        seed=seed,
        max_objects=max_objects,
        image_size=image_size,
        train_rows=train_rows,
        eval_rows=eval_rows,
    )
