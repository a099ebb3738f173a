"""Model families: image-token counts agree with transformers; every tiny family trains and evaluates (no Ray)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from workloads.families import TINY_FAMILIES, ImageTokenCounter, image_inputs
from workloads.segment_codes import Segment

SIZES = [(32, 32), (96, 48), (48, 96), (40, 33), (17, 90), (64, 64)]  # (width, height)


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def family_model(request, synthetic_data, tmp_path_factory):
    """(family, model folder): the tiny preset of each family, tokenizer trained on the synthetic corpus."""
    from orchestrator.inputs import tokenizer_corpus
    from workloads.config import TinyModelConfig
    from workloads.families import FAMILIES
    from workloads.tiny_model import build_tiny_model

    family = request.param
    out = tmp_path_factory.mktemp(f"tiny-{family}")
    corpus = tokenizer_corpus([str(synthetic_data.train_file)], FAMILIES[family].chat_template)
    build_tiny_model(out, corpus, TinyModelConfig(family=family))
    return family, str(out)


@pytest.fixture(scope="module")
def loaded(family_model):
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    family, model_dir = family_model
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    return model, AutoTokenizer.from_pretrained(model_dir), AutoImageProcessor.from_pretrained(model_dir)


def _spec(model, template: str, max_length: int = 256):
    from workloads.families import image_settings
    from workloads.segments import EncodeSpec

    return EncodeSpec(template, max_length=max_length, **image_settings(model.config))


def test_the_preset_loads_as_its_family(family_model, loaded):
    from workloads.families import FAMILIES, family_of

    family, model_dir = family_model
    model, tokenizer, _ = loaded
    assert family_of(model.config).name == family
    assert type(model).__name__ == FAMILIES[family].model_class
    assert json.loads(Path(model_dir, "tiny_model_spec.json").read_text())["family"] == family
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids(FAMILIES[family].image_token)


def test_image_token_counts_are_what_transformers_expands_each_image_to(family_model, loaded):
    """The count from the size alone equals the model's own image features (and the processor's expansion)."""
    from transformers import AutoProcessor

    family, model_dir = family_model
    model, _, image_processor = loaded
    counter = ImageTokenCounter(model.config, image_processor)
    processor = None if family.startswith("qwen2") else AutoProcessor.from_pretrained(model_dir)  # torchvision
    counts = {}
    for width, height in SIZES:
        image = Image.new("RGB", (width, height), (200, 30, 30))
        inputs = {k: torch.as_tensor(v) for k, v in image_inputs(image_processor, [image]).items()}
        grid = {k: v for k, v in inputs.items() if k != "pixel_values"}
        with torch.no_grad():
            features = model.get_image_features(inputs["pixel_values"], **grid).pooler_output
        from_model = sum(f.shape[0] for f in features) if isinstance(features, (list, tuple)) else features.shape[0]
        counts[(width, height)] = counter.count(width, height)
        assert counts[(width, height)] == from_model, (family, width, height)
        if processor is not None:
            expanded = processor(images=[image], text=["<image> hi"], return_tensors="pt")["input_ids"]
            assert int((expanded == model.config.image_token_id).sum()) == from_model
    if family == "llava":
        assert len(set(counts.values())) == 1
    else:
        assert counts[(32, 32)] != counts[(96, 48)], "a count that depends on the size"


def _two_image_row(row_id: str = "two"):
    from workloads.conversations import parse_record

    record = {
        "id": row_id,
        "image": ["a.png", "b.png"],
        "conversations": [
            {"from": "human", "value": "<image>\nCompare them.\n<image>"},
            {"from": "gpt", "value": "The first is red, the second is blue."},
        ],
    }
    return parse_record(record)


def test_multi_image_rows_segment_each_image_by_its_own_count(family_model, loaded):
    from workloads.families import FAMILIES, IMAGE_WRAPS
    from workloads.segments import encode_conversations

    family, _ = family_model
    model, tokenizer, image_processor = loaded
    counter = ImageTokenCounter(model.config, image_processor)
    counts = counter.counts([(32, 32), (96, 48)])
    spec = _spec(model, FAMILIES[family].chat_template)
    (row,) = encode_conversations([_two_image_row()], tokenizer, spec, image_tokens=[counts])
    is_image = row.segments == int(Segment.IMAGE)
    assert int(is_image.sum()) == sum(counts) and row.image_tokens == tuple(counts) and row.images_kept == 2
    assert (row.input_ids[is_image] == model.config.image_token_id).all()
    starts = np.flatnonzero(np.diff(np.concatenate([[0], is_image.astype(int)])) == 1)
    assert len(starts) == 2 and (row.input_ids[starts[1] : starts[1] + counts[1]] == model.config.image_token_id).all()
    if family.startswith("qwen2"):  # each image's pad tokens between <|vision_start|> and <|vision_end|>, both ROLE
        opening, closing = (tokenizer.convert_tokens_to_ids(t) for t in IMAGE_WRAPS["<|image_pad|>"])
        assert (row.input_ids[starts - 1] == opening).all() and (row.segments[starts - 1] == int(Segment.ROLE)).all()
        assert row.input_ids[starts[0] + counts[0]] == closing

    # Truncation never splits an image: a cut inside the second image keeps the first one only.
    short = _spec(model, FAMILIES[family].chat_template, max_length=int(starts[1]) + 2)
    (cut,) = encode_conversations([_two_image_row()], tokenizer, short, image_tokens=[counts])
    assert not hasattr(cut, "reason") or cut.reason == "no_trained_tokens"
    if not hasattr(cut, "reason"):
        assert cut.images_kept == 1 and cut.image_tokens == (counts[0],)

    # Counts that don't match the row's placeholders, or none where the count depends on the size: refused.
    (wrong,) = encode_conversations([_two_image_row()], tokenizer, spec, image_tokens=[counts[:1]])
    assert wrong.reason == "image_placeholder_mismatch" and "'two'" in str(wrong)
    if family != "llava":
        (unknown,) = encode_conversations([_two_image_row()], tokenizer, spec)
        assert unknown.reason == "image_tokens_unknown"


def test_a_row_whose_placeholders_and_images_disagree_is_quarantined_with_its_reason():
    import pyarrow as pa

    from orchestrator.validation import validate_rows

    good = {"id": "ok", "image": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nSame?"}, {"from": "gpt", "value": "No."}]}  # fmt: skip
    bad = {**good, "id": "three-for-two", "image": ["a.png", "b.png", "c.png"]}
    batch = pa.table({"source": ["d.jsonl"] * 2, "line": [1, 2], "raw": [json.dumps(good), json.dumps(bad)]})
    out = validate_rows(batch, "auto", None, "off").to_pylist()
    assert out[0]["ok"] and out[0]["images"] == ["a.png", "b.png"]
    assert not out[1]["ok"] and out[1]["reason"] == "image_placeholder_mismatch"
    assert "three-for-two" in out[1]["message"] and "3 image(s)" in out[1]["message"]


def _training_rows(family: str, model, tokenizer, image_processor, synthetic_data, n: int = 16) -> list[dict]:
    """Encoded rows with their image inputs, as the ingest hands them to a worker: the synthetic rows, and
    every fourth one with a second image of another size (a multi-image row). Each row's PIL images are in
    `_images` (not a model input)."""
    from workloads.conversations import Conversation, Turn, parse_record
    from workloads.families import FAMILIES
    from workloads.segments import encode_conversations

    records = [json.loads(line) for line in Path(synthetic_data.train_file).read_text().splitlines()[:n]]
    conversations, images = [], []
    for i, record in enumerate(records):
        conversation = parse_record(record)
        image = Image.open(Path(synthetic_data.image_root, conversation.images[0])).convert("RGB")
        if i % 4 == 0:
            first = conversation.turns[0]
            turns = (Turn(first.role, "<image>\n" + first.text), *conversation.turns[1:])
            conversation = Conversation(conversation.id, turns, conversation.images * 2)
            images.append([image, image.resize((64, 64))])  # LLaVA-NeXT: 2x2 tiles, where 32 px takes 1x2
        else:
            images.append([image])
        conversations.append(conversation)
    counter = ImageTokenCounter(model.config, image_processor)
    counts = [counter.counts([im.size for im in row]) for row in images]
    spec = _spec(model, FAMILIES[family].chat_template)
    encoded = encode_conversations(conversations, tokenizer, spec, image_tokens=counts)
    inputs = [image_inputs(image_processor, row) for row in images]  # row by row, as the ingest processes them
    rows = []
    for row, pixels, pil in zip(encoded, inputs, images):
        assert row.images_kept == len(pixels.get("image_grid_thw", pixels["pixel_values"]))
        rows.append({"input_ids": row.input_ids, "segments": row.segments, **pixels, "_images": pil})
    return rows


def test_each_family_takes_a_training_step_on_single_and_multi_image_rows(
    family_model, loaded, synthetic_data, tmp_path
):
    from orchestrator.config import config_from_dict
    from workloads.train_loop import run_training

    family, model_dir = family_model
    rows = _training_rows(family, *loaded, synthetic_data)
    if family == "llava_next":  # rows of 3 and 5 tiles: the micro-batch pads them (the model drops the padding)
        assert {r["pixel_values"].shape[1] for r in rows} == {3, 5}
    cfg = config_from_dict(
        {
            "data": {"sources": ["rows-in-memory.jsonl"]},
            "model": {"name_or_path": model_dir, "freeze": "vision_tower"},
            "masking": {"mode": "l2t"},
            "train": {"num_workers": 1, "max_steps": 2, "micro_batch_size": 4, "lr": 1e-3, "log_every": 1,
                      "torch_threads": 1},
        }
    )  # fmt: skip
    reports = []

    def epoch_batches(epoch, skip):
        for start in range(skip * 4, len(rows), 4):
            chunk = rows[start : start + 4]
            yield {key: [r[key] for r in chunk] for key in chunk[0] if key != "_images"}

    metrics = run_training(
        cfg,
        epoch_batches,
        lambda m, checkpoint: reports.append(m),
        rows=len(rows),
        deepspeed_config={"zero_optimization": {"stage": 2}},
        export_model=False,
    )
    assert [r["step"] for r in reports] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in reports)
    assert metrics["loss_instruction"] > 0 and metrics["loss_response"] > 0


@pytest.mark.parametrize("null_image", ["noise", "blank", "none"])
def test_each_family_evaluates_with_every_null_image(family_model, loaded, synthetic_data, null_image):
    """Answers, scores and visual contribution for each family and each V=∅ (valid pixels in its layout)."""
    from workloads.eval_questions import parse_question_lines
    from workloads.evaluator import evaluate
    from workloads.families import FAMILIES

    family, _ = family_model
    model, tokenizer, image_processor = loaded
    lines = Path(synthetic_data.eval_file).read_text().splitlines()[:6]
    spec = _spec(model, FAMILIES[family].chat_template)
    metrics, samples = evaluate(
        model, tokenizer, image_processor, parse_question_lines(lines), synthetic_data.image_root, spec,
        null_image=null_image, max_new_tokens=3, batch_size=3,
    )  # fmt: skip
    assert len(samples) == 6 and not any(s.error for s in samples)
    assert all(math.isfinite(s.vc_sum) and math.isfinite(s.logp_with_image) for s in samples if s.answer)
    assert {"accuracy", "vc_mean", "vc_sum"} <= set(metrics) and math.isfinite(metrics["vc_mean"])
    if null_image != "none":  # a V=∅ that differs from the image changes the score
        assert any(abs(s.vc_sum) > 0 for s in samples if s.answer)


def test_each_family_evaluates_multi_image_questions(family_model, loaded, synthetic_data, tmp_path):
    """Questions with two images of different sizes are answered and scored; each image reaches its own
    question in a mixed batch (a question scores the same alone), and their order matters."""
    from workloads.eval_questions import QuestionError, normalize_question
    from workloads.evaluator import Evaluator
    from workloads.families import FAMILIES

    family, _ = family_model
    model, tokenizer, image_processor = loaded
    first = json.loads(Path(synthetic_data.eval_file).read_text().splitlines()[0])["image"]
    small = Image.open(Path(synthetic_data.image_root, first)).convert("RGB")
    small.save(tmp_path / "a.png")
    small.resize((64, 64)).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "b.png")
    both = "<image>\nSame color as\n<image>?"
    rows = [
        {"question_id": "two", "image": ["a.png", "b.png"], "text": both, "answer": "yes"},
        {"question_id": "bare", "image": ["a.png", "b.png"], "text": "Same color?", "answer": "no"},
        {"question_id": "swapped", "image": ["b.png", "a.png"], "text": both, "answer": "yes"},
        {"question_id": "one", "image": "a.png", "text": "What color is it?", "answer": "red"},
    ]
    questions = [normalize_question(r, i) for i, r in enumerate(rows)]
    assert questions[0]["images"] == ["a.png", "b.png"] and questions[3]["images"] == ["a.png"]
    evaluator = Evaluator(
        model, tokenizer, image_processor, _spec(model, FAMILIES[family].chat_template), image_root=tmp_path,
        max_new_tokens=3,
    )  # fmt: skip
    samples = evaluator(questions)
    assert not any(s.error for s in samples), [s.error for s in samples]
    assert all(math.isfinite(s.vc_sum) and s.vc_sum != 0 for s in samples)
    assert samples[0].images == ["a.png", "b.png"]
    (alone,) = evaluator([questions[0]])
    assert alone.logp_with_image == pytest.approx(samples[0].logp_with_image, rel=1e-4, abs=1e-4)
    assert alone.logp_null_image == pytest.approx(samples[0].logp_null_image, rel=1e-4, abs=1e-4)
    assert samples[2].logp_with_image != pytest.approx(samples[0].logp_with_image, rel=1e-6, abs=1e-6)
    with pytest.raises(QuestionError, match="question 7: 1 <image> placeholder"):
        normalize_question({"question_id": "x", "image": ["a.png", "b.png"], "text": "<image> which?"}, 7)


def test_each_family_scores_instruction_relevance_with_its_own_image_inputs(family_model, loaded, synthetic_data):
    """The relevance stage's two passes take each family's image grid (and Qwen2-VL's token types): finite
    r_t on instruction-side tokens only, the same for a row scored alone as in a batch with others."""
    from workloads.segment_codes import INSTRUCTION_SEGMENTS
    from workloads.visual_relevance import RelevanceScorer, RowToScore

    family, _ = family_model
    model, tokenizer, image_processor = loaded
    rows = _training_rows(family, model, tokenizer, image_processor, synthetic_data, n=6)
    to_score = [RowToScore(f"r{i}", r["input_ids"], r["segments"], r["_images"]) for i, r in enumerate(rows)]
    assert len(to_score[0].images) == 2  # a two-image row among one-image rows
    scorer = RelevanceScorer(model, image_processor, pad_token_id=tokenizer.pad_token_id or 0)
    batch = scorer(to_score)
    for row, relevance in zip(to_score, batch):
        instruction_side = np.isin(row.segments, [int(s) for s in INSTRUCTION_SEGMENTS])
        assert relevance.shape == row.segments.shape and np.isfinite(relevance).all()
        assert not relevance[~instruction_side].any()
    assert any(np.abs(r).max() > 0 for r in batch), "a random model's image still moves its predictions"
    for row, relevance in zip(to_score[:2], batch[:2]):
        (alone,) = scorer([row])
        np.testing.assert_allclose(alone.astype(np.float32), relevance.astype(np.float32), atol=2e-3)


def test_tinyllava_3b_composes_phi_and_siglip_and_trains_on_the_phi_template(tmp_path):
    """TinyLLaVA-3B's recipe, Phi-2 + SigLIP, on tiny random-weight parts through `l2t model compose`."""
    from transformers import (
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
        PhiConfig,
        PhiForCausalLM,
        SiglipImageProcessorPil,
        SiglipVisionConfig,
        SiglipVisionModel,
    )
    from typer.testing import CliRunner

    from orchestrator.cli import app
    from workloads.conversations import parse_record
    from workloads.loss import token_nll
    from workloads.segments import EncodeSpec, encode_conversations
    from workloads.tokenizer_factory import train_tokenizer

    corpus = ["A chat between a curious user. USER: What color is the shape? ASSISTANT: Red."] * 50
    tokenizer = train_tokenizer(corpus, family="byte_bpe", vocab_size=400)
    tokenizer.pad_token = None  # Phi-2's tokenizer has none: compose gives it EOS
    torch.manual_seed(0)
    phi = PhiForCausalLM(PhiConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, eos_token_id=tokenizer.eos_token_id,
                                   bos_token_id=tokenizer.bos_token_id))  # fmt: skip
    phi.save_pretrained(tmp_path / "phi")
    tokenizer.save_pretrained(tmp_path / "phi")
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=28, patch_size=14)  # fmt: skip
    SiglipVisionModel(vision).save_pretrained(tmp_path / "siglip")
    SiglipImageProcessorPil(size={"height": 28, "width": 28}).save_pretrained(tmp_path / "siglip")

    out = tmp_path / "tinyllava-3b"
    args = ["model", "compose", str(out), "--language-model", str(tmp_path / "phi"), "--vision-tower",
            str(tmp_path / "siglip")]  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert any("bias" in str(w.message) for w in caught), "Phi-2's LM-head bias is dropped, and said so"
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert type(model).__name__ == "LlavaForConditionalGeneration" and model.config.text_config.model_type == "phi"
    torch.testing.assert_close(model.model.language_model.layers[0].mlp.fc1.weight, phi.model.layers[0].mlp.fc1.weight)

    composed = AutoTokenizer.from_pretrained(out)
    conversation = parse_record({"id": "p", "image": "x.png", "conversations": [
        {"from": "human", "value": "What color is the shape?"}, {"from": "gpt", "value": "Red."}]})  # fmt: skip
    spec = EncodeSpec("phi", 4, 256)  # (28/14)² SigLIP tokens, no CLS
    (row,) = encode_conversations([conversation], composed, spec)
    assert not isinstance(row, Exception), row
    assert composed.decode(row.input_ids[row.segments == int(Segment.RESPONSE)]).strip() == "Red."
    assert not composed.decode(row.input_ids[:3]).startswith(composed.bos_token)  # phi: no BOS
    pixels = AutoProcessor.from_pretrained(out).image_processor(Image.new("RGB", (40, 40)), return_tensors="pt")
    ids = torch.as_tensor(row.input_ids[None], dtype=torch.long)
    logits = model(input_ids=ids, pixel_values=pixels["pixel_values"]).logits
    assert torch.isfinite(token_nll(logits, ids)).all()


def test_data_inspect_gives_each_image_the_count_of_its_size(family_model, loaded, tmp_path):
    """`l2t data inspect` with a 32x32 and a 96x48 image: the counts of the family's processor (LLaVA: one)."""
    from typer.testing import CliRunner

    from orchestrator.cli import app
    from orchestrator.config import CONFIG_DIR

    family, model_dir = family_model
    model, _, image_processor = loaded
    rows = []
    for i, size in enumerate([(32, 32), (96, 48)]):
        Image.new("RGB", size, (20, 200, 20)).save(tmp_path / f"{i}.png")
        rows.append({"id": f"r{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is it?"}, {"from": "gpt", "value": "Green."}]})  # fmt: skip
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(app, [
        "data", "inspect", str(data), "--config", str(CONFIG_DIR / "quickstart.yaml"), "--format", "json",
        f"model.name_or_path={model_dir}", f"data.sources=[{data}]", f"data.image_root={tmp_path}",
        f"storage.path={tmp_path / 'runs'}"])  # fmt: skip
    assert result.exit_code == 0, result.output
    shown = [sum(t["segment"] == "image" for t in row["tokens"]) for row in json.loads(result.stdout)]
    counter = ImageTokenCounter(model.config, image_processor)
    assert shown == counter.counts([(32, 32), (96, 48)])
    assert (shown[0] == shown[1]) == (family == "llava")
