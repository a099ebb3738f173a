"""The scenes world: multi-object synthetic scenes with LLaVA-665K's mix of short and long answers.

Why a second world. In the one-to-few shapes world (`workloads.synthetic`) responses are one
or two tokens, instructions are ~93% of the trained tokens, and every question phrasing is
frequent enough for the sentence statistics (`workloads.task_templates`) to call it a task
template, so the paper's `l2t` mode trains almost nothing but whitespace. Real visual
instruction data is different, and this world imitates it where the L2T mechanism depends on
it:

- Scenes hold 2..``max_objects`` shapes (5 shapes x 6 colors x 2 sizes, distinct color-shape
  pairs, shapes and colors may repeat) in distinct cells of a 2x2 (3x3 from 5 objects) grid.
  Questions name what is in the picture, by attribute, count and relation ("Is the red
  triangle to the left of the blue circle?"), so the instruction words carry information
  about the image: a model trained on instruction tokens predicts them well only by looking.
- Question sentences form a long tail: each is composed from several phrasings x referring
  expressions (`synthetic_text.SceneView.references`) x values, so no image-specific sentence
  reaches 1% of user turns, while the genuine task-template sentences do:
  "Answer the question using a single word or phrase." (~40% of user turns),
  "Please answer yes or no." (~7%), and the main caption and detail prompts (~1.5% each).
  `tests/test_synthetic_scenes.py` runs the repo's own selection on generated rows.
- Answers mix short ones with long free-form ones, as LLaVA-665K does.
- Yes/no questions are balanced: existence questions are POPE-style (half about an object
  that is there, half about one that is not, adversarial or random negatives), and so are
  the attribute and relation yes/no questions.

The target: LLaVA-665K (``llava_v1_5_mix665k.json``), as the LLaVA-1.5 paper (Liu et al.
2023, "Improved Baselines with Visual Instruction Tuning", Table 7) and its data card list it,
in thousands of rows: LLaVA-Instruct 158 (conversation 58, detailed description 23, complex
reasoning 77), ShareGPT 40 (text only), VQAv2 83, GQA 72, OKVQA 9, OCRVQA 80, A-OKVQA 66,
TextCaps 22, RefCOCO 48, VG 86. So 158/624 = 25% of the image rows (30% of all rows, with
ShareGPT) have long free-form answers; the short-answer VQA rows (310) carry "Answer the
question using a single word or phrase." on each question; RefCOCO and VG rows (134) ask for
a region's description or box. The default `DEFAULT_MIX` uses these row counts as weights:

    vqa 250           VQAv2 + GQA + OKVQA + OCRVQA + A-OKVQA (310) less the share given to `exists`:
                      1-3 short questions (color, shape, size, count, relation, yes/no, existence)
    exists 60         POPE-style existence questions, 1-2 per row (no such source in 665K: carved out of
                      VQAv2's yes/no questions so that POPE measures a trained skill)
    region 134        RefCOCO + VG: "Please provide a short description for this region: [x1, y1, x2, y2]"
                      and the reverse (box of a referring expression), 1-3 per row
    caption 22        TextCaps: "Provide a one-sentence caption for the provided image."
    detail 23         LLaVA detailed description: a multi-sentence description
    reasoning 77      LLaVA complex reasoning: why/how questions answered with the facts that justify them
    conversation 58   LLaVA conversation: 2-4 questions answered in full sentences

ShareGPT's text-only rows are left out (the world is about images). Every image row has an
image. `long_answer_share` rescales detail + reasoning + conversation to a chosen share of
rows (default: 158/624 = 0.253).

LLaVA-665K's token shares are not published; a rough estimate from the row counts and typical
lengths (questions ~10 Llama tokens, task templates ~12, short answers 1-3 and several questions
per VQA row, LLaVA-Instruct answers ~100-150, ShareGPT turns longer still) puts responses at
roughly 35-50% of the tokens `l2t` trains and 30-35% of what `l2t_full` trains. Measured here with
the tiny preset (vicuna_v1, byte-level BPE of 2000 tokens, 17 image tokens, default mix,
max_objects 3; `tests/test_synthetic_token_shares.py -s` prints it), responses are 44% of what `l2t`
trains, 36% under `l2t_no_system` and 20% under `l2t_full` (the system prompt is long next to these
short rows), against 7% under `l2t_full` in the shapes world; rows are ~105 tokens (at most ~180).

Rows are pure functions of ``(seed, index)``: the scene is drawn first from the row's random
stream (`make_scene`), then the kind and the text; nothing is rendered for text.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence

from workloads import synthetic_answers as answers
from workloads import synthetic_text as text
from workloads.synthetic_common import (
    COLORS,
    EVAL_START,
    SHAPES,
    SHORT_ANSWER_SENTENCE,
    YES_NO_SENTENCE,
    Scene,
    check_kinds,
    image_path,
    layout_grid,
    pick,
    pick_weighted,
    place_object,
    record_id,
    rng_for,
    size_geometry,
)

SCENE_KINDS: tuple[str, ...] = ("vqa", "exists", "region", "caption", "detail", "reasoning", "conversation")
LONG_KINDS: tuple[str, ...] = ("detail", "reasoning", "conversation")
DEFAULT_MIX: dict[str, float] = {
    "vqa": 250,
    "exists": 60,
    "region": 134,
    "caption": 22,
    "detail": 23,
    "reasoning": 77,
    "conversation": 58,
}
EVAL_KINDS: tuple[str, ...] = ("caption", "color", "shape", "size", "count", "relation", "exists")
DEFAULT_MAX_OBJECTS = 4
MAX_OBJECTS = 9
# (small, large) radius per cell side: a little smaller than the shapes world's, so that large objects
# move within their cell too and region boxes take many values (at 32 px, 2x2: radius 4 and 6 px).
RADIUS_PER_CELL = (0.25, 0.4)

# The short questions of a `vqa` row, with weights.
VQA_QUESTIONS = (
    (text.ask_color, 3),
    (text.ask_shape, 2),
    (text.ask_size, 1),
    (text.ask_count, 2),
    (text.ask_relation, 1.5),
    (text.ask_yes_no, 3),
    (text.ask_exists, 1),
)
# What follows a short question on its own line: LLaVA-1.5's short-answer prompt, mostly.
SHORT_SUFFIXES = ((SHORT_ANSWER_SENTENCE, 9), ("", 1))
YES_NO_SUFFIXES = ((SHORT_ANSWER_SENTENCE, 6), (YES_NO_SENTENCE, 3.5), ("", 0.5))
_ROUNDS = {"vqa": (1, 3), "exists": (1, 2), "region": (1, 3), "conversation": (2, 4)}


def resolve_mix(
    mix: Mapping[str, float] | None = None,
    long_answer_share: float | None = None,
    kinds: Sequence[str] | None = None,
) -> tuple[tuple[str, float], ...]:
    """Row-kind weights (normalized): `mix` over DEFAULT_MIX, restricted to `kinds`, then the long kinds
    (detail, reasoning, conversation) rescaled to `long_answer_share` of the rows if given."""
    weights = dict(DEFAULT_MIX)
    if mix is not None:
        unknown = sorted(set(mix) - set(SCENE_KINDS))
        if unknown:
            raise ValueError(f"unknown mix kinds {unknown}; expected some of {SCENE_KINDS}")
        if any(w < 0 for w in mix.values()):
            raise ValueError(f"mix weights must be >= 0, got {dict(mix)}")
        weights = {kind: float(mix.get(kind, 0.0)) for kind in SCENE_KINDS}
    if kinds is not None:
        keep = check_kinds(kinds, SCENE_KINDS)
        weights = {kind: w for kind, w in weights.items() if kind in keep}
    if long_answer_share is not None:
        weights = _rescaled(weights, long_answer_share)
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"the mix has no kind with a positive weight: {weights}")
    return tuple((kind, w / total) for kind, w in weights.items() if w > 0)


def _rescaled(weights: dict[str, float], long_share: float) -> dict[str, float]:
    if not 0.0 <= long_share <= 1.0:
        raise ValueError(f"long_answer_share must be in [0, 1], got {long_share}")
    long_total = sum(w for k, w in weights.items() if k in LONG_KINDS)
    short_total = sum(w for k, w in weights.items() if k not in LONG_KINDS)
    if (long_share > 0 and long_total <= 0) or (long_share < 1 and short_total <= 0):
        raise ValueError(f"long_answer_share={long_share} needs kinds on both sides of the mix: {weights}")
    return {
        k: (w * long_share / long_total if k in LONG_KINDS else w * (1 - long_share) / short_total) if w else 0.0
        for k, w in weights.items()
    }


def long_answer_share(mix: Sequence[tuple[str, float]]) -> float:
    """The share of rows whose kind has long free-form answers, for a resolved mix."""
    return sum(w for kind, w in mix if kind in LONG_KINDS)


# ---------------------------------------------------------------- scenes


def draw_scene(rng: random.Random, max_objects: int, image_size: int) -> Scene:
    """2..max_objects objects with distinct color-shape pairs in distinct grid cells; shapes, colors may repeat."""
    if not 2 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"the scenes world needs max_objects in 2..{MAX_OBJECTS}, got {max_objects}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16, got {image_size}")
    grid = layout_grid(max_objects)
    count = 2 + int(rng.random() * (max_objects - 1))
    cells, pairs = list(range(grid * grid)), set()
    cell = image_size / grid
    geometry = size_geometry(image_size, grid, RADIUS_PER_CELL)
    random_ = rng.random
    objects = []
    for _ in range(count):
        while True:
            color, shape = COLORS[int(random_() * len(COLORS))], SHAPES[int(random_() * len(SHAPES))]
            if (color, shape) not in pairs:
                pairs.add((color, shape))
                break
        objects.append(place_object(random_, shape, color, cells, grid, cell, geometry))
    return Scene(tuple(objects), image_size)


def make_scene(seed: int, index: int, *, max_objects: int = DEFAULT_MAX_OBJECTS, image_size: int = 32) -> Scene:
    """The scene of row ``index`` (train or eval) in the scenes world."""
    return draw_scene(rng_for(seed, index), max_objects, image_size)


def scene_view(scene: Scene, max_objects: int) -> text.SceneView:
    return text.SceneView(scene, layout_grid(max_objects))


# ---------------------------------------------------------------- rows


def _short_turn(rng: random.Random, view: text.SceneView, ask, canonical: bool = False) -> tuple[str, str]:
    question, answer = ask(rng, view, canonical)
    if canonical:
        return f"{question}\n{SHORT_ANSWER_SENTENCE}", answer
    suffix = pick_weighted(rng, YES_NO_SUFFIXES if answer in ("Yes", "No") else SHORT_SUFFIXES)
    return (f"{question}\n{suffix}" if suffix else question), answer


def _rounds(rng: random.Random, kind: str) -> int:
    low, high = _ROUNDS.get(kind, (1, 1))
    return low + int(rng.random() * (high - low + 1))


def conversation_rounds(rng: random.Random, view: text.SceneView, kind: str) -> list[tuple[str, str]]:
    """The (question, answer) rounds of one row of ``kind``; no question repeats within a row."""
    if kind == "caption":
        return [answers.caption(rng, view)]
    if kind == "detail":
        return [answers.detail(rng, view)]
    if kind == "reasoning":
        return [answers.reasoning(rng, view)]
    if kind == "conversation":
        return answers.conversation_turns(rng, view, _rounds(rng, kind))
    if kind not in ("vqa", "exists", "region"):
        raise ValueError(f"unknown conversation kind {kind!r}; expected one of {SCENE_KINDS}")
    rounds, seen = [], set()
    for _ in range(_rounds(rng, kind)):
        for _attempt in range(4):
            if kind == "region":
                question, answer = text.ask_region(rng, view)
            else:
                ask = text.ask_exists if kind == "exists" else pick_weighted(rng, VQA_QUESTIONS)
                question, answer = _short_turn(rng, view, ask)
            if question not in seen:
                break
        if question not in seen:
            seen.add(question)
            rounds.append((question, answer))
    return rounds


def generate_scene_records(
    n: int,
    *,
    seed: int,
    start: int = 0,
    max_objects: int = DEFAULT_MAX_OBJECTS,
    image_size: int = 32,
    mix: Mapping[str, float] | None = None,
    long_answer_share: float | None = None,
    kinds: Sequence[str] | None = None,
) -> Iterator[dict]:
    """LLaVA records for rows ``start .. start+n-1`` of the scenes world; renders nothing."""
    weights = resolve_mix(mix, long_answer_share, kinds)
    for index in range(start, start + n):
        yield scene_record(seed, index, weights, max_objects=max_objects, image_size=image_size)[1]


def scene_record(
    seed: int, index: int, weights: Sequence[tuple[str, float]], *, max_objects: int, image_size: int
) -> tuple[str, dict]:
    """(kind, LLaVA record) of row ``index``, the kind drawn from a `resolve_mix` result."""
    rng = rng_for(seed, index)
    scene = draw_scene(rng, max_objects, image_size)  # same draws as make_scene(seed, index)
    view = text.SceneView(scene, layout_grid(max_objects))
    kind = pick_weighted(rng, weights)
    turns = []
    for number, (question, answer) in enumerate(conversation_rounds(rng, view, kind)):
        turns.append({"from": "human", "value": "<image>\n" + question if number == 0 else question})
        turns.append({"from": "gpt", "value": answer})
    return kind, {"id": record_id(index), "image": image_path(index), "conversations": turns}


_EVAL_ASKERS = {
    "color": text.ask_color,
    "shape": text.ask_shape,
    "size": text.ask_size,
    "count": text.ask_count,
    "relation": text.ask_relation_yes_no,
    "exists": text.ask_exists,
}


def eval_question(rng: random.Random, view: text.SceneView, kind: str) -> tuple[str, str]:
    """One held-out question of ``kind`` (EVAL_KINDS) in canonical wording, with its exact answer."""
    if kind == "caption":
        return answers.CAPTION_PROMPTS[0][0], answers.caption_text(view)
    return _short_turn(rng, view, _EVAL_ASKERS[kind], canonical=True)


def generate_scene_eval_questions(
    n: int,
    *,
    seed: int,
    start: int = EVAL_START,
    max_objects: int = DEFAULT_MAX_OBJECTS,
    image_size: int = 32,
    kinds: Sequence[str] | None = None,
) -> Iterator[dict]:
    """Eval question rows of the scenes world: short-answer VQA with exact answers, POPE-balanced
    existence and captions (references for CIDEr), one question per row, canonical wording.

    ``text`` has no image placeholder (eval code adds it); ``objects`` names what is in the image."""
    kinds = check_kinds(kinds or EVAL_KINDS, EVAL_KINDS)
    grid = layout_grid(max_objects)
    for index in range(start, start + n):
        rng = rng_for(seed, index)
        scene = draw_scene(rng, max_objects, image_size)
        kind = pick(rng, kinds)
        question, answer = eval_question(rng, text.SceneView(scene, grid), kind)
        yield {
            "question_id": record_id(index),
            "image": image_path(index),
            "text": question,
            "answer": answer,
            "kind": kind,
            "objects": [obj.name for obj in scene.objects],
        }
