"""`masking.mode=l2t_visual`: instruction weights λ_I · g(relevance), in the loss, in configs, in the inspector.

The weights are checked on the path the training step takes (`with_weight_scales`, `collate`, padded and
packed, `weights_from_table` with the step's table) against g computed by hand, and through one real step of
`run_training` (DeepSpeed, one rank): the step trains exactly the tokens g keeps.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from workloads.segment_codes import MASKING_MODES, Segment, segment_weight_table, token_shares, weights_from_table
from workloads.visual_relevance import (
    WEIGHT_SCALE,
    RelevanceHistogram,
    gains,
    token_relevance,
    transform,
    with_weight_scales,
)

S = Segment
# one row: BOS, system, role, image, instruction x4, task template, role, response x2, end of turn
ROW_SEGMENTS = np.array(
    [S.SYSTEM, S.SYSTEM, S.ROLE, S.IMAGE, *[S.INSTRUCTION] * 4, S.TASK_TEMPLATE, S.ROLE, S.RESPONSE, S.RESPONSE]
    + [S.END_OF_TURN],
    np.int8,
)
ROW_RELEVANCE = np.array([0, 0.3, -0.2, 0, 2.0, -0.5, 0.5, 0.0, 0.9, 0.1, 0, 0, 0], np.float16)
INSTRUCTION_R = [2.0, -0.5, 0.5, 0.0]


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# g by hand for the row's instruction tokens (r = 2, -0.5, 0.5, 0), τ = 0.5
EXPECTED_G = {
    "clip": [1.0, 0.0, 1.0, 0.0],  # clip(r / 0.5, 0, 1)
    "sigmoid": [_sigmoid(4.0), _sigmoid(-1.0), _sigmoid(1.0), _sigmoid(0.0)],
    "rank": [1.0, 0.0, 2 / 3, 1 / 3],  # ranks 3, 0, 2, 1 of 0..3
}


def test_transforms_by_hand():
    r = np.array(INSTRUCTION_R, np.float32)
    for kind, want in EXPECTED_G.items():
        assert transform(r, kind, 0.5).tolist() == pytest.approx(want, abs=1e-6), kind
    assert transform(np.array([1.0, 1.0, 3.0, 1.0]), "rank").tolist() == pytest.approx([1 / 3, 1 / 3, 1.0, 1 / 3])
    assert transform(np.array([-4.0]), "rank").tolist() == [1.0]  # a lone token keeps its weight
    with pytest.raises(ValueError, match="masking.visual.transform='cube'"):
        transform(r, "cube")


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("kind", ["clip", "sigmoid", "rank"])
def test_loss_weights_are_lambda_i_times_g_of_the_stored_relevance(kind, packing):
    from workloads.config import MaskingConfig
    from workloads.micro_batch import collate
    from workloads.schedules import masking_weight_table

    masking = MaskingConfig(mode="l2t_visual", lambda_instruction=0.5, lambda_response=2.0)
    masking.visual.transform, masking.visual.temperature, masking.visual.floor = kind, 0.5, 0.1
    short = ROW_SEGMENTS[:4].copy()  # a second row without instruction tokens: all factors 1
    batch = {
        "input_ids": [np.arange(len(ROW_SEGMENTS), dtype=np.int32), np.arange(4, dtype=np.int32)],
        "segments": [ROW_SEGMENTS, short],
        "pixel_values": [np.zeros((0,), np.float32)] * 2,
        "relevance": [ROW_RELEVANCE.astype(np.float32), np.zeros(4, np.float32)],
    }
    tensors = collate(with_weight_scales(batch, masking), 0, torch.device("cpu"), packing=packing)
    weights = weights_from_table(tensors["segments"], masking_weight_table(masking, 0, 10), tensors[WEIGHT_SCALE])
    flat_segments, flat_weights = tensors["segments"].reshape(-1), weights.reshape(-1)
    got = flat_weights[flat_segments == int(S.INSTRUCTION)].tolist()
    want = [0.5 * max(0.1, g) for g in EXPECTED_G[kind]]
    assert got == pytest.approx(want, abs=1e-6)
    # every other token keeps its segment's weight (l2t's: λ_A on the response side, 0 elsewhere)
    plain = weights_from_table(tensors["segments"], segment_weight_table("l2t", 0.5, 2.0)).reshape(-1)
    others = flat_segments != int(S.INSTRUCTION)
    assert torch.equal(flat_weights[others], plain[others])


def test_overrides_and_floor_one():
    from workloads.config import MaskingConfig

    masking = MaskingConfig(mode="l2t_visual", lambda_instruction=0.5, weights={"instruction": 3.0})
    batch = {"segments": [ROW_SEGMENTS], "relevance": [ROW_RELEVANCE]}
    scale = with_weight_scales(batch, masking)[WEIGHT_SCALE][0]
    table = segment_weight_table(masking.mode, 0.5, 1.0, masking.weights.model_dump())
    weights = weights_from_table(ROW_SEGMENTS, table, scale)
    # the override replaces λ_I in λ_I · g: clip(r / 1, 0, 1) = 1, 0, 0.5, 0
    assert weights[ROW_SEGMENTS == S.INSTRUCTION].tolist() == pytest.approx([3.0, 0.0, 1.5, 0.0])
    assert np.array_equal(gains(ROW_SEGMENTS, ROW_RELEVANCE, "clip", 1.0, 1.0), np.ones(len(ROW_SEGMENTS)))


def test_l2t_visual_without_relevance_names_the_key_to_set():
    from workloads.config import MaskingConfig

    with pytest.raises(ValueError, match="set data.relevance.reference_model and prepare again"):
        with_weight_scales({"segments": [ROW_SEGMENTS]}, MaskingConfig(mode="l2t_visual"))
    unchanged = {"segments": [ROW_SEGMENTS]}
    assert with_weight_scales(unchanged, MaskingConfig(mode="l2t")) is unchanged


def test_configs_load_and_reject_unknown_keys(tmp_path):
    from orchestrator.config import ConfigError, config_from_dict

    base = {"data": {"sources": ["x.jsonl"], "relevance": {"reference_model": "ref", "concurrency": 2}}}
    cfg = config_from_dict({**base, "masking": {"mode": "l2t_visual", "visual": {"transform": "sigmoid"}}})
    assert (cfg.masking.visual.transform, cfg.masking.visual.temperature, cfg.masking.visual.floor) == (
        "sigmoid",
        1.0,
        0.0,
    )
    assert cfg.data.relevance.reference_model == "ref" and cfg.data.relevance.batch_size == 16
    bad = [
        ({**base, "masking": {"visual": {"temprature": 2.0}}}, "temprature"),
        ({"data": {"sources": ["x"], "relevance": {"reference_model": "r", "gpu": True}}}, "gpu"),
        ({"data": {"sources": ["x"], "relevance": {}}}, "reference_model"),
        ({**base, "masking": {"visual": {"transform": "cube"}}}, "transform"),
        ({**base, "masking": {"visual": {"floor": 1.5}}}, "floor"),
        ({"data": {"sources": ["x"]}, "masking": {"mode": "l2t_visual"}}, "data.relevance.reference_model"),
    ]
    for raw, key in bad:
        with pytest.raises(ConfigError, match=key):
            config_from_dict(raw)


def test_every_mode_has_a_table_and_token_shares_skip_the_visual_one():
    assert MASKING_MODES[-2:] == ("l2t", "l2t_visual")
    assert np.array_equal(segment_weight_table("l2t_visual", 0.5, 2.0), segment_weight_table("l2t", 0.5, 2.0))
    shares = token_shares({"instruction": 10, "response": 5, "system": 3})
    assert "l2t_visual" not in shares and shares["l2t"]["trained"] == 15


def test_relevance_is_the_log_prob_difference_on_the_instruction_side_only():
    with_image = np.arange(len(ROW_SEGMENTS), dtype=np.float32) * -0.1
    null = np.full(len(ROW_SEGMENTS), -0.5, np.float32)
    r = token_relevance(with_image, null, ROW_SEGMENTS)
    assert r.dtype == np.float16
    side = np.isin(ROW_SEGMENTS, [S.SYSTEM, S.ROLE, S.INSTRUCTION, S.TASK_TEMPLATE])
    side[0] = False  # the first token is never a target
    assert np.allclose(r[side], (with_image - null)[side], atol=1e-3)
    assert not r[~side].any()


def test_histogram_quantiles_and_merge():
    rng = np.random.default_rng(0)
    values = rng.normal(0.5, 1.0, 4000)
    a, b = RelevanceHistogram(), RelevanceHistogram()
    a.add_values("instruction", values[:1000])
    b.add_values("instruction", values[1000:])
    a.merge(RelevanceHistogram.from_dict(json.loads(json.dumps(b.to_dict()))))
    summary = a.summary()["instruction"]
    assert summary["tokens"] == 4000 and summary["mean"] == pytest.approx(values.mean(), abs=1e-4)
    for q in (0.05, 0.5, 0.95):
        assert summary[f"q{round(q * 100):02d}"] == pytest.approx(np.quantile(values, q), abs=0.02)


def test_the_inspector_shows_relevance_and_the_visual_weights(tiny_model_dir):
    from transformers import AutoTokenizer

    from workloads.config import MaskingConfig
    from workloads.mask_inspect import inspect_rows, to_html, to_json
    from workloads.segments import EncodedRow

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    row = EncodedRow(np.arange(5, 5 + len(ROW_SEGMENTS), dtype=np.int32), ROW_SEGMENTS, False, 0)
    visual = MaskingConfig().visual
    rows = inspect_rows([("r0", row)], tokenizer, "l2t_visual", 0.5, 1.0, relevance=[ROW_RELEVANCE], visual=visual)
    tokens = json.loads(to_json(rows))[0]["tokens"]
    assert [t["relevance"] for t in tokens] == pytest.approx(ROW_RELEVANCE.astype(float).tolist(), abs=1e-3)
    instruction = [t["weight"] for t in tokens if t["segment"] == "instruction"]
    assert instruction == pytest.approx([0.5, 0.0, 0.25, 0.0])  # λ_I · clip(r, 0, 1)
    page = to_html(rows)
    assert "relevance +2.000" in page and "rgba(229, 57, 53, 1.00)" in page and "Visual relevance" in page
    with pytest.raises(ValueError, match="data.relevance"):
        inspect_rows([("r0", row)], tokenizer, "l2t_visual")
    plain = inspect_rows([("r0", row)], tokenizer, "l2t")
    assert "relevance" not in plain[0]["tokens"][0] and "Visual relevance" not in to_html(plain)


def test_one_training_step_trains_exactly_the_tokens_g_keeps(synthetic_data, tiny_model_dir):
    """A real step of `run_training` (DeepSpeed ZeRO-2, one rank) under l2t_visual with clip and no floor: the
    step's trained tokens N are the response side plus the instruction tokens with r > 0, nothing else."""
    from pathlib import Path

    from PIL import Image
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    from orchestrator.config import config_from_dict
    from workloads.conversations import parse_record
    from workloads.model import num_image_tokens
    from workloads.segments import EncodeSpec, encode_conversations
    from workloads.train_loop import run_training

    tokenizer, processor = (
        AutoTokenizer.from_pretrained(tiny_model_dir),
        AutoImageProcessor.from_pretrained(tiny_model_dir),
    )
    records = [json.loads(line) for line in Path(synthetic_data.train_file).read_text().splitlines()[:8]]
    conversations = [parse_record(r) for r in records]
    spec = EncodeSpec("vicuna_v1", num_image_tokens(AutoConfig.from_pretrained(tiny_model_dir)), 128)
    rng = np.random.default_rng(0)
    rows = []
    for conversation, encoded in zip(conversations, encode_conversations(conversations, tokenizer, spec)):
        image = Image.open(Path(synthetic_data.image_root, conversation.images[0])).convert("RGB")
        pixels = processor(images=[image], return_tensors="np")["pixel_values"].astype(np.float32)
        relevance = rng.normal(0.0, 1.0, len(encoded.segments)).astype(np.float16).astype(np.float32)
        rows.append({"input_ids": encoded.input_ids, "segments": encoded.segments, "pixel_values": pixels,
                     "relevance": relevance})  # fmt: skip
    cfg = config_from_dict(
        {
            "data": {"sources": ["rows-in-memory.jsonl"], "relevance": {"reference_model": tiny_model_dir}},
            "model": {"name_or_path": tiny_model_dir},
            "masking": {"mode": "l2t_visual", "lambda_instruction": 0.5},
            "train": {"max_steps": 1, "micro_batch_size": 8, "num_workers": 1, "log_every": 1, "torch_threads": 1},
        }
    )
    reports = []
    run_training(
        cfg,
        lambda epoch, skip: iter([{key: [r[key] for r in rows] for key in rows[0]}]),
        lambda metrics, checkpoint: reports.append(metrics),
        rows=8,
        deepspeed_config={"zero_optimization": {"stage": 2}},
        export_model=False,
    )
    want = 0
    for row in rows:
        segments, relevance = np.asarray(row["segments"])[1:], row["relevance"][1:]
        want += int(np.isin(segments, [S.RESPONSE, S.END_OF_TURN]).sum())
        want += int(((segments == S.INSTRUCTION) & (relevance > 0)).sum())
    instruction = sum(int((np.asarray(r["segments"])[1:] == S.INSTRUCTION).sum()) for r in rows)
    assert reports[-1]["trained_tokens"] == want
    assert want < instruction + sum(
        int(np.isin(np.asarray(r["segments"]), [S.RESPONSE, S.END_OF_TURN]).sum()) for r in rows
    )


def test_data_inspect_scores_the_shown_rows_with_the_reference_model(synthetic_data, tiny_model_dir, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from orchestrator.cli import app

    config = tmp_path / "visual.yaml"
    data = {"sources": [str(synthetic_data.train_file)], "image_root": str(synthetic_data.image_root)}
    data.update(chat_template="vicuna_v1", max_length=128, relevance={"reference_model": tiny_model_dir})
    raw = {"data": data, "model": {"name_or_path": tiny_model_dir}, "masking": {"mode": "l2t_visual"}}
    config.write_text(yaml.safe_dump({**raw, "storage": {"path": str(tmp_path / "runs")}}))

    def invoke(*args):
        result = CliRunner().invoke(
            app, ["data", "inspect", str(synthetic_data.train_file), "--config", str(config), *args]
        )
        assert result.exit_code == 0, result.output
        return result.stdout

    rows = json.loads(invoke("--format", "json", "--limit", "2"))
    tokens = [t for row in rows for t in row["tokens"]]
    instruction = [t for t in tokens if t["segment"] == "instruction"]
    assert instruction and all("relevance" in t for t in tokens)
    assert any(t["relevance"] != 0 for t in instruction), "an untrained model's image still moves its predictions"
    assert all(t["relevance"] == 0 for t in tokens if t["segment"] in ("image", "response", "pad"))
    for t in instruction:  # λ_I = 1, clip(r / 1, 0, 1), up to the float16 the JSON's value was rounded from
        assert t["weight"] == pytest.approx(min(max(t["relevance"], 0.0), 1.0), abs=1e-3)
    assert "Visual relevance" in invoke("--format", "html", "--limit", "1")


def test_the_prepared_key_names_the_reference_model_by_its_files(tmp_path):
    from orchestrator.config import config_from_dict
    from orchestrator.prepare import preparation_inputs
    from orchestrator.relevance import model_identity

    reference = tmp_path / "reference"
    reference.mkdir()
    (reference / "config.json").write_text("{}")
    (reference / "model.safetensors").write_bytes(b"weights one")
    source = tmp_path / "train.jsonl"
    source.write_text("{}\n")

    def key(**relevance):
        data = {"sources": [str(source)], **({"relevance": relevance} if relevance else {})}
        return json.dumps(preparation_inputs(config_from_dict({"data": data}), [str(source)], str(tmp_path)))

    plain, scored = key(), key(reference_model=str(reference))
    assert plain != scored and key(reference_model=str(reference), concurrency=3, batch_size=2) == scored
    (reference / "model.safetensors").write_bytes(b"weights two")  # retrained: scored again
    assert key(reference_model=str(reference)) != scored
    assert model_identity("no-such-org/no-such-model") == {"name": "no-such-org/no-such-model", "files": None}
