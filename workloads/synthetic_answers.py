"""Long answers of the scenes world: captions, detailed descriptions, reasoning and conversation turns.

These are the synthetic counterparts of LLaVA-Instruct-158K's three row types (detailed
description, complex reasoning, conversation) and of TextCaps' one-sentence captions: each
answer is several words to several sentences, every word of it follows from the scene
(`synthetic_text.SceneView`), and the reasoning answers state the facts that justify them.
"""

from __future__ import annotations

import random

from workloads.synthetic_common import COLORS, SHAPES, pick, pick_weighted, sample
from workloads.synthetic_text import (
    COLOR_QUESTIONS,
    COUNT_QUESTIONS,
    EXISTS_QUESTIONS,
    RELATION_PHRASES,
    RELATION_QUESTIONS,
    SHAPE_QUESTIONS,
    SIZE_QUESTIONS,
    SceneView,
    capitalized,
    count_target,
    exists_target,
    number_word,
    phrase,
    plural,
    with_article,
)

CAPTION_PROMPTS = (
    ("Provide a one-sentence caption for the provided image.", 12),
    ("Write a short caption for this image.", 1),
    ("Describe the image briefly.", 1),
    ("Summarize the visual content of the image in one sentence.", 1),
)
DETAIL_PROMPTS = (
    ("Describe the image in detail.", 12),
    ("Provide a detailed description of the given image.", 1),
    ("Give an elaborate explanation of the image you see.", 1),
    ("Explain the visual content of the image in great detail.", 1),
)
_CAPTION_OPENERS = ("{n} shapes", "{n} colored shapes", "{n} shapes on a light background")
_DETAIL_OPENERS = (
    "The image shows {n} shapes on a plain light background.",
    "There are {n} objects in this image.",
    "This picture contains {n} colored shapes on a light gray background.",
    "The picture has {n} simple shapes drawn on a light background.",
)
_OBJECT_SENTENCES = ("{A} is {pos}.", "{Pos}, there is {a}.", "There is {a} {pos}.", "{Pos} sits {a}.")
_EDGES = {"left": "left", "right": "right", "above": "top", "below": "bottom"}
EDGE_QUESTIONS = (
    ("Which is closer to the {edge} of the image, {x} or {y}, and why?", 3),
    ("Between {x} and {y}, which one is nearer the {edge} edge of the picture, and how can you tell?", 2),
    ("Of {x} and {y}, which lies closer to the {edge} of the image, and what shows it?", 1),
)
SIZE_REASON_QUESTIONS = (
    ("Which is larger, {x} or {y}, and how can you tell?", 3),
    ("Which of the two is bigger, {x} or {y}, and why do you think so?", 2),
    ("Comparing {x} with {y}, which one is drawn larger?", 1),
)
REMOVE_QUESTIONS = (
    ("If every {color} object were removed, how many objects would be left?", 3),
    ("How many shapes would remain if all the {color} ones were taken away, and which would they be?", 2),
    ("If the {color} shapes disappeared, how many shapes would still be in the image?", 1),
)
COMMON_QUESTIONS = (
    ("What do {x} and {y} have in common?", 3),
    ("How are {x} and {y} alike, and how do they differ?", 2),
    ("In what ways are {x} and {y} similar?", 1),
)
WHERE_ALL_QUESTIONS = (
    ("How many {things} are in the image, and where are they?", 3),
    ("Where are the {things} in this picture, and how many are there?", 2),
    ("Can you count the {things} and say where each one is?", 1),
)
WHERE_QUESTIONS = (
    ("Where is {ref}?", 4),
    ("Where is {ref} located in the image?", 2),
    ("In which part of the image is {ref}?", 1),
    ("Where can I find {ref} in the picture?", 1),
)
_NO_POSITION = frozenset({"position"})


def _listed(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def caption_text(view: SceneView, rng: random.Random | None = None) -> str:
    """One sentence naming every object with its size, color and position; canonical without ``rng``."""
    opener = _CAPTION_OPENERS[0] if rng is None else pick(rng, _CAPTION_OPENERS)
    parts = [f"{with_article(view.name(i, sized=True))} {view.position(i)}" for i in view.reading_order()]
    return f"{capitalized(opener.format(n=number_word(len(view))))}: {_listed(parts)}."


def caption(rng: random.Random, view: SceneView) -> tuple[str, str]:
    return pick_weighted(rng, CAPTION_PROMPTS), caption_text(view, rng)


def detail(rng: random.Random, view: SceneView) -> tuple[str, str]:
    """ "Describe the image in detail." -> how many objects, each with size, color and position, how some
    of them are placed relative to each other, and what they share."""
    sentences = [pick(rng, _DETAIL_OPENERS).format(n=number_word(len(view)))]
    for i in view.reading_order():
        where = view.position(i)
        named = with_article(view.name(i, sized=True))
        form = pick(rng, _OBJECT_SENTENCES)
        sentences.append(form.format(A=capitalized(named), a=named, pos=where, Pos=capitalized(where)))
    for _ in range(1 + (len(view) > 2)):
        a, b = sample(rng, range(len(view)), 2)
        rel = phrase(rng, RELATION_PHRASES[pick(rng, view.relations(a, b))])
        sentences.append(f"The {view.name(a)} is {rel} the {view.name(b)}.")
    sentences.append(_shared_fact(rng, view))
    return pick_weighted(rng, DETAIL_PROMPTS), " ".join(s for s in sentences if s)


def _shared_fact(rng: random.Random, view: SceneView) -> str:
    objects = view.objects
    facts = []
    for color in {o.color for o in objects}:
        k = view.count(color=color)
        if k > 1:
            facts.append(f"{capitalized(number_word(k))} of the shapes are {color}.")
    for shape in {o.shape for o in objects}:
        k = view.count(shape=shape)
        if k > 1:
            facts.append(f"There are {number_word(k)} {plural(shape)} in total.")
    if len({o.size for o in objects}) == 1:
        facts.append(f"All of them are {objects[0].size}.")
    if not facts:
        facts.append("Every shape has a different color.")
    return pick(rng, sorted(facts))


# ---------------------------------------------------------------- reasoning


def reasoning(rng: random.Random, view: SceneView) -> tuple[str, str]:
    """A why/how question whose answer states the facts of the scene that justify it."""
    return pick(rng, (_reason_edge, _reason_size, _reason_remove, _reason_common, _reason_where_all))(rng, view)


def _pair_refs(rng: random.Random, view: SceneView, exclude: frozenset[str]) -> tuple[int, int, str, str]:
    a, b = sample(rng, range(len(view)), 2)
    return a, b, view.ref(rng, a, exclude), view.ref(rng, b, exclude)


def _ordered(rng: random.Random, first: str, second: str) -> dict[str, str]:
    return {"x": first, "y": second} if rng.random() < 0.5 else {"x": second, "y": first}


def _reason_edge(rng: random.Random, view: SceneView) -> tuple[str, str]:
    a, b, ref_a, ref_b = _pair_refs(rng, view, _NO_POSITION)
    relation = pick(rng, view.relations(a, b))
    edge = _EDGES[relation]
    question = pick_weighted(rng, EDGE_QUESTIONS).format(edge=edge, **_ordered(rng, ref_a, ref_b))
    rel = phrase(rng, RELATION_PHRASES[relation])
    answer = (
        f"{capitalized(ref_a)} is closer to the {edge}. It is {view.position(a)}, while {ref_b} is "
        f"{view.position(b)}, so {ref_a} lies {rel} {ref_b}."
    )
    return question, answer


def _reason_size(rng: random.Random, view: SceneView) -> tuple[str, str]:
    a, b, ref_a, ref_b = _pair_refs(rng, view, frozenset({"size"}))
    question = pick_weighted(rng, SIZE_REASON_QUESTIONS).format(**_ordered(rng, ref_a, ref_b))
    size_a, size_b = view.objects[a].size, view.objects[b].size
    if size_a == size_b:
        return (
            question,
            f"Neither is larger: {ref_a} and {ref_b} are both {size_a}, so they take up about the same space.",
        )
    (big, ref_big), (small, ref_small) = ((a, ref_a), (b, ref_b)) if size_a == "large" else ((b, ref_b), (a, ref_a))
    answer = (
        f"{capitalized(ref_big)} is larger. It is drawn as a large {view.objects[big].shape}, while {ref_small} "
        f"is a small {view.objects[small].shape} that covers less of the image."
    )
    return question, answer


def _reason_remove(rng: random.Random, view: SceneView) -> tuple[str, str]:
    color = pick(rng, view.objects).color if rng.random() < 0.75 else pick(rng, COLORS)
    question = pick_weighted(rng, REMOVE_QUESTIONS).format(color=color)
    n = len(view)
    removed = [i for i in view.reading_order() if view.objects[i].color == color]
    kept = [i for i in view.reading_order() if view.objects[i].color != color]
    if not removed:
        return question, f"All {number_word(n)} would remain, because none of the objects in the image is {color}."
    named = [f"the {view.name(i)}" for i in removed]
    if not kept:
        return question, f"None would remain, because all {number_word(n)} objects are {color}: {_listed(named)}."
    k, left = len(removed), len(kept)
    answer = (
        f"{capitalized(number_word(left))} would remain. The image has {number_word(n)} objects and "
        f"{number_word(k)} of them {'is' if k == 1 else 'are'} {color}: {_listed(named)}. Without "
        f"{'it' if k == 1 else 'them'}, {_listed([f'the {view.name(i)}' for i in kept])} "
        f"{'is' if left == 1 else 'are'} left."
    )
    return question, answer


def _reason_common(rng: random.Random, view: SceneView) -> tuple[str, str]:
    a, b, ref_a, ref_b = _pair_refs(rng, view, frozenset())
    question = pick_weighted(rng, COMMON_QUESTIONS).format(**_ordered(rng, ref_a, ref_b))
    oa, ob = view.objects[a], view.objects[b]
    shared = []
    if oa.color == ob.color:
        shared.append(f"both are {oa.color}")
    if oa.shape == ob.shape:
        shared.append(f"both are {plural(oa.shape)}")
    if oa.size == ob.size:
        shared.append(f"both are {oa.size}")
    described = (
        f"{ref_a} is {with_article(view.name(a, sized=True))} and {ref_b} is {with_article(view.name(b, sized=True))}"
    )
    if not shared:
        return question, f"They have nothing in common: {described}."
    rel = phrase(rng, RELATION_PHRASES[pick(rng, view.relations(a, b))])
    return question, f"{capitalized(_listed(shared))}. In full, {described}, and {ref_a} is {rel} {ref_b}."


def _reason_where_all(rng: random.Random, view: SceneView) -> tuple[str, str]:
    shape = pick(rng, view.objects).shape if rng.random() < 0.75 else pick(rng, SHAPES)
    question = pick_weighted(rng, WHERE_ALL_QUESTIONS).format(things=plural(shape))
    found = [i for i in view.reading_order() if view.objects[i].shape == shape]
    if not found:
        shown = _listed([with_article(view.name(i, sized=True)) for i in view.reading_order()])
        return question, f"There are no {plural(shape)} in the image. It shows {shown}."
    places = [
        f"{with_article(f'{view.objects[i].size} {view.objects[i].color}')} one {view.position(i)}" for i in found
    ]
    if len(found) == 1:
        return question, f"There is one {shape}: {places[0]}."
    return question, f"There are {number_word(len(found))} {plural(shape)}: {_listed(places)}."


# ---------------------------------------------------------------- conversation turns


def conversation_turns(rng: random.Random, view: SceneView, rounds: int) -> list[tuple[str, str]]:
    """``rounds`` questions of different types, answered in full sentences as LLaVA's conversations are."""
    askers = sample(rng, _TALKERS, rounds)
    return [ask(rng, view) for ask in askers]


def _talk_color(rng: random.Random, view: SceneView) -> tuple[str, str]:
    i = pick(rng, range(len(view)))
    ref = view.ref(rng, i, frozenset({"color"}))
    return pick_weighted(rng, COLOR_QUESTIONS).format(ref=ref), f"{capitalized(ref)} is {view.objects[i].color}."


def _talk_shape(rng: random.Random, view: SceneView) -> tuple[str, str]:
    i = pick(rng, range(len(view)))
    ref = view.ref(rng, i, frozenset({"shape"}))
    answer = f"{capitalized(ref)} is {with_article(view.objects[i].shape)}."
    return pick_weighted(rng, SHAPE_QUESTIONS).format(ref=ref), answer


def _talk_size(rng: random.Random, view: SceneView) -> tuple[str, str]:
    i = pick(rng, range(len(view)))
    ref = view.ref(rng, i, frozenset({"size"}))
    return pick_weighted(rng, SIZE_QUESTIONS).format(ref=ref), f"{capitalized(ref)} is {view.objects[i].size}."


def _talk_where(rng: random.Random, view: SceneView) -> tuple[str, str]:
    a, b = sample(rng, range(len(view)), 2)
    ref = view.ref(rng, a, _NO_POSITION)
    rel = phrase(rng, RELATION_PHRASES[pick(rng, view.relations(a, b))])
    answer = f"{capitalized(ref)} is {view.position(a)}, {rel} the {view.name(b)}."
    return pick_weighted(rng, WHERE_QUESTIONS).format(ref=ref), answer


def _talk_count(rng: random.Random, view: SceneView) -> tuple[str, str]:
    things, n, singular = count_target(rng, view)
    question = pick_weighted(rng, COUNT_QUESTIONS).format(things=things)
    if n == 0:
        return question, f"There are no {things} in the image."
    if n == 1:
        return question, f"There is one {singular} in the image."
    return question, f"There are {number_word(n)} {things} in the image."


def _talk_exists(rng: random.Random, view: SceneView) -> tuple[str, str]:
    yes = rng.random() < 0.5
    target = exists_target(rng, view, yes)
    question = pick_weighted(rng, EXISTS_QUESTIONS).format(obj=with_article(target))
    if not yes:
        return question, f"No, there is no {target} in the image."
    return question, f"Yes, there is {with_article(target)} in the image."


def _talk_relation(rng: random.Random, view: SceneView) -> tuple[str, str]:
    triples = view.unique_relations()
    if not triples:
        return _talk_color(rng, view)
    a, b, relation = pick(rng, triples)
    (wording, answers), rel = pick_weighted(rng, RELATION_QUESTIONS), phrase(rng, RELATION_PHRASES[relation])
    ref = view.ref(rng, b, _NO_POSITION)
    o = view.objects[a]
    answer = {
        "name": f"The {view.name(a)} is {rel} {ref}.",
        "shape": f"The shape {rel} {ref} is {with_article(o.shape)}.",
        "color": f"The object {rel} {ref} is {o.color}.",
    }[answers]
    return wording.format(rel=rel, ref=ref), answer


_TALKERS = (_talk_color, _talk_shape, _talk_size, _talk_where, _talk_count, _talk_exists, _talk_relation)
