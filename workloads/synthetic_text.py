"""The words of the scenes world: what a scene says about itself, and short questions with their answers.

`SceneView` holds the facts of one multi-object scene (`synthetic_scenes`): grid cells,
positions, spatial relations, bounding boxes and the referring expressions that name each
object uniquely ("the circle", "the red one", "the small triangle", "the object at the top
left"). Short question composers (``ask_*``) build one question and its exact short answer
from those facts; `synthetic_answers` builds the long answers. Question wording is composed
from many phrasings x referring expressions x values, so that a single question sentence is
rare; only the task-template sentences the caller appends recur.

Every composer takes the row's random stream and ``canonical``: with it, the first phrasing
and the first referring expression are used (held-out evaluation rows), the rest still
follows the scene.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from workloads.synthetic_common import COLORS, SHAPES, SIZES, Scene, pick, pick_weighted

RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
RELATION_PHRASES: dict[str, tuple[tuple[str, int], ...]] = {
    "left": (("to the left of", 5), ("left of", 2), ("on the left side of", 1)),
    "right": (("to the right of", 5), ("right of", 2), ("on the right side of", 1)),
    "above": (("above", 5), ("higher than", 1), ("over", 1)),
    "below": (("below", 5), ("under", 2), ("beneath", 1), ("lower than", 1)),
}
_POSITIONS = {
    2: (("at the top left", "at the top right"), ("at the bottom left", "at the bottom right")),
    3: (
        ("at the top left", "at the top", "at the top right"),
        ("on the left", "in the center", "on the right"),
        ("at the bottom left", "at the bottom", "at the bottom right"),
    ),
}
_EDGE_VARIANTS = {
    "at the top": ("at the top center", "in the upper middle"),
    "at the bottom": ("at the bottom center", "in the lower middle"),
    "on the left": ("at the left edge", "in the middle left"),
    "on the right": ("at the right edge", "in the middle right"),
    "in the center": ("in the middle", "at the center"),
}


def position_variants(canonical: str) -> tuple[str, ...]:
    """Ways to say a grid position, the canonical one first: "at the top left", "in the top left corner", ..."""
    words = canonical.split()
    if canonical in _EDGE_VARIANTS:
        return (canonical, *_EDGE_VARIANTS[canonical])
    row, col = words[-2], words[-1]  # a corner
    upper = {"top": "upper", "bottom": "lower"}[row]
    return (canonical, f"in the {row} {col} corner", f"in the {upper} {col}", f"in the {upper} {col} part of the image")


NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

COLOR_QUESTIONS = (
    ("What color is {ref}?", 4),
    ("What is the color of {ref}?", 3),
    ("Which color is {ref}?", 2),
    ("What color does {ref} have?", 2),
    ("Tell me the color of {ref}.", 1),
    ("What color is {ref} in the image?", 1),
)
SHAPE_QUESTIONS = (
    ("What shape is {ref}?", 4),
    ("What is the shape of {ref}?", 3),
    ("Which shape is {ref}?", 2),
    ("What kind of shape is {ref}?", 2),
    ("What type of shape is {ref}?", 1),
)
SIZE_QUESTIONS = (
    ("What size is {ref}?", 4),
    ("Is {ref} large or small?", 3),
    ("How big is {ref}?", 2),
    ("Is {ref} small or large?", 1),
)
COUNT_QUESTIONS = (
    ("How many {things} are there?", 4),
    ("How many {things} are in the image?", 3),
    ("How many {things} can you see?", 2),
    ("How many {things} are in the picture?", 2),
    ("What is the number of {things}?", 2),
    ("How many {things} does the image show?", 1),
)
# (wording, what the answer names) with weights; the answer is unique by construction.
RELATION_QUESTIONS = (
    (("What is {rel} {ref}?", "name"), 4),
    (("Which object is {rel} {ref}?", "name"), 3),
    (("What shape is {rel} {ref}?", "shape"), 2),
    (("What color is the object {rel} {ref}?", "color"), 2),
    (("Which shape is {rel} {ref}?", "shape"), 1),
)
ATTRIBUTE_YES_NO = {
    "color": (("Is {ref} {value}?", 4), ("Is the color of {ref} {value}?", 2), ("Is {ref} colored {value}?", 1)),
    "shape": (("Is {ref} a {value}?", 4), ("Is {ref} shaped like a {value}?", 1), ("Is {ref} drawn as a {value}?", 1)),
    "size": (("Is {ref} {value}?", 3), ("Is {ref} a {value} shape?", 1), ("Does {ref} look {value}?", 1)),
}
RELATION_YES_NO = (
    ("Is {a} {rel} {b}?", 6),
    ("Is {a} positioned {rel} {b}?", 1),
    ("Is {a} located {rel} {b}?", 1),
    ("Does {a} appear {rel} {b}?", 1),
)
EXISTS_QUESTIONS = (
    ("Is there {obj} in the image?", 4),
    ("Is there {obj} in the picture?", 2),
    ("Does the image contain {obj}?", 2),
    ("Can you see {obj} in this image?", 1),
    ("Is {obj} present in the image?", 1),
    ("Do you see {obj} anywhere?", 1),
)
_VALUES = {"color": COLORS, "shape": SHAPES, "size": SIZES}
_ATTRIBUTE_WEIGHTS = (("color", 3), ("shape", 2), ("size", 1))


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def with_article(phrase: str) -> str:
    return f"{article(phrase)} {phrase}"


def plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x")) else "s")


def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)


def capitalized(text: str) -> str:
    return text[:1].upper() + text[1:]


def phrase(rng: random.Random, bank: Sequence[tuple[object, float]], canonical: bool = False):
    """A wording from a weighted bank: the first with ``canonical``, else drawn by weight."""
    return bank[0][0] if canonical else pick_weighted(rng, bank)


class SceneView:
    """The facts of one scene whose objects sit in distinct cells of a ``grid`` x ``grid`` layout."""

    __slots__ = ("scene", "grid", "objects", "cells", "_shapes", "_colors", "_size_shapes", "_unique_relations")

    def __init__(self, scene: Scene, grid: int):
        if grid not in _POSITIONS:
            raise ValueError(f"the scenes world lays objects out on a 2x2 or 3x3 grid, got {grid}x{grid}")
        self.scene, self.grid, self.objects = scene, grid, scene.objects
        size = scene.image_size
        self.cells = [(o.y * grid // size, o.x * grid // size) for o in self.objects]
        shapes: dict[str, int] = {}
        colors: dict[str, int] = {}
        size_shapes: dict[tuple[str, str], int] = {}
        for o in self.objects:  # plain dicts: several times faster than Counter for a handful of objects
            shapes[o.shape] = shapes.get(o.shape, 0) + 1
            colors[o.color] = colors.get(o.color, 0) + 1
            size_shapes[o.size, o.shape] = size_shapes.get((o.size, o.shape), 0) + 1
        self._shapes, self._colors, self._size_shapes = shapes, colors, size_shapes
        self._unique_relations: list[tuple[int, int, str]] | None = None

    def __len__(self) -> int:
        return len(self.objects)

    def count(self, *, shape: str | None = None, color: str | None = None, size: str | None = None) -> int:
        return sum(
            (shape is None or o.shape == shape)
            and (color is None or o.color == color)
            and (size is None or o.size == size)
            for o in self.objects
        )

    def position(self, i: int) -> str:
        row, col = self.cells[i]
        return _POSITIONS[self.grid][row][col]

    def reading_order(self) -> list[int]:
        return sorted(range(len(self.objects)), key=lambda i: self.cells[i])

    def relations(self, a: int, b: int) -> list[str]:
        """Which of left/right/above/below hold for object ``a`` relative to ``b`` (by grid cell)."""
        (row_a, col_a), (row_b, col_b) = self.cells[a], self.cells[b]
        held = []
        if col_a != col_b:
            held.append("left" if col_a < col_b else "right")
        if row_a != row_b:
            held.append("above" if row_a < row_b else "below")
        return held

    def unique_relations(self) -> list[tuple[int, int, str]]:
        """``(a, b, relation)`` where ``a`` is the only object in that relation to ``b``."""
        if self._unique_relations is None:
            found = []
            n = len(self.objects)
            for b in range(n):
                for relation in RELATIONS:
                    holders = [a for a in range(n) if a != b and relation in self.relations(a, b)]
                    if len(holders) == 1:
                        found.append((holders[0], b, relation))
            self._unique_relations = found
        return self._unique_relations

    def references(self, i: int, exclude: frozenset[str] = frozenset()) -> list[str]:
        """Expressions that name object ``i`` and no other, none using an attribute in ``exclude``
        (color, shape, size, position); the first is the canonical one."""
        o = self.objects[i]
        use_color, use_shape, use_size = "color" not in exclude, "shape" not in exclude, "size" not in exclude
        found = []
        if use_color and use_shape:
            found.append(f"the {o.color} {o.shape}")
        if use_shape and self._shapes[o.shape] == 1:
            found.append(f"the {o.shape}")
        if use_color and self._colors[o.color] == 1:
            found += [f"the {o.color} object", f"the {o.color} shape"] if use_shape else [f"the {o.color} object"]
        if use_size and use_shape and self._size_shapes[(o.size, o.shape)] == 1:
            found.append(f"the {o.size} {o.shape}")
        if use_size and use_color and use_shape:
            found.append(f"the {o.size} {o.color} {o.shape}")
        if "position" not in exclude:  # "{pos}": any way to say where it is (`position_variants`)
            if use_shape:
                found.append(f"the {o.shape} {{pos}}")
            found.append("the {noun} {pos}")
        return found

    def ref(self, rng: random.Random, i: int, exclude: frozenset[str] = frozenset(), canonical: bool = False) -> str:
        """One of `references` (the first with ``canonical``), its position said in one of several ways."""
        found = self.references(i, exclude)
        chosen = found[0] if canonical else pick(rng, found)
        if "{" not in chosen:
            return chosen
        if canonical:
            return chosen.format(pos=self.position(i), noun="object")
        noun = "object" if "shape" in exclude else pick(rng, ("object", "shape"))  # not "What shape is the shape..."
        return chosen.format(pos=pick(rng, position_variants(self.position(i))), noun=noun)

    def name(self, i: int, sized: bool = False) -> str:
        o = self.objects[i]
        return f"{o.size} {o.color} {o.shape}" if sized else f"{o.color} {o.shape}"

    def box(self, i: int) -> str:
        """The object's bounding box as LLaVA-1.5 writes region coordinates: ``[x1, y1, x2, y2]`` in 0..1."""
        o, size = self.objects[i], self.scene.image_size
        r = round(o.radius * 0.85) if o.shape == "square" else o.radius
        edges = (o.x - r, o.y - r, o.x + r + 1, o.y + r + 1)
        return "[" + ", ".join(f"{min(max(v / size, 0.0), 1.0):.2f}" for v in edges) + "]"


# ---------------------------------------------------------------- short questions: (question, answer)

_NO_COLOR, _NO_SHAPE, _NO_SIZE = frozenset({"color"}), frozenset({"shape"}), frozenset({"size"})
_NO_POSITION = frozenset({"position"})


def ask_color(rng: random.Random, view: SceneView, canonical: bool = False) -> tuple[str, str]:
    i = pick(rng, range(len(view)))
    question = phrase(rng, COLOR_QUESTIONS, canonical).format(ref=view.ref(rng, i, _NO_COLOR, canonical))
    return question, view.objects[i].color.capitalize()


def ask_shape(rng: random.Random, view: SceneView, canonical: bool = False) -> tuple[str, str]:
    i = pick(rng, range(len(view)))
    question = phrase(rng, SHAPE_QUESTIONS, canonical).format(ref=view.ref(rng, i, _NO_SHAPE, canonical))
    return question, view.objects[i].shape.capitalize()


def ask_size(rng: random.Random, view: SceneView, canonical: bool = False) -> tuple[str, str]:
    i = pick(rng, range(len(view)))
    question = phrase(rng, SIZE_QUESTIONS, canonical).format(ref=view.ref(rng, i, _NO_SIZE, canonical))
    return question, view.objects[i].size.capitalize()


def count_target(rng: random.Random, view: SceneView) -> tuple[str, int, str]:
    """What to count: (plural noun phrase, how many, singular noun phrase). Mostly present attributes."""
    draw, present = rng.random(), rng.random() < 0.75
    if draw < 0.4:
        shape = pick(rng, view.objects).shape if present else pick(rng, SHAPES)
        return plural(shape), view.count(shape=shape), shape
    if draw < 0.72:
        color = pick(rng, view.objects).color if present else pick(rng, COLORS)
        noun = pick(rng, ("objects", "shapes"))
        return f"{color} {noun}", view.count(color=color), f"{color} {noun[:-1]}"
    if draw < 0.86:
        size = pick(rng, SIZES)
        return f"{size} shapes", view.count(size=size), f"{size} shape"
    if draw < 0.93:
        o = pick(rng, view.objects) if present else None
        color, shape = (o.color, o.shape) if o else (pick(rng, COLORS), pick(rng, SHAPES))
        return f"{color} {plural(shape)}", view.count(color=color, shape=shape), f"{color} {shape}"
    noun = pick(rng, ("objects", "shapes"))
    return noun, len(view), noun[:-1]


def ask_count(rng: random.Random, view: SceneView, canonical: bool = False) -> tuple[str, str]:
    things, n, _ = count_target(rng, view)
    return phrase(rng, COUNT_QUESTIONS, canonical).format(things=things), str(n)


def ask_relation(rng: random.Random, view: SceneView, canonical: bool = False) -> tuple[str, str]:
    """ "What is to the left of the blue square?" about a pair whose answer is unique (else a color question)."""
    triples = view.unique_relations()
    if not triples:
        return ask_color(rng, view, canonical)
    a, b, relation = pick(rng, triples)
    wording, answers = phrase(rng, RELATION_QUESTIONS, canonical)
    rel = phrase(rng, RELATION_PHRASES[relation], canonical)
    question = wording.format(rel=rel, ref=view.ref(rng, b, _NO_POSITION, canonical))
    o = view.objects[a]
    answer = {"name": view.name(a), "shape": o.shape, "color": o.color}[answers]
    return question, answer.capitalize()


def ask_attribute_yes_no(rng: random.Random, view: SceneView, canonical: bool = False, yes: bool | None = None):
    """ "Is the circle red?": yes for half the questions, else a value the object does not have."""
    yes = rng.random() < 0.5 if yes is None else yes
    i = pick(rng, range(len(view)))
    attribute = phrase(rng, _ATTRIBUTE_WEIGHTS, canonical)
    true_value = getattr(view.objects[i], attribute)
    value = true_value if yes else pick(rng, [v for v in _VALUES[attribute] if v != true_value])
    ref = view.ref(rng, i, frozenset({attribute}), canonical)
    question = phrase(rng, ATTRIBUTE_YES_NO[attribute], canonical).format(ref=ref, value=value)
    return question, "Yes" if yes else "No"


def ask_relation_yes_no(rng: random.Random, view: SceneView, canonical: bool = False, yes: bool | None = None):
    """ "Is the red triangle left of the blue circle?": yes for half, else a relation that does not hold."""
    yes = rng.random() < 0.5 if yes is None else yes
    a, b = _two(rng, len(view))
    held = view.relations(a, b)
    relation = pick(rng, held if yes else [r for r in RELATIONS if r not in held])
    rel = phrase(rng, RELATION_PHRASES[relation], canonical)
    ref_a, ref_b = view.ref(rng, a, _NO_POSITION, canonical), view.ref(rng, b, _NO_POSITION, canonical)
    question = phrase(rng, RELATION_YES_NO, canonical).format(a=ref_a, rel=rel, b=ref_b)
    return question, "Yes" if yes else "No"


def ask_yes_no(rng: random.Random, view: SceneView, canonical: bool = False) -> tuple[str, str]:
    if rng.random() < 0.5:
        return ask_attribute_yes_no(rng, view, canonical)
    return ask_relation_yes_no(rng, view, canonical)


def _two(rng: random.Random, n: int) -> tuple[int, int]:
    a = int(rng.random() * n)
    b = int(rng.random() * (n - 1))
    return a, b + (b >= a)


def exists_target(rng: random.Random, view: SceneView, yes: bool) -> str:
    """POPE-style: an object that is there, or (half the time) one that is not: adversarial negatives keep
    a present shape or color and change the other, random ones draw from the whole vocabulary."""
    style = rng.random()
    if style < 0.15:
        absent = [s for s in SHAPES if not view.count(shape=s)]
        if yes or absent:
            return pick(rng, view.objects).shape if yes else pick(rng, absent)
    elif style < 0.3:
        absent = [c for c in COLORS if not view.count(color=c)]
        if yes or absent:
            return f"{pick(rng, view.objects).color if yes else pick(rng, absent)} shape"
    if yes:
        return view.name(pick(rng, range(len(view))))
    if rng.random() < 0.5:  # adversarial: a present shape in another color, or a present color on another shape
        o = pick(rng, view.objects)
        if rng.random() < 0.5:
            options = [f"{c} {o.shape}" for c in COLORS if not view.count(color=c, shape=o.shape)]
        else:
            options = [f"{o.color} {s}" for s in SHAPES if not view.count(color=o.color, shape=s)]
        if options:
            return pick(rng, options)
    while True:
        color, shape = pick(rng, COLORS), pick(rng, SHAPES)
        if not view.count(color=color, shape=shape):
            return f"{color} {shape}"


def ask_exists(rng: random.Random, view: SceneView, canonical: bool = False, yes: bool | None = None):
    yes = rng.random() < 0.5 if yes is None else yes
    target = exists_target(rng, view, yes)
    question = phrase(rng, EXISTS_QUESTIONS, canonical).format(obj=with_article(target))
    return question, "Yes" if yes else "No"


def ask_region(rng: random.Random, view: SceneView, canonical: bool = False) -> tuple[str, str]:
    """RefCOCO / Visual Genome rows as LLaVA-1.5 writes them: describe a box, or give the box of an expression."""
    i = pick(rng, range(len(view)))
    if rng.random() < 0.5:
        question = f"Please provide a short description for this region: {view.box(i)}"
        described = view.name(i, sized=rng.random() < 0.6)
        if rng.random() < 0.3:
            described += " " + view.position(i)
        return question, capitalized(described)
    expression = view.ref(rng, i, canonical=canonical).removeprefix("the ")
    question = f"Please provide the bounding box coordinate of the region this sentence describes: {expression}"
    return question, view.box(i)
