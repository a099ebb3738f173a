"""Evaluation without Ray: question files, scoring, aggregation, the Evaluator, and visual contribution.

The metric definitions themselves are tested against hand-computed cases in
tests/test_metrics.py; here the question is whether evaluation feeds them the
right things, and whether VC measures what it claims: clearly positive for a
model that learned to look at the image, about zero for one that never saw one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from workloads.caption_metrics import bleu4, cider_d
from workloads.eval_questions import (
    QuestionError,
    normalize_question,
    parse_question_lines,
    question_conversation,
    question_prompt,
    synthetic_chair_vocabularies,
    synthetic_questions,
)
from workloads.eval_summary import SampleResult, as_sample, sample_rows, score_prediction, summarize
from workloads.evaluator import Evaluator, encode_prompts, evaluate
from workloads.segments import EncodeSpec

# ---------------------------------------------------------------- question rows


VQAV2_ROW = {
    "question_id": 262148000,
    "image": "COCO_val2014_000000262148.jpg",
    "text": "Where is he looking?\nAnswer the question using a single word or phrase.",
    "answers": [
        {"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
        for i, a in enumerate(
            ["down", "down", "at table", "skateboard", "down", "table", "down", "down", "down", "down"]
        )
    ],
}


def test_vqav2_row_keeps_all_ten_answers_and_teacher_forces_the_most_frequent():
    q = normalize_question(VQAV2_ROW)
    assert q["question_id"] == "262148000" and q["kind"] == "vqa"
    assert len(q["references"]) == 10 and q["answer"] == "down"
    # Soft VQA score over 10 answers: "table" matches 1 -> 0.3, "at table" 1 -> 0.3,
    # "down" matches 7 -> 1.0, "Down." normalizes to "down".
    assert score_prediction(q, "table") == pytest.approx(0.3)
    assert score_prediction(q, "Down.") == 1.0
    assert score_prediction(q, "up") == 0.0
    with_answer = normalize_question({**VQAV2_ROW, "answer": "looking down"})  # e.g. VQAv2's multiple_choice_answer
    assert with_answer["answer"] == "looking down" and with_answer["references"] == q["references"]


def test_two_matches_among_ten_answers_score_point_six():
    row = {
        "question_id": 1,
        "image": "x.png",
        "text": "How many?",
        "answers": ["2", "2", "3", "3", "3", "3", "3", "3", "3", "3"],
    }
    q = normalize_question(row)
    assert q["answer"] == "3"
    assert score_prediction(q, "two") == pytest.approx(0.6)  # "two" -> "2" by the VQA normalization


def test_pope_rows_are_recognized_by_their_label():
    q = normalize_question(
        {
            "question_id": 7,
            "image": "a.jpg",
            "text": "Is there a snowboard in the image?",
            "label": "no",
            "category": "adversarial",
        }
    )
    assert q["kind"] == "pope" and q["answer"] == "no" and q["references"] == ["no"] and q["category"] == "adversarial"
    assert (
        score_prediction(q, "No, there is not.") == 0.0
    )  # accuracy is exact match; POPE's yes/no rule is in summarize
    assert score_prediction(q, "no") == 1.0


def test_multiple_choice_rows_score_by_the_option_picked():
    row = {
        "question_id": "mc1",
        "image": "a.png",
        "text": "What color is the circle?\nA. red\nB. green\nC. blue\n"
        "Answer with the option's letter from the given choices directly.",
        "choices": ["red", "green", "blue"],
        "answer": "B",
    }
    q = normalize_question(row)
    assert q["kind"] == "multiple_choice"
    assert score_prediction(q, "B") == 1.0
    assert score_prediction(q, "(B) green") == 1.0
    assert score_prediction(q, "green") == 1.0
    assert score_prediction(q, "A") == 0.0


def test_captions_are_not_scored_per_sample_and_rows_without_answers_are_kept():
    caption = normalize_question(
        {
            "question_id": "c",
            "image": "a.png",
            "question": "Describe the image.",
            "answers": ["A dog.", "A brown dog."],
            "kind": "caption",
        }
    )
    assert caption["answer"] == "A dog." and caption["references"] == ["A dog.", "A brown dog."]
    assert score_prediction(caption, "A dog.") is None
    bare = normalize_question({"question_id": "t", "image": "a.png", "prompt": "What is it?"})
    assert bare["answer"] is None and bare["references"] == [] and score_prediction(bare, "a dog") is None
    assert question_conversation(bare).turns[0].text == "<image>\nWhat is it?"
    assert question_prompt(bare).turns == question_conversation(bare).turns[:1]


def test_bad_question_rows_are_refused_with_their_position():
    with pytest.raises(QuestionError, match="question 3: no question text"):
        normalize_question({"question_id": 1, "answer": "x"}, 3)
    with pytest.raises(QuestionError, match="question 0: 1 <image> placeholder.s. in the text for 0 image"):
        normalize_question({"question_id": 1, "text": "<image>\nWhat?", "answer": "x"})
    with pytest.raises(QuestionError, match="question 2: image must be a path or a list of paths"):
        normalize_question({"question_id": 1, "text": "What?", "image": ["a.png", 3]}, 2)
    with pytest.raises(QuestionError, match="needs choices"):
        normalize_question({"question_id": 1, "text": "Which?", "answer": "x", "kind": "multiple_choice"})
    with pytest.raises(QuestionError, match="unique"):
        parse_question_lines([json.dumps({"question_id": 1, "text": "a"}), json.dumps({"question_id": 1, "text": "b"})])
    with pytest.raises(QuestionError, match="line 2: not JSON"):
        parse_question_lines([json.dumps({"question_id": 1, "text": "a"}), "{oops"])


def test_question_lines_accept_jsonl_json_lists_limits_and_a_default_kind():
    lines = [
        json.dumps({"question_id": i, "image": "a.png", "text": "Is there a cat?", "answer": "yes"}) for i in range(5)
    ]
    assert len(parse_question_lines(lines, limit=3)) == 3
    assert {q["kind"] for q in parse_question_lines(lines, default_kind="pope")} == {"pope"}
    as_list = json.dumps([json.loads(line) for line in lines])
    assert [q["question_id"] for q in parse_question_lines([as_list])] == ["0", "1", "2", "3", "4"]


# ---------------------------------------------------------------- generation prompts

ANSWERS = ("2", "Red", "A small red circle sits on the left of the picture.")


@pytest.fixture(scope="module")
def prompt_tokenizers():
    from workloads.tokenizer_factory import train_tokenizer

    corpus = ["What is the color of the shape? Red. How many shapes are there? 2. A red circle on the left."] * 20
    return {
        family: train_tokenizer(corpus, family=family, vocab_size=400) for family in ("byte_bpe", "sentencepiece_bpe")
    }


MARKERS = {"vicuna_v1": " ASSISTANT:", "phi": " ASSISTANT:", "qwen2": "<|im_start|>assistant\n", "llama3": "\n\n"}


@pytest.mark.parametrize("family", ["byte_bpe", "sentencepiece_bpe"])
@pytest.mark.parametrize("template", ["vicuna_v1", "phi", "qwen2", "llama3", "tokenizer"])
def test_generation_prompt_ids_do_not_depend_on_the_reference_answer(prompt_tokenizers, family, template):
    """The prompt is rendered from the question alone: the same ids for every answer, and exactly the
    answered row's ids up to the assistant marker. Cutting the answered row at its first RESPONSE
    token instead (the old way) depends on how the answer tokenizes: with the sentencepiece
    tokenizer, " 2" is a lone "▁" and then "2", and the "▁" of the answer ended up in the prompt."""
    from workloads.segments import encode_conversations

    tokenizer = prompt_tokenizers[family]
    spec = EncodeSpec(template, 3, 512)
    prompts = []
    for answer in ANSWERS:
        row = normalize_question({"question_id": 1, "image": "a.png", "text": "How many shapes?", "answer": answer})
        (prompt,) = encode_prompts([question_prompt(row)], tokenizer, spec)
        (full,) = encode_conversations([question_conversation(row)], tokenizer, spec)
        assert full.input_ids[: len(prompt)].astype(np.int64).tolist() == prompt.tolist()
        assert tokenizer.decode(full.input_ids[len(prompt) :], skip_special_tokens=True).strip() == answer
        if family == "sentencepiece_bpe" and template in ("vicuna_v1", "phi") and answer == "2":
            assert tokenizer.convert_ids_to_tokens(int(full.input_ids[len(prompt)])) == "▁"  # the row that shows it
        prompts.append(prompt.tolist())
    assert prompts[0] == prompts[1] == prompts[2]
    text = tokenizer.decode(prompts[0])
    assert text.endswith(MARKERS.get(template, "<|im_start|>assistant\n"))
    assert prompts[0].count(tokenizer.convert_tokens_to_ids("<image>")) == 3  # one image block, expanded


def test_generation_prompts_follow_the_image_placement(prompt_tokenizers):
    tokenizer = prompt_tokenizers["byte_bpe"]
    row = normalize_question({"question_id": 1, "image": "a.png", "text": "What color?\n<image>", "answer": "Red"})
    texts = {}
    for placement in ("auto", "front", "as_written"):
        (prompt,) = encode_prompts(
            [question_prompt(row)], tokenizer, EncodeSpec("vicuna_v1", 1, 512, image_placement=placement)
        )
        texts[placement] = tokenizer.decode(prompt)
    assert texts["auto"] == texts["front"] and texts["front"].endswith(" USER: <image>\nWhat color? ASSISTANT:")
    assert texts["as_written"].endswith(" USER: What color?\n<image> ASSISTANT:")


# ---------------------------------------------------------------- aggregation


def _sample(kind, answer, prediction, *, references=None, correct=None, vc=(0.0, 1), objects=None, error=None):
    vc_sum, tokens = vc
    return SampleResult(
        question_id=f"{kind}-{prediction}-{answer}",
        kind=kind,
        question="q",
        answer=answer,
        prediction=prediction,
        correct=correct,
        logp_with_image=-1.0,
        logp_null_image=-1.0 - vc_sum,
        vc_sum=vc_sum,
        vc_mean=vc_sum / tokens,
        response_tokens=tokens,
        references=references or ([answer] if answer else []),
        objects=objects,
        error=error,
    )


def test_summary_of_hand_made_samples():
    captions = [
        _sample(
            "caption",
            "A small red circle on the left.",
            "A small red circle on the left.",
            objects=["red circle"],
            vc=(4.0, 8),
        ),
        _sample(
            "caption",
            "A large blue square in the center.",
            "A large green square in the center.",
            objects=["blue square"],
            vc=(2.0, 8),
        ),
    ]
    exists = [  # POPE: tp, fp, tn, fn, tp -> accuracy 3/5, precision 2/3, recall 2/3, yes ratio 3/5
        _sample("exists", "Yes", "Yes", correct=1.0, vc=(1.0, 1)),
        _sample("exists", "No", "Yes", correct=0.0, vc=(0.5, 1)),
        _sample("exists", "No", "No", correct=1.0, vc=(-0.5, 1)),
        _sample("exists", "Yes", "No", correct=0.0, vc=(0.0, 1)),
        _sample("exists", "Yes", "yes", correct=1.0, vc=(1.0, 1)),
    ]
    color = [_sample("color", "Red", "Red", correct=1.0, vc=(3.0, 2))]
    skipped = [_sample("color", "Red", "", error="no_trained_tokens")]
    metrics = summarize(captions + exists + color + skipped)

    assert metrics["eval_samples"] == 8 and metrics["eval_skipped_no_trained_tokens"] == 1
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["accuracy_exists"] == pytest.approx(3 / 5) and metrics["accuracy_color"] == 1.0
    assert metrics["pope_accuracy"] == pytest.approx(3 / 5)
    assert metrics["pope_precision"] == pytest.approx(2 / 3) and metrics["pope_recall"] == pytest.approx(2 / 3)
    assert metrics["pope_f1"] == pytest.approx(2 / 3) and metrics["pope_yes_ratio"] == pytest.approx(3 / 5)
    vc_means = [0.5, 0.25, 1.0, 0.5, -0.5, 0.0, 1.0, 1.5]
    assert metrics["vc_mean"] == pytest.approx(np.mean(vc_means))
    assert metrics["vc_sum"] == pytest.approx(np.mean([4, 2, 1, 0.5, -0.5, 0, 1, 3]))
    assert metrics["vc_mean_caption"] == pytest.approx(0.375)
    assert metrics["vc_positive_share"] == pytest.approx(6 / 8)
    predictions = [s.prediction for s in captions]
    references = [s.references for s in captions]
    assert metrics["caption_cider"] == pytest.approx(cider_d(predictions, references))
    assert metrics["caption_bleu4"] == pytest.approx(bleu4(predictions, references))
    # "green square" is not in the second scene: 1 of 2 object mentions, 1 of 2 captions; the
    # shape-level rate sees only squares and circles, which are all there.
    assert metrics["chair_i"] == 0.5 and metrics["chair_s"] == 0.5
    assert metrics["chair_i_shape"] == 0.0 and metrics["chair_s_shape"] == 0.0


def test_summary_reads_rows_as_well_as_samples():
    samples = [_sample("color", "Red", "Red", correct=1.0), _sample("caption", "A dog.", "A dog.", objects=None)]
    rows = [{**row, "index": i} for i, row in enumerate(sample_rows(samples))]
    assert summarize(rows) == summarize(samples)
    assert as_sample(json.loads(json.dumps(rows[0]))) == samples[0]
    assert "chair_i" not in summarize(samples)  # captions without objects: no CHAIR


def test_synthetic_vocabulary_counts_a_wrong_color_as_a_hallucinated_object():
    vocabularies = synthetic_chair_vocabularies()
    assert "red circle" in vocabularies[""] and "circle" in vocabularies[""]
    assert vocabularies["_shape"] == ["circle", "square", "triangle", "diamond", "cross"]


# ---------------------------------------------------------------- the evaluator on the tiny model


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    from workloads.model import num_image_tokens

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    processor = AutoImageProcessor.from_pretrained(tiny_model_dir)
    spec = EncodeSpec("vicuna_v1", num_image_tokens(AutoConfig.from_pretrained(tiny_model_dir)), 128)
    return model, tokenizer, processor, spec


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    questions, root = synthetic_questions(tmp_path_factory.mktemp("suite"), rows=24, seed=0, max_objects=1)
    return questions, root


def test_synthetic_suite_is_held_out_and_covers_every_question_kind(suite, synthetic_data):
    questions, root = suite
    assert {q["kind"] for q in questions} == {"caption", "color", "shape", "count", "exists"}
    assert all(Path(root, q["images"][0]).exists() for q in questions)
    train_images = {json.loads(line)["image"] for line in Path(synthetic_data.train_file).read_text().splitlines()}
    assert not train_images & {q["images"][0] for q in questions}
    assert all(q["objects"] and q["answer"] for q in questions)


def test_results_do_not_depend_on_batching(tiny, suite):
    model, tokenizer, processor, spec = tiny
    questions, root = suite
    whole, samples = evaluate(
        model, tokenizer, processor, questions, root, spec, batch_size=len(questions), max_new_tokens=6
    )
    split, samples_split = evaluate(model, tokenizer, processor, questions, root, spec, batch_size=5, max_new_tokens=6)
    assert [s.question_id for s in samples] == [q["question_id"] for q in questions]
    for a, b in zip(samples, samples_split):
        assert a.vc_sum == pytest.approx(b.vc_sum, abs=1e-4)  # the noise image is drawn per question
        assert a.logp_with_image == pytest.approx(b.logp_with_image, abs=1e-4)
        assert a.response_tokens == b.response_tokens > 0
    assert whole["eval_samples"] == len(questions)
    assert {
        "accuracy",
        "vc_mean",
        "vc_sum",
        "pope_f1",
        "caption_cider",
        "caption_bleu4",
        "chair_i",
        "accuracy_count",
    } <= set(whole)


def test_the_evaluator_generates_from_the_question_alone(tiny, suite, monkeypatch):
    model, tokenizer, processor, spec = tiny
    questions, root = suite
    question = questions[0]
    rows = [{**question, "question_id": f"{question['question_id']}-{i}", "answer": a} for i, a in enumerate(ANSWERS)]
    seen = []
    generate = model.generate

    def spy(*args, **kwargs):
        seen.append(kwargs["input_ids"].tolist())
        return generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    samples = Evaluator(model, tokenizer, processor, spec, image_root=root, max_new_tokens=2)(rows)
    (batch,) = seen
    (expected,) = encode_prompts([question_prompt(question)], tokenizer, spec)
    assert batch == [expected.tolist()] * len(ANSWERS)  # same length, so no left padding
    assert len({s.prediction for s in samples}) == 1 and all(s.error is None for s in samples)
    assert len({s.response_tokens for s in samples}) > 1  # scoring still uses each reference answer


def test_null_images_beam_search_and_awkward_rows(tiny, suite):
    model, tokenizer, processor, spec = tiny
    questions, root = suite
    rows = questions[:4] + [
        normalize_question(
            {"question_id": "no-answer", "image": questions[0]["images"][0], "text": "What color is the shape?"}
        ),
        normalize_question({"question_id": "text-only", "text": "Say yes.", "answer": "yes"}),
        normalize_question(
            {"question_id": "too-long", "image": questions[0]["images"][0], "text": "Look. " * 200, "answer": "yes"}
        ),
        normalize_question(
            {"question_id": "missing-image", "image": "images/not-there.png", "text": "What?", "answer": "yes"}
        ),
    ]
    by_null = {}
    for null in ("noise", "blank", "none"):
        evaluator = Evaluator(model, tokenizer, processor, spec, image_root=root, null_image=null, max_new_tokens=4)
        by_null[null] = {s.question_id: s for s in evaluator(rows)}
    noise, blank, none = by_null["noise"], by_null["blank"], by_null["none"]
    first = questions[0]["question_id"]
    assert noise[first].logp_with_image == pytest.approx(blank[first].logp_with_image, abs=1e-5)
    assert len({round(d[first].logp_null_image, 4) for d in (noise, blank, none)}) == 3  # three different V=∅
    for results in by_null.values():
        assert (
            results["no-answer"].prediction is not None
            and results["no-answer"].vc_sum is None
            and results["no-answer"].correct is None
        )
        assert results["text-only"].vc_sum is None and results["text-only"].logp_with_image is not None
        assert results["too-long"].error == "no_trained_tokens"
        assert results["missing-image"].error == "unreadable_image"
    beams = Evaluator(model, tokenizer, processor, spec, image_root=root, num_beams=3, max_new_tokens=4)(rows[:4])
    assert all(isinstance(s.prediction, str) for s in beams)
    assert [s.vc_sum for s in beams] == pytest.approx([noise[q["question_id"]].vc_sum for q in rows[:4]], abs=1e-4)
    with pytest.raises(ValueError, match="null_image"):
        Evaluator(model, tokenizer, processor, spec, null_image="gray")


# ---------------------------------------------------------------- visual contribution means what it says


def _train(model_dir, records, image_root, *, steps, see_images, seed=0, batch=16, lr=3e-3):
    """A plain AdamW loop on the response-only loss; `see_images=False` feeds a constant (blank) image."""
    from PIL import Image
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    from workloads.conversations import parse_record
    from workloads.loss import count_trained_tokens, l2t_loss
    from workloads.model import num_image_tokens
    from workloads.segment_codes import Segment, token_weights
    from workloads.segments import encode_conversations

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    processor = AutoImageProcessor.from_pretrained(model_dir)
    spec = EncodeSpec("vicuna_v1", num_image_tokens(AutoConfig.from_pretrained(model_dir)), 128)
    conversations = [parse_record(r) for r in records]
    encoded = encode_conversations(conversations, tokenizer, spec)
    images = [Image.open(Path(image_root, c.images[0])).convert("RGB") for c in conversations]
    pixels = torch.as_tensor(processor(images=images, return_tensors="np")["pixel_values"])
    if not see_images:
        pixels = torch.zeros_like(pixels)
    length = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), length), tokenizer.pad_token_id, dtype=torch.long)
    segments = torch.zeros((len(encoded), length), dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, : len(e.input_ids)] = torch.as_tensor(e.input_ids.astype(np.int64))
        segments[i, : len(e.segments)] = torch.as_tensor(e.segments.astype(np.int64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        pick = torch.randint(0, len(encoded), (batch,), generator=generator)
        weights = token_weights(segments[pick], "response")
        logits = model(
            input_ids=ids[pick], attention_mask=(segments[pick] != int(Segment.PAD)).long(), pixel_values=pixels[pick]
        ).logits
        l2t_loss(logits, ids[pick], segments[pick], weights, count_trained_tokens(weights)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, tokenizer, processor, spec


@pytest.fixture(scope="module")
def color_set(tmp_path_factory):
    """Color questions about one-shape scenes: training rows and held-out questions."""
    from workloads.synthetic import generate_records, write_images

    out = tmp_path_factory.mktemp("color")
    records = list(generate_records(256, seed=3, max_objects=1, kinds=("color",)))
    write_images(records, out, seed=3, max_objects=1)
    questions, root = synthetic_questions(out / "held-out", rows=36, seed=3, max_objects=1, kinds=("color",))
    return records, out, questions, root


@pytest.fixture
def one_torch_thread():
    """One intra-op thread: on this 2-core machine under load, 2 threads ran these steps 30x slower
    (57 s vs 1.9 s for 20 steps at load average 5, OpenMP threads waiting on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_visual_contribution_is_positive_after_learning_to_look_and_zero_without_images(
    tiny_model_dir, color_set, one_torch_thread
):
    records, train_root, questions, root = color_set
    results = {}
    for label, see in (("trained", True), ("never_saw_images", False)):
        started = time.perf_counter()
        model, tokenizer, processor, spec = _train(tiny_model_dir, records, train_root, steps=60, see_images=see)
        metrics, _ = evaluate(model, tokenizer, processor, questions, root, spec, max_new_tokens=3)
        results[label] = metrics
        print(
            f"{label}: VC/token {metrics['vc_mean']:+.3f}, VC/sample {metrics['vc_sum']:+.3f}, "
            f"accuracy {metrics['accuracy']:.2f} ({time.perf_counter() - started:.1f} s)"
        )
    trained, blind = results["trained"], results["never_saw_images"]
    assert trained["accuracy"] >= 0.6 and blind["accuracy"] <= 0.4
    assert trained["vc_mean"] > 0.5 and trained["vc_positive_share"] >= 0.8
    assert abs(blind["vc_mean"]) < 0.05 and abs(blind["vc_mean"]) < trained["vc_mean"] / 10
