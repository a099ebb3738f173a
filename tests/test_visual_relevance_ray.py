"""Relevance scoring at preparation (Ray Data actors) with reference models that did and did not learn to look,
and `masking.mode=l2t_visual` through Ray Train + DeepSpeed on the scored shards.

The reference models are the tiny preset trained in this process (the l2t loss, instruction and response
tokens, AdamW, 150 steps of 16 rows) on a synthetic set of one shape per image (color, shape and exists
questions: "Is there a red circle in the image?"), once with the real images and once with a blank image
in their place: the second one never saw an image, so the image can tell it nothing. This world, not
`scenes`, because the tiny model learns to look at one centered shape in a CPU test's budget; on
multi-object scenes 300 such steps left instruction relevance under a blank V=∅ at 0.0001.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import experiment_config

pytestmark = pytest.mark.ray

STEPS = 150
FUNCTION_WORDS = {"what", "is", "the", "of", "in", "there", "a", "does", "image", "picture", "contain", "this"}


def _train_reference(model_dir: str, cfg, out: Path, *, see_images: bool) -> str:
    """The tiny model after STEPS steps of the l2t loss on the training rows (images blank unless `see_images`)."""
    from PIL import Image
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    from workloads.conversations import parse_record
    from workloads.loss import count_trained_tokens, l2t_loss
    from workloads.model import num_image_tokens
    from workloads.segment_codes import Segment, token_weights
    from workloads.segments import EncodeSpec, encode_conversations

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steadier on a loaded 2-core machine
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    tokenizer, processor = AutoTokenizer.from_pretrained(model_dir), AutoImageProcessor.from_pretrained(model_dir)
    records = [json.loads(line) for line in Path(cfg.data.sources[0]).read_text().splitlines()]
    conversations = [parse_record(r) for r in records]
    encoded = encode_conversations(
        conversations, tokenizer, EncodeSpec("vicuna_v1", num_image_tokens(AutoConfig.from_pretrained(model_dir)), 128)
    )
    images = [Image.open(Path(cfg.data.image_root, c.images[0])).convert("RGB") for c in conversations]
    pixels = torch.as_tensor(processor(images=images, return_tensors="np")["pixel_values"])
    pixels = pixels if see_images else torch.zeros_like(pixels)
    length = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), length), tokenizer.pad_token_id, dtype=torch.long)
    segments = torch.zeros((len(encoded), length), dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, : len(e.input_ids)] = torch.as_tensor(e.input_ids.astype(np.int64))
        segments[i, : len(e.segments)] = torch.as_tensor(e.segments.astype(np.int64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(STEPS):
        pick = torch.randint(0, len(encoded), (16,), generator=generator)
        weights = token_weights(segments[pick], "l2t")
        mask = (segments[pick] != int(Segment.PAD)).long()
        logits = model(input_ids=ids[pick], attention_mask=mask, pixel_values=pixels[pick]).logits
        l2t_loss(logits, ids[pick], segments[pick], weights, count_trained_tokens(weights)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.set_num_threads(threads)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def scored(request, tmp_path_factory):
    """Two references trained here, the session data prepared with each, and one l2t_visual fit."""
    from orchestrator.config import with_overrides
    from orchestrator.inputs import materialize_synthetic, resolve_model
    from orchestrator.prepare import prepare
    from orchestrator.train import run_train

    storage = tmp_path_factory.mktemp("visual")
    synthetic = {"train_rows": 512, "kinds": ["color", "shape", "exists"]}  # questions that name shapes and colors
    raw = experiment_config(
        storage,
        data={"synthetic": {**experiment_config(storage).data.synthetic.model_dump(), **synthetic}},
        masking={"task_templates": {"top_k": 0}},  # every human word an instruction token, none a task template
        train={"max_steps": 3, "num_workers": 1, "log_every": 1},
    )
    cfg = materialize_synthetic(raw)
    model_dir = resolve_model(cfg)
    references = {}
    for label, see in (("looked", True), ("blind", False)):  # plain processes, before Ray takes the CPUs
        started = time.perf_counter()
        references[label] = _train_reference(model_dir, cfg, storage / f"reference-{label}", see_images=see)
        print(f"reference {label}: {STEPS} steps in {time.perf_counter() - started:.1f} s")
    request.getfixturevalue("ray_cluster")
    out = {"cfg": cfg, "model_dir": model_dir, "plain": prepare(cfg, model_dir, progress=print)}
    for label, reference in references.items():
        out[f"{label}_cfg"] = with_overrides(cfg, {"data.relevance": {"reference_model": reference}})
        out[label] = prepare(out[f"{label}_cfg"], model_dir, progress=print)
    visual = with_overrides(out["looked_cfg"], {"masking.mode": "l2t_visual"})
    out["again"] = prepare(visual, model_dir, progress=print)  # the same data and reference: a no-op
    out["fit"] = run_train(visual, out["looked"], model_dir, "l2t-visual")
    return out


def _shard_rows(prepared) -> list[dict]:
    import pyarrow.dataset as pads

    return pads.dataset(prepared.shards, format="parquet").to_table().to_pylist()


def _relevance_by_word(prepared, model_dir: str) -> tuple[list[float], list[float]]:
    """Relevance of instruction tokens that name an image attribute (a color or a shape) and of function words."""
    from transformers import AutoTokenizer

    from workloads.mask_inspect import token_texts
    from workloads.segment_codes import Segment
    from workloads.synthetic_common import COLORS, SHAPES

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    content, function = [], []
    for row in _shard_rows(prepared):
        for text, segment, value in zip(token_texts(tokenizer, row["input_ids"]), row["segments"], row["relevance"]):
            word = text.strip().lower()
            if segment == int(Segment.INSTRUCTION) and word in set(COLORS) | set(SHAPES):
                content.append(value)
            elif segment == int(Segment.INSTRUCTION) and word in FUNCTION_WORDS:
                function.append(value)
    return content, function


def test_relevance_is_high_on_image_words_for_a_model_that_looks_and_zero_for_one_that_never_saw_images(scored):
    looked_content, looked_function = _relevance_by_word(scored["looked"], scored["model_dir"])
    blind_content, blind_function = _relevance_by_word(scored["blind"], scored["model_dir"])
    print(
        f"looked: colors/shapes {np.mean(looked_content):+.3f} ({len(looked_content)} tokens), function words "
        f"{np.mean(looked_function):+.3f} ({len(looked_function)}); never saw images: {np.mean(blind_content):+.3f}, "
        f"{np.mean(blind_function):+.3f}"
    )
    assert len(looked_content) > 100 and len(looked_function) > 300
    assert np.mean(looked_content) > 0.15 and np.mean(looked_content) > 4 * abs(np.mean(looked_function))
    assert abs(np.mean(blind_content)) < 0.05 and abs(np.mean(blind_function)) < 0.05
    assert abs(np.mean(blind_content)) < np.mean(looked_content) / 5


def test_shards_carry_float16_relevance_on_the_instruction_side_only(scored):
    import pyarrow.dataset as pads

    from workloads.segment_codes import INSTRUCTION_SEGMENTS, Segment

    schema = pads.dataset(scored["looked"].shards, format="parquet").schema
    assert schema.field("relevance").type.value_type.bit_width == 16
    assert "relevance" not in pads.dataset(scored["plain"].shards, format="parquet").schema.names
    for row in _shard_rows(scored["looked"])[:50]:
        segments, relevance = np.asarray(row["segments"]), np.asarray(row["relevance"], np.float32)
        assert len(relevance) == len(segments)
        assert not relevance[~np.isin(segments, [int(s) for s in INSTRUCTION_SEGMENTS])].any()
        assert np.abs(relevance[segments == int(Segment.SYSTEM)]).max() < 1e-3  # before the image: nothing to see


def test_the_key_holds_the_reference_model_and_preparing_again_is_a_no_op(scored):
    paths = {scored["plain"].path, scored["looked"].path, scored["blind"].path}
    assert len(paths) == 3, "each reference model has its own prepared folder"
    assert scored["again"].path == scored["looked"].path
    assert scored["again"].manifest == scored["looked"].manifest, "not scored again"
    entry = scored["looked"].manifest["relevance"]
    assert entry["rows_scored"] == scored["looked"].manifest["rows_written"] and entry["rows_unscored"] == 0
    assert entry["seconds"] > 0 and entry["rows_per_s"] > 0
    assert entry["by_segment"]["instruction"]["tokens"] > 0
    print(f"scoring: {entry['rows_scored']} rows in {entry['seconds']:.1f} s ({entry['rows_per_s']} rows/s)")


def test_l2t_visual_trains_through_ray_train_and_deepspeed(scored):
    from transformers import AutoModelForImageTextToText

    result = scored["fit"]
    steps = [row for row in result.history if "loss" in row]
    assert max(int(r["step"]) for r in steps) == 3
    assert all(np.isfinite(r["loss"]) and r["trained_tokens"] > 0 for r in steps)
    AutoModelForImageTextToText.from_pretrained(result.model_dir)


def test_stats_and_the_mask_example_show_the_relevance(scored, tmp_path):
    from typer.testing import CliRunner

    from orchestrator.cli import app
    from orchestrator.mask_examples import mask_example_html

    output = CliRunner().invoke(app, ["data", "stats", scored["looked"].path]).output
    assert "relevance: instruction" in output and "relevance: scoring" in output
    cfg = scored["looked_cfg"]
    page = Path(mask_example_html(cfg, scored["looked"], scored["model_dir"], str(tmp_path / "m.html"))).read_text()
    assert "relevance +" in page and "Visual relevance" in page
