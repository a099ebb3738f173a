"""Ray Data preparation of mixed inputs (JSON array, messages JSONL, Parquet) split over many blocks, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import experiment_config
from typer.testing import CliRunner

pytestmark = pytest.mark.ray


def _messages(record: dict) -> dict:
    """A LLaVA record in OpenAI messages form (image part first, as LLaVA puts <image> first)."""
    messages = []
    for turn in record["conversations"]:
        text = turn["value"]
        if turn["from"] == "human":
            content = (
                [{"type": "image"}, {"type": "text", "text": text.replace("<image>\n", "")}]
                if "<image>" in text
                else text
            )
            messages.append({"role": "user", "content": content})
        else:
            messages.append({"role": "assistant", "content": text})
    return {"id": record["id"], "messages": messages, "images": [record["image"]]}


@pytest.fixture(scope="module")
def mixed_sources(synthetic_data, tmp_path_factory):
    """300 good rows spread over three formats, with bad rows of each kind; returns (files, good ids, bad ids)."""
    out = tmp_path_factory.mktemp("mixed")
    records = [json.loads(line) for line in Path(synthetic_data.train_file).read_text().splitlines()[:300]]
    ok_image = records[0]["image"]

    json_rows = records[:100] + [
        {"id": "json-missing", "image": "images/nope.png", "conversations": records[0]["conversations"]}
    ]
    (out / "a.json").write_text(json.dumps(json_rows, indent=1))

    messages = [json.dumps(_messages(r)) for r in records[100:200]]
    messages.insert(
        50,
        json.dumps(
            {
                "id": "msg-empty-turn",
                "images": [ok_image],
                "messages": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
                    {"role": "assistant", "content": "  "},
                ],
            }
        ),
    )
    messages.insert(10, '{"id": "msg-malformed", "messages": [')
    (out / "b.jsonl").write_text("\n".join(messages) + "\n")

    parquet_rows = [dict(r) for r in records[200:300]]
    parquet_rows.insert(
        20, {"id": "pq-order", "image": ok_image, "conversations": list(reversed(records[0]["conversations"]))}
    )
    table = pa.Table.from_pylist(parquet_rows)
    pq.write_table(table, out / "c.parquet", row_group_size=32)

    good = [r["id"] for r in records]
    bad = {
        "json-missing": ("missing_image", 101),
        "msg-malformed": ("malformed_json", 11),
        "msg-empty-turn": ("empty_turn", 52),
        "pq-order": ("wrong_role_order", 21),
    }
    return [str(out / "a.json"), str(out / "b.jsonl"), str(out / "c.parquet")], good, bad


@pytest.fixture(scope="module")
def mixed_prepared(ray_cluster, mixed_sources, synthetic_data, tiny_model_dir, tmp_path_factory):
    """One preparation of the mixed sources, in blocks of 40 rows: each file spreads over several tasks."""
    from orchestrator import prepare as prepare_module
    from orchestrator import readers

    files, _, _ = mixed_sources
    storage = tmp_path_factory.mktemp("mixed-out")
    cfg = experiment_config(
        storage,
        data={
            "sources": files,
            "image_root": str(synthetic_data.image_root),
            "synthetic": None,
            "max_bad_fraction": 0.05,
        },
    )
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(readers, "MIN_ROWS_PER_BLOCK", 40)
        patch.setattr(readers, "MAX_ROWS_PER_BLOCK", 40)
        prepared = prepare_module.prepare(cfg, tiny_model_dir, progress=lines.append)
    return cfg, prepared, lines


def test_mixed_formats_over_many_blocks_lose_nothing(mixed_prepared, mixed_sources):
    files, good, bad = mixed_sources
    cfg, prepared, lines = mixed_prepared
    m = prepared.manifest
    assert (m["rows_in"], m["rows_written"], m["rows_quarantined"]) == (304, 300, 4)
    assert m["quarantined_by_reason"] == {
        "empty_turn": 1,
        "malformed_json": 1,
        "missing_image": 1,
        "wrong_role_order": 1,
    }
    assert m["rows_per_block"] == 40

    shards = pq.read_table(prepared.shards)
    assert shards.column("id").to_pylist() == good, "every good row is written, in input order"
    quarantine = pq.read_table(prepared.quarantine).to_pylist()
    by_id = {r["id"]: r for r in quarantine}
    assert {k: (v["reason"], v["line"]) for k, v in by_id.items()} == {
        ("b.jsonl:11" if k == "msg-malformed" else k): v for k, v in bad.items()
    }
    assert by_id["pq-order"]["source"] == files[2] and json.loads(by_id["pq-order"]["raw"])["id"] == "pq-order"
    assert len(list(Path(prepared.shards).glob("*.parquet"))) > 3, "blocks were encoded and written in parallel"

    # The messages rows render and segment exactly like their LLaVA originals.
    from orchestrator.prepare import PreparedData

    assert PreparedData.load(prepared.path).manifest == m
    assert m["tokens_by_segment"]["image"] == 300 * m["num_image_tokens"]
    for stage in ("validated 304 rows", "task templates:", "tokenized and segmented 300 rows", "done in"):
        assert any(stage in line for line in lines), f"progress names the stage {stage!r}: {lines}"


def test_cli_prepare_reuses_the_output_and_fails_above_the_bad_share(mixed_prepared, tiny_model_dir, tmp_path):
    """The same data and settings from a YAML file: the CLI finds the folder prepared above (the bad-row
    limit is not part of its key) and judges it."""
    from orchestrator.cli import app

    cfg, prepared, _ = mixed_prepared
    data = {k: v for k, v in cfg.data.model_dump(mode="json").items() if k not in ("synthetic", "eval_file")}
    config = tmp_path / "experiment.yaml"
    config.write_text(
        yaml.safe_dump({"data": data, "model": {"name_or_path": tiny_model_dir}, "storage": cfg.storage.model_dump()})
    )
    runner = CliRunner()
    result = runner.invoke(app, ["data", "prepare", str(config)])
    assert result.exit_code == 0, result.output
    assert "rows_written" in result.output and prepared.manifest["key"] in result.output

    strict = runner.invoke(app, ["data", "prepare", str(config), "data.max_bad_fraction=0.001"])
    assert strict.exit_code == 1
    message = " ".join(strict.output.split())
    assert "4 of 304 rows" in message and "missing_image: 1" in message and "wrong_role_order: 1" in message
    assert "quarantine" in message
