"""`l2t data prepare` on Ray over a file that mixes every kind of bad row with good ones (tests/bad_rows.py)."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow.parquet as pq
import pytest
import yaml
from bad_rows import MAX_ROW_BYTES, write_mixed_file
from typer.testing import CliRunner

pytestmark = pytest.mark.ray


def test_prepare_quarantines_every_kind_of_bad_row_with_its_reason(ray_cluster, tiny_model_dir, tmp_path, monkeypatch):
    from orchestrator import readers
    from orchestrator.cli import app

    mixed = write_mixed_file(tmp_path / "data")
    assert len(mixed.kinds) >= 30
    config = tmp_path / "experiment.yaml"
    data = {
        "sources": [str(mixed.path)],
        "image_root": str(mixed.image_root),
        "chat_template": "vicuna_v1",
        "max_length": 128,
        "max_bad_fraction": 0.5,
        "max_row_bytes": MAX_ROW_BYTES,
        "duplicate_ids": "quarantine",
    }
    raw = {"data": data, "model": {"name_or_path": tiny_model_dir}, "storage": {"path": str(tmp_path / "runs")}}
    config.write_text(yaml.safe_dump(raw))
    monkeypatch.setattr(readers, "MIN_ROWS_PER_BLOCK", 16)  # several blocks: duplicates across them
    monkeypatch.setattr(readers, "MAX_ROWS_PER_BLOCK", 16)
    result = CliRunner().invoke(app, ["data", "prepare", str(config)])
    assert result.exit_code == 0, result.output
    (manifest_file,) = (tmp_path / "runs").rglob("manifest.json")
    folder = manifest_file.parent
    manifest = json.loads(manifest_file.read_text())
    assert manifest["rows_in"] == len(mixed.good) + len(mixed.bad)
    assert manifest["rows_written"] == len(mixed.good) and manifest["rows_quarantined"] == len(mixed.bad)
    assert manifest["quarantined_by_reason"] == dict(sorted(Counter(r for _, r in mixed.bad.values()).items()))
    assert manifest["duplicate_ids"] == {"mode": "quarantine", "ids": 1, "extra_rows": 1, "examples": ["dup-1"]}
    assert manifest["rows_per_block"] == 16

    shards = pq.read_table(f"{folder}/shards")
    assert shards.column("id").to_pylist() == mixed.good, "every good row is written, in input order"
    assert not any(str(mixed.outside) in image for images in shards.column("images").to_pylist() for image in images)
    quarantine = pq.read_table(f"{folder}/quarantine").to_pylist()
    assert {row["id"]: row["reason"] for row in quarantine} == {k: reason for k, (_, reason) in mixed.bad.items()}
    for row in quarantine:
        assert row["source"] == str(mixed.path) and row["line"] >= 1 and row["message"] and row["raw"], row
    (duplicate,) = [row for row in quarantine if row["reason"] == "duplicate_id"]
    first_line = next(i for i, line in enumerate(mixed.path.read_bytes().splitlines(), 1) if b'"dup-1"' in line)
    assert f"first at mixed.jsonl:{first_line}" in duplicate["message"] and duplicate["line"] > first_line
