"""The scenes world: answers are what the scenes show, only genuine templates are frequent, answers are long enough.

An independent reader (`_Reader`) parses each short question back into what it asks about, resolves
its referring expressions against the scene and recomputes the answer: every referring expression
must name exactly one object, and the generated answer must be the recomputed one.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict

import numpy as np
import pytest

from workloads import synthetic_answers, synthetic_common, synthetic_scenes, synthetic_text
from workloads.config import SyntheticConfig
from workloads.conversations import parse_record
from workloads.segment_codes import token_shares
from workloads.synthetic import (
    EVAL_START,
    SHORT_ANSWER_SENTENCE,
    YES_NO_SENTENCE,
    generate_eval_questions,
    generate_records,
    index_from_id,
    make_scene,
    render_scene,
    write_synthetic_dataset,
)
from workloads.synthetic_common import COLOR_RGB, COLORS, SHAPES, SIZES
from workloads.synthetic_scenes import EVAL_KINDS, LONG_KINDS, SCENE_KINDS, resolve_mix, scene_record, scene_view
from workloads.task_templates import count_sentences, select_task_templates

SEED = 5
SCENES = {"world": "scenes", "max_objects": 4}
GENUINE_TEMPLATES = frozenset(
    {SHORT_ANSWER_SENTENCE, YES_NO_SENTENCE}
    | {p for p, _ in synthetic_answers.CAPTION_PROMPTS}
    | {p for p, _ in synthetic_answers.DETAIL_PROMPTS}
)
PLURALS = {synthetic_text.plural(s): s for s in SHAPES}
RELATION_WORDS = {p: r for r, phrases in synthetic_text.RELATION_PHRASES.items() for p, _ in phrases}


def _pattern(template: str) -> re.Pattern:
    escaped = re.escape(template)
    relations = "|".join(re.escape(p) for p in sorted(RELATION_WORDS, key=len, reverse=True))
    values = "|".join((*COLORS, *SHAPES, *SIZES))
    groups = {"rel": relations, "value": values}
    for name in ("ref", "rel", "value", "things", "obj", "a", "b"):
        escaped = escaped.replace(re.escape("{" + name + "}"), f"(?P<{name}>{groups.get(name, '.+?')})")
    return re.compile(escaped + "$")


def _bank(weighted, kind: str):
    return [(kind, _pattern(item[0] if isinstance(item, tuple) else item), item) for item, _ in weighted]


class _Reader:
    """Reads a short question about a scene and says what its answer must be (None: it can't read it)."""

    PATTERNS = (
        _bank(synthetic_text.COLOR_QUESTIONS, "color")
        + _bank(synthetic_text.SHAPE_QUESTIONS, "shape")
        + _bank(synthetic_text.SIZE_QUESTIONS, "size")
        + _bank(synthetic_text.COUNT_QUESTIONS, "count")
        + _bank(synthetic_text.RELATION_QUESTIONS, "relation")
        + [p for attr, bank in synthetic_text.ATTRIBUTE_YES_NO.items() for p in _bank(bank, f"is_{attr}")]
        + _bank(synthetic_text.RELATION_YES_NO, "is_relation")
        + _bank(synthetic_text.EXISTS_QUESTIONS, "exists")
    )

    def __init__(self, view):
        self.view = view
        self.positions = {}
        for i in range(len(view)):
            for variant in synthetic_text.position_variants(view.position(i)):
                self.positions[variant] = view.cells[i]

    def resolve(self, ref: str) -> list[int]:
        """The objects a referring expression fits ("the small red circle", "the object at the top left")."""
        if not ref.startswith("the "):
            return []
        words, cell = ref.removeprefix("the "), None
        for phrase, where in self.positions.items():
            if words.endswith(" " + phrase):
                words, cell = words.removesuffix(" " + phrase), where
        known = {*COLORS, *SHAPES, *SIZES, "object", "shape"}
        if not set(words.split()) <= known:
            return []
        return [
            i
            for i, o in enumerate(self.view.objects)
            if all(w in ("object", "shape") or w in (o.color, o.shape, o.size) for w in words.split())
            and (cell is None or self.view.cells[i] == cell)
        ]

    def one(self, ref: str) -> int | None:
        found = self.resolve(ref)
        return found[0] if len(found) == 1 else None

    def count(self, things: str) -> int | None:
        *attributes, noun = things.split()
        shape = PLURALS.get(noun)
        if shape is None and noun not in ("objects", "shapes"):
            return None
        objects = [o for o in self.view.objects if shape in (None, o.shape)]
        return sum(all(a in (o.color, o.size) for a in attributes) for o in objects)

    def exists(self, obj: str) -> bool | None:
        words = obj.split()[1:]  # drop the article
        if words[-1] == "shape":
            words = words[:-1]
        return any(all(w in (o.color, o.shape) for w in words) for o in self.view.objects)

    def answers(self, question: str) -> list[str]:
        """Every answer some reading of the question gives (readings whose references are unique)."""
        found = []
        for kind, pattern, item in self.PATTERNS:
            match = pattern.match(question)
            if match is not None:
                answer = self._answer(kind, match.groupdict(), item)
                if answer is not None:
                    found.append(answer)
        return found

    def _answer(self, kind: str, groups: dict, item) -> str | None:
        objects, yes_no = self.view.objects, lambda held: "Yes" if held else "No"
        if kind in ("color", "shape", "size"):
            i = self.one(groups["ref"])
            return None if i is None else getattr(objects[i], kind).capitalize()
        if kind == "count":
            n = self.count(groups["things"])
            return None if n is None else str(n)
        if kind == "exists":
            return yes_no(self.exists(groups["obj"]))
        if kind.startswith("is_") and kind != "is_relation":
            i, attribute = self.one(groups["ref"]), kind[3:]
            if i is None or groups["value"] not in {"color": COLORS, "shape": SHAPES, "size": SIZES}[attribute]:
                return None
            return yes_no(getattr(objects[i], attribute) == groups["value"])
        relation = RELATION_WORDS.get(groups["rel"])
        if kind == "is_relation":
            a, b = self.one(groups["a"]), self.one(groups["b"])
            return None if None in (a, b, relation) else yes_no(relation in self.view.relations(a, b))
        b = self.one(groups["ref"])
        if b is None or relation is None:
            return None
        (a,) = [a for a in range(len(objects)) if a != b and relation in self.view.relations(a, b)]
        return {"name": self.view.name(a), "shape": objects[a].shape, "color": objects[a].color}[item[1]].capitalize()


def _rounds(record):
    turns = record["conversations"]
    return [(turns[i]["value"].removeprefix("<image>\n"), turns[i + 1]["value"]) for i in range(0, len(turns), 2)]


def _view(index: int, max_objects: int = 4):
    return scene_view(make_scene(SEED, index, max_objects=max_objects, world="scenes"), max_objects)


def test_rows_are_a_pure_function_of_seed_and_index():
    whole = list(generate_records(80, seed=SEED, **SCENES))
    assert whole == list(generate_records(80, seed=SEED, **SCENES))
    assert whole != list(generate_records(80, seed=SEED + 1, **SCENES))
    assert list(generate_records(10, seed=SEED, start=70, **SCENES)) == whole[70:]
    for index, record in enumerate(whole):
        assert record["id"] == f"syn-{index:08d}" and record["image"] == f"images/syn-{index:08d}.png"
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) and turns
        assert turns[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in turns) == 1


@pytest.mark.parametrize("max_objects,image_size", [(2, 32), (4, 32), (4, 64), (6, 48)])
def test_scenes_are_well_formed_and_rendered_exactly(max_objects, image_size):
    sizes = Counter()
    for index in range(200):
        scene = make_scene(SEED, index, max_objects=max_objects, image_size=image_size, world="scenes")
        assert 2 <= len(scene.objects) <= max_objects
        assert len({(o.color, o.shape) for o in scene.objects}) == len(scene.objects)
        view = scene_view(scene, max_objects)
        assert len(set(view.cells)) == len(scene.objects)
        image = render_scene(scene)
        assert image.size == (image_size, image_size)
        for obj in scene.objects:
            assert obj.radius <= obj.x < image_size - obj.radius and obj.radius <= obj.y < image_size - obj.radius
            assert image.getpixel((obj.x, obj.y)) == COLOR_RGB[obj.color]
            sizes[len(scene.objects)] += 1
    assert set(sizes) == set(range(2, max_objects + 1))
    scenes = [make_scene(SEED, i, world="scenes").objects for i in range(300)]  # the default: up to 4 objects
    repeats = [len({o.shape for o in objects}) < len(objects) for objects in scenes]
    assert 0.3 < np.mean(repeats) < 0.7  # shapes repeat across objects in many scenes: counts are not trivial


def test_short_answers_are_what_the_scene_shows():
    read = Counter()
    for record in generate_records(3000, seed=SEED, mix={"vqa": 1, "exists": 1}, **SCENES):
        reader = _Reader(_view(index_from_id(record["id"])))
        for question, answer in _rounds(record):
            first = question.split("\n")[0]
            readings = reader.answers(first)
            assert readings, f"unreadable or ambiguous question: {first!r}"
            assert set(readings) == {answer}, (first, answer, readings, reader.view.objects)
            read[answer in ("Yes", "No")] += 1
    assert read[True] > 1000 and read[False] > 1000


def test_yes_no_and_pope_existence_are_balanced():
    answers = defaultdict(Counter)
    for record in generate_records(4000, seed=SEED, mix={"vqa": 1, "exists": 1}, **SCENES):
        for question, answer in _rounds(record):
            if answer in ("Yes", "No"):
                first = question.split("\n")[0]
                kind = "exists" if any(p.match(first) for k, p, _ in _Reader.PATTERNS if k == "exists") else "other"
                answers[kind][answer] += 1
    for kind, counts in answers.items():
        assert sum(counts.values()) > 800, kind
        assert 0.45 < counts["Yes"] / sum(counts.values()) < 0.55, (kind, counts)
    evals = [r for r in generate_eval_questions(3000, seed=SEED, **SCENES) if r["kind"] in ("exists", "relation")]
    for kind in ("exists", "relation"):
        labels = Counter(r["answer"] for r in evals if r["kind"] == kind)
        assert 0.44 < labels["Yes"] / sum(labels.values()) < 0.56, (kind, labels)


def test_a_text_only_guesser_is_at_chance():
    """The best guesser from the question text alone (majority answer per question, fit on other rows)."""
    rows = [r for record in generate_records(8000, seed=SEED, mix={"vqa": 1}, **SCENES) for r in _rounds(record)]
    fit, held_out = rows[:4000], rows[4000:]
    by_question = defaultdict(Counter)
    for question, answer in fit:
        by_question[question][answer] += 1
    overall = Counter(a for _, a in fit)
    for answers, chance in ((("Yes", "No"), 0.5), (tuple(c.capitalize() for c in COLORS), 1 / 6)):
        fallback = max(answers, key=overall.__getitem__)
        scored = [(q, a) for q, a in held_out if a in answers]
        guess = [(by_question[q].most_common(1)[0][0] if q in by_question else fallback) == a for q, a in scored]
        assert len(scored) > 300 and np.mean(guess) < chance + 0.06, (answers[0], np.mean(guess))


@pytest.mark.parametrize("top_k,min_share", [(20, 0.01), (10, 0.02)], ids=["default", "quickstart"])
@pytest.mark.parametrize("max_objects", [3, 4])
def test_only_genuine_task_templates_are_selected(top_k, min_share, max_objects):
    """The repo's own statistics over generated rows select the template sentences and no question."""
    records = generate_records(4000, seed=SEED, world="scenes", max_objects=max_objects)
    counts, turns = count_sentences(parse_record(r) for r in records)
    selected = select_task_templates(counts, turns, top_k=top_k, min_share=min_share).sentences()
    assert set(selected) <= GENUINE_TEMPLATES, set(selected) - GENUINE_TEMPLATES
    assert selected[:2] == (SHORT_ANSWER_SENTENCE, YES_NO_SENTENCE)
    if min_share <= 0.01:  # the main caption and detail prompts (~1.5% of user turns each)
        assert {synthetic_answers.CAPTION_PROMPTS[0][0], synthetic_answers.DETAIL_PROMPTS[0][0]} <= set(selected)
    image_words = re.compile(r"\b(" + "|".join((*COLORS, *SHAPES, *SIZES, r"\d\.\d\d")) + r")")
    assert not any(image_words.search(s) for s in selected)
    questions = [c / turns for s, c in counts.items() if s not in GENUINE_TEMPLATES]
    assert max(questions) < min_share / 2, "an image-specific question sentence is close to the selection"
    assert len(questions) > 2000  # a long tail


def _kinds_and_records(n: int, **mix_options):
    weights = resolve_mix(**mix_options)
    return [scene_record(SEED, i, weights, max_objects=3, image_size=32) for i in range(n)]


def test_mix_and_long_answer_share():
    default = dict(resolve_mix())
    assert set(default) == set(SCENE_KINDS) and abs(sum(default.values()) - 1) < 1e-9
    assert synthetic_scenes.long_answer_share(resolve_mix()) == pytest.approx(158 / 624)
    assert synthetic_scenes.long_answer_share(resolve_mix(long_answer_share=0.5)) == pytest.approx(0.5)
    halved = dict(resolve_mix(long_answer_share=0.5))
    assert halved["vqa"] / halved["region"] == pytest.approx(default["vqa"] / default["region"])
    assert dict(resolve_mix({"vqa": 3, "detail": 1})) == {"vqa": 0.75, "detail": 0.25}
    assert dict(resolve_mix(kinds=["caption", "detail"])) == pytest.approx({"caption": 22 / 45, "detail": 23 / 45})
    for bad in ({"mix": {"riddle": 1}}, {"mix": {"vqa": -1}}, {"mix": {"vqa": 0}}, {"kinds": ["color"]}):
        with pytest.raises(ValueError):
            resolve_mix(**bad)
    with pytest.raises(ValueError):
        resolve_mix({"vqa": 1}, long_answer_share=0.3)  # no long kind to rescale
    kinds = Counter(kind for kind, _ in _kinds_and_records(4000))
    assert sum(kinds[k] for k in LONG_KINDS) / 4000 == pytest.approx(158 / 624, abs=0.03)


def test_long_answers_are_long_and_grounded():
    words = defaultdict(list)
    for kind, record in _kinds_and_records(1500):
        view = _view(index_from_id(record["id"]), 3)
        for question, answer in _rounds(record):
            words[kind].append(len(answer.split()))
            for color, shape in re.findall(r"\b(" + "|".join(COLORS) + r") (" + "|".join(SHAPES) + r")\b", answer):
                if kind != "conversation" or not answer.startswith("No,"):  # a conversation may deny an object
                    assert view.count(color=color, shape=shape) == 1, (answer, view.objects)
        if kind == "detail":
            assert answer.count(". ") >= 3 and all(view.name(i, sized=True) in answer for i in range(len(view)))
        if kind == "caption":
            assert answer == synthetic_answers.caption_text(view, None) or ": " in answer
    mean = {kind: np.mean(n) for kind, n in words.items()}
    assert mean["detail"] > 35 and mean["reasoning"] > 18 and mean["conversation"] > 6 and mean["caption"] > 15
    assert mean["vqa"] < 2 and mean["exists"] == 1


def test_eval_questions_are_held_out_and_exact():
    rows = list(generate_eval_questions(1400, seed=SEED, **SCENES))
    assert {r["kind"] for r in rows} == set(EVAL_KINDS)
    for row in rows:
        index = index_from_id(row["question_id"])
        view = _view(index)
        assert index >= EVAL_START and "<image>" not in row["text"]
        assert row["objects"] == [f"{o.color} {o.shape}" for o in view.objects]
        if row["kind"] == "caption":
            assert row["text"] == synthetic_answers.CAPTION_PROMPTS[0][0]
            assert row["answer"] == synthetic_answers.caption_text(view)
        else:
            question, suffix = row["text"].split("\n")
            assert suffix == SHORT_ANSWER_SENTENCE
            assert set(_Reader(view).answers(question)) == {row["answer"]}, row
    assert list(generate_eval_questions(50, seed=SEED, kinds=["exists"], **SCENES))[0]["kind"] == "exists"


def test_text_generation_renders_no_image(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("text generation rendered an image")

    for module in (synthetic_common.Image, synthetic_common.ImageDraw):
        for name in ("new", "Draw"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, refuse)
    assert len(list(generate_records(2000, seed=SEED, **SCENES))) == 2000
    assert len(list(generate_eval_questions(500, seed=SEED, **SCENES))) == 500
    with pytest.raises(AssertionError):
        render_scene(make_scene(SEED, 0, world="scenes"))


def test_write_dataset_and_config(tmp_path):
    config = SyntheticConfig(world="scenes", train_rows=30, eval_rows=10, seed=SEED, max_objects=3)
    from workloads.synthetic import dataset_options, write_from_config

    options = dataset_options(config)
    assert options["world"] == "scenes" and options["max_objects"] == 3 and options["kinds"] is None
    dataset = write_from_config(tmp_path / "syn", config)
    train = [json.loads(line) for line in dataset.train_file.read_text().splitlines()]
    evals = [json.loads(line) for line in dataset.eval_file.read_text().splitlines()]
    assert dataset.world == "scenes" and len(train) == 30 and len(evals) == 10
    assert train == list(generate_records(30, seed=SEED, world="scenes", max_objects=3))
    assert not {index_from_id(r["id"]) for r in train} & {index_from_id(r["question_id"]) for r in evals}
    from PIL import Image

    for row in (train[0], evals[0]):
        index = index_from_id(row.get("id") or row["question_id"])
        with Image.open(dataset.image_root / row["image"]) as image:
            expected = render_scene(make_scene(SEED, index, max_objects=3, world="scenes"))
            assert image.convert("RGB").tobytes() == expected.tobytes()
    assert SyntheticConfig(world="scenes").max_objects == synthetic_scenes.DEFAULT_MAX_OBJECTS
    assert SyntheticConfig().max_objects == 1
    for bad in (
        {"world": "scenes", "max_objects": 1},
        {"mix": {"vqa": 1}},
        {"world": "scenes", "kinds": ["color"]},
        {"world": "scenes", "mix": {"riddle": 1}},
    ):
        with pytest.raises(ValueError):
            SyntheticConfig(**bad)
    with pytest.raises(ValueError):
        write_synthetic_dataset(tmp_path / "bad", train_rows=1, eval_rows=1, seed=0, world="cubes")


def test_token_shares_of_a_manifest():
    counts = {"system": 30, "role": 10, "image": 17, "instruction": 20, "task_template": 10, "response": 25}
    shares = token_shares({**counts, "end_of_turn": 5, "pad": 3})
    assert shares["response"] == {"trained": 30, "instruction": 0.0, "response": 1.0}
    assert shares["l2t"] == {"trained": 50, "instruction": 0.4, "response": 0.6}
    assert shares["l2t_no_system"]["trained"] == 60 and shares["l2t_full"]["trained"] == 100
    assert token_shares({})["l2t"] == {"trained": 0, "instruction": 0.0, "response": 0.0}
