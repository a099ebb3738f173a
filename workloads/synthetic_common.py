"""What both synthetic worlds share: the vocabulary, scenes, rendering, random streams and row ids.

`workloads.synthetic` (the one-to-few shapes world and the public entry points) and
`workloads.synthetic_scenes` (the multi-object scenes world) draw their scenes from the
same shapes, colors and sizes, render them with `render_scene`, and derive everything
about row ``index`` from the one random stream ``rng_for(seed, index)``.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

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

SHORT_ANSWER_SENTENCE = "Answer the question using a single word or phrase."
YES_NO_SENTENCE = "Please answer yes or no."
# Eval indices start here, far from any train index, so the sets are disjoint.
EVAL_START = 10**9

# Objects sit in distinct cells of a g x g grid, g the smallest that holds
# max_objects, and are as large as their cell allows: a tiny LLaVA learns the
# color of a shape covering ~15% of a 32 px image within ~100 steps, but stayed
# at chance for 300 steps at ~8% (measured here).
_RADIUS_PER_CELL = {"small": 0.3, "large": 0.44}


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


def rng_for(seed: int, index: int) -> random.Random:
    """The one random stream of row ``index``: injective in (seed, index) for index < 2**64."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed} index={index}")
    return random.Random((seed << 64) | index)


def pick(rng: random.Random, items: Sequence):
    return items[int(rng.random() * len(items))]


def pick_weighted(rng: random.Random, weighted: Sequence[tuple[str, float]]):
    """One item of ``(item, weight)`` pairs, with probability proportional to its weight."""
    point = rng.random() * _total_weight(weighted)
    for item, weight in weighted:
        point -= weight
        if point < 0:
            return item
    return weighted[-1][0]


_TOTAL_WEIGHTS: dict[int, tuple[Sequence, float]] = {}


def _total_weight(weighted: Sequence[tuple[str, float]]) -> float:
    # Keyed by id, with the sequence kept alive beside its total, so an id is never reused for another one.
    cached = _TOTAL_WEIGHTS.get(id(weighted))
    if cached is None or cached[0] is not weighted:
        if len(_TOTAL_WEIGHTS) > 4096:
            _TOTAL_WEIGHTS.clear()
        cached = _TOTAL_WEIGHTS[id(weighted)] = (weighted, sum(weight for _, weight in weighted))
    return cached[1]


def sample(rng: random.Random, items: Sequence, k: int) -> list:
    """``k`` distinct items; like ``rng.sample`` but several times faster for tiny pools."""
    pool = list(items)
    return [pool.pop(int(rng.random() * len(pool))) for _ in range(k)]


def layout_grid(max_objects: int) -> int:
    """Side of the layout grid: the smallest square grid with a cell for every object."""
    return math.ceil(math.sqrt(max_objects))


@functools.cache
def size_geometry(
    image_size: int, grid: int, radius_per_cell: tuple[float, float] | None = None
) -> dict[str, tuple[int, float]]:
    """Per size: the radius, and how far the center may move off its cell's center with the object staying inside.

    ``radius_per_cell``: (small, large) radius as a share of the cell side; None: the shapes world's."""
    cell = image_size / grid
    ratios = dict(zip(SIZES, radius_per_cell)) if radius_per_cell else _RADIUS_PER_CELL
    geometry = {}
    for size in SIZES:
        radius = max(2, round(cell * ratios[size]))
        geometry[size] = (radius, max(0.0, cell / 2 - radius - 1))
    return geometry


def place_object(random_, shape: str, color: str, cells: list[int], grid: int, cell: float, geometry) -> SceneObject:
    """Put one object in a free grid cell (taken from `cells`), with a random size and a jitter within its cell.

    The draws (cell, size, x, y) come in this order from `random_`: both worlds' scenes depend on it.
    """
    row, col = divmod(cells.pop(int(random_() * len(cells))), grid)
    size = SIZES[int(random_() * 2)]
    radius, slack = geometry[size]
    x = int((col + 0.5) * cell + (random_() * 2 - 1) * slack)
    y = int((row + 0.5) * cell + (random_() * 2 - 1) * slack)
    return SceneObject(shape, color, size, x, y, radius)


def render_scene(scene: Scene) -> Image.Image:
    """Draw the scene: flat colors, no antialiasing, each object's center pixel has its color."""
    image = Image.new("RGB", (scene.image_size, scene.image_size), BACKGROUND_RGB)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        fill = COLOR_RGB[obj.color]
        r = obj.radius if obj.radius is not None else size_geometry(scene.image_size, 3)[obj.size][0]
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


def check_kinds(kinds: Sequence[str], allowed: Sequence[str]) -> tuple[str, ...]:
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in allowed]
    if not kinds or unknown:
        raise ValueError(f"kinds must be a non-empty subset of {tuple(allowed)}, got {kinds}")
    return kinds
