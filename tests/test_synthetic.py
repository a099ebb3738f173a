"""The synthetic data set is deterministic, and its answers are what the images show."""

from __future__ import annotations

import json
import re
import time
from collections import Counter, defaultdict

import pytest

from workloads.synthetic import (
    ALL_KINDS,
    COLOR_RGB,
    EVAL_START,
    SHORT_ANSWER_SENTENCE,
    SINGLE_ROUND_KINDS,
    caption,
    generate_eval_questions,
    generate_records,
    index_from_id,
    make_scene,
    render_scene,
    write_images,
    write_synthetic_dataset,
)

SEED = 11


def _rounds(record):
    turns = record["conversations"]
    return [(turns[i]["value"].removeprefix("<image>\n"), turns[i + 1]["value"]) for i in range(0, len(turns), 2)]


def _scene_of(record, **kwargs):
    return make_scene(SEED, index_from_id(record["id"]), **kwargs)


def _first_line(question: str) -> str:
    return question.split("\n")[0]


def test_same_seed_same_records_and_different_seed_differs():
    first = list(generate_records(300, seed=SEED))
    assert first == list(generate_records(300, seed=SEED))
    assert first != list(generate_records(300, seed=SEED + 1))


def test_rows_depend_only_on_seed_and_index():
    whole = list(generate_records(60, seed=SEED))
    assert list(generate_records(10, seed=SEED, start=50)) == whole[50:]
    assert make_scene(SEED, 7) == make_scene(SEED, 7)


def test_image_bytes_are_deterministic(tmp_path):
    records = list(generate_records(20, seed=SEED))
    for root, seed in ((tmp_path / "a", SEED), (tmp_path / "b", SEED), (tmp_path / "c", SEED + 1)):
        assert write_images(records, root, seed=seed, max_objects=2, image_size=32) == 20
    a = [(tmp_path / "a" / r["image"]).read_bytes() for r in records]
    b = [(tmp_path / "b" / r["image"]).read_bytes() for r in records]
    c = [(tmp_path / "c" / r["image"]).read_bytes() for r in records]
    assert a == b
    assert a != c
    # Existing images are kept, not rendered again.
    assert write_images(records, tmp_path / "a", seed=SEED, max_objects=2, image_size=32) == 0


def test_record_format():
    records = list(generate_records(600, seed=SEED, start=123))
    for index, record in enumerate(records, start=123):
        assert record["id"] == f"syn-{index:08d}"
        assert record["image"] == f"images/syn-{index:08d}.png"
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in turns) == 1
        assert 1 <= len(turns) // 2 <= 3


@pytest.mark.parametrize("image_size", [32, 64, 336])
def test_every_object_center_pixel_has_its_color(image_size):
    for index in range(300):
        scene = make_scene(SEED, index, max_objects=5, image_size=image_size)
        image = render_scene(scene)
        assert image.mode == "RGB" and image.size == (image_size, image_size)
        for obj in scene.objects:
            assert image.getpixel((obj.x, obj.y)) == COLOR_RGB[obj.color]
        assert len({o.shape for o in scene.objects}) == len({o.color for o in scene.objects}) == len(scene.objects)


def test_color_answers_match_the_rendered_pixels():
    for record in generate_records(300, seed=SEED, kinds=["color"]):
        ((question, answer),) = _rounds(record)
        scene = _scene_of(record)
        named = [o for o in scene.objects if re.search(rf"\b{o.shape}\b", _first_line(question))]
        assert len(named) == 1, (question, scene)
        pixel = render_scene(scene).getpixel((named[0].x, named[0].y))
        assert pixel == COLOR_RGB[answer.lower()]


def test_shape_count_exists_and_caption_answers_match_scenes():
    exists_answers = Counter()
    for record in generate_records(2000, seed=SEED, max_objects=3):
        scene = _scene_of(record, max_objects=3)
        for question, answer in _rounds(record):
            line = _first_line(question)
            if line.startswith(("How many", "Count")):
                assert answer == str(len(scene.objects))
            elif line.startswith(("What shape", "Which shape", "What is the")) and "color" not in line:
                (target,) = [o for o in scene.objects if re.search(rf"\b{o.color}\b", line)]
                assert answer == target.shape.capitalize()
            elif line.startswith(("Is there", "Does the image", "Can you see")):
                color, shape = re.search(r"\ban? (\w+) (\w+)", line).groups()
                present = any(o.color == color and o.shape == shape for o in scene.objects)
                assert answer == ("Yes" if present else "No")
                exists_answers[answer] += 1
            elif "color" in line:
                (target,) = [o for o in scene.objects if re.search(rf"\b{o.shape}\b", line)]
                assert answer == target.color.capitalize()
            else:  # caption
                assert answer == caption(scene)
                for obj in scene.objects:
                    assert f"{obj.size} {obj.color} {obj.shape}" in answer
    yes_share = exists_answers["Yes"] / sum(exists_answers.values())
    assert 0.4 < yes_share < 0.6


@pytest.mark.parametrize("kind,chance", [("color", 1 / 6), ("shape", 1 / 5), ("exists", 1 / 2), ("count", 1 / 2)])
def test_a_model_ignoring_the_image_is_at_chance(kind, chance):
    """The best text-only guesser (majority answer per question, fit on other rows) is near chance."""
    rows = [r for record in generate_records(6000, seed=SEED, kinds=[kind]) for r in _rounds(record)]
    fit, held_out = rows[:3000], rows[3000:]
    answers_by_question = defaultdict(Counter)
    for question, answer in fit:
        answers_by_question[question][answer] += 1
    fallback = Counter(a for _, a in fit).most_common(1)[0][0]

    def guess(question):
        counts = answers_by_question.get(question)
        return counts.most_common(1)[0][0] if counts else fallback

    accuracy = sum(guess(q) == a for q, a in held_out) / len(held_out)
    assert accuracy < chance + 0.06


def test_short_answer_sentence_is_the_most_frequent_instruction_sentence():
    sentences = Counter()
    for record in generate_records(5000, seed=SEED):
        for question, _ in _rounds(record):
            for line in question.split("\n"):
                sentences[line] += 1
    (top, top_count), (_, second_count) = sentences.most_common(2)
    assert top == SHORT_ANSWER_SENTENCE
    assert top_count > 2 * second_count
    assert len(sentences) > 20  # a real distribution of phrasings


def test_all_kinds_appear_and_multi_turn_has_two_or_three_rounds():
    lengths = Counter(len(r["conversations"]) // 2 for r in generate_records(600, seed=SEED, kinds=["multi_turn"]))
    assert set(lengths) == {2, 3}
    counts = Counter(len(r["conversations"]) for r in generate_records(600, seed=SEED))
    assert counts[2] > 300 and counts[4] + counts[6] > 30  # mostly single round, some multi-turn
    with pytest.raises(ValueError):
        next(generate_records(1, seed=SEED, kinds=["riddle"]))


def test_eval_questions_match_scenes():
    rows = list(generate_eval_questions(500, seed=SEED, start=EVAL_START, max_objects=2, image_size=32))
    assert {row["kind"] for row in rows} == set(SINGLE_ROUND_KINDS)
    for row in rows:
        index = index_from_id(row["question_id"])
        assert index >= EVAL_START
        scene = make_scene(SEED, index)
        assert row["image"] == f"images/syn-{index:08d}.png"
        assert "<image>" not in row["text"]
        assert row["objects"] == [f"{o.color} {o.shape}" for o in scene.objects]
        if row["kind"] == "caption":
            assert row["answer"] == caption(scene)
        elif row["kind"] == "count":
            assert row["answer"] == str(len(scene.objects))
        else:
            assert row["text"].endswith("\n" + SHORT_ANSWER_SENTENCE)


def test_write_synthetic_dataset(tmp_path):
    dataset = write_synthetic_dataset(tmp_path / "syn", train_rows=40, eval_rows=15, seed=SEED)
    train = [json.loads(line) for line in dataset.train_file.read_text().splitlines()]
    evals = [json.loads(line) for line in dataset.eval_file.read_text().splitlines()]
    assert dataset.train_file.name == "train.jsonl" and dataset.eval_file.name == "eval.jsonl"
    assert len(train) == 40 and len(evals) == 15
    assert train == list(generate_records(40, seed=SEED))
    assert not {index_from_id(r["id"]) for r in train} & {index_from_id(r["question_id"]) for r in evals}
    for row in train + evals:
        path = dataset.image_root / row["image"]
        assert path.is_file() and path.read_bytes().startswith(b"\x89PNG")
    assert len(list((dataset.image_root / "images").iterdir())) == 55


def test_text_generation_speed_sanity():
    """No timing assert (shared machines); prints the rate for the record."""
    count = 20_000
    started = time.perf_counter()
    for _ in generate_records(count, seed=SEED):
        pass
    rate = count / (time.perf_counter() - started)
    print(f"synthetic text: {rate:,.0f} records/s")
    assert rate > 0


def test_invalid_arguments():
    with pytest.raises(ValueError):
        make_scene(SEED, 0, max_objects=6)
    with pytest.raises(ValueError):
        make_scene(-1, 0)
    with pytest.raises(ValueError):
        index_from_id("img-0001")
    assert set(ALL_KINDS) == set(SINGLE_ROUND_KINDS) | {"multi_turn"}
