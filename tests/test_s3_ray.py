"""`l2t data prepare` against a real S3 API: moto's server on loopback, Ray Data reading and writing through it.

The server is the session's (`s3_endpoint` in conftest.py), in the environment
the session's Ray cluster started with: the workers reach it through their own
AWS chain, never through keys that l2t hands them.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import experiment_config

pytestmark = pytest.mark.ray

BUCKET = "l2t-test"


@pytest.fixture(scope="module")
def s3(ray_cluster, s3_endpoint):
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    return client


@pytest.fixture(scope="module")
def s3_data(s3, synthetic_data):
    """60 synthetic rows with their images, plus a missing, an escaping and a corrupt image, in the bucket."""
    root = Path(synthetic_data.image_root)
    good = Path(synthetic_data.train_file).read_text().splitlines()[:60]
    for line in good:
        image = json.loads(line)["image"]
        s3.put_object(Bucket=BUCKET, Key=f"data/{image}", Body=(root / image).read_bytes())
    s3.put_object(Bucket=BUCKET, Key="data/images/corrupt.png", Body=b"\x89PNG\r\n\x1a\nnot really")
    s3.put_object(Bucket=BUCKET, Key="secret.png", Body=(root / json.loads(good[0])["image"]).read_bytes())

    def row(row_id, image):
        turns = [{"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": "Red"}]
        return json.dumps({"id": row_id, "image": image, "conversations": turns})

    bad = [row("missing", "images/nope.png"), row("escape", "../secret.png"), row("corrupt", "images/corrupt.png")]
    s3.put_object(Bucket=BUCKET, Key="data/train.jsonl", Body=("\n".join(good[:30] + bad + good[30:]) + "\n").encode())
    return f"s3://{BUCKET}/data"


def _keys(s3, prefix: str) -> dict[str, object]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {obj["Key"]: obj["LastModified"] for page in pages for obj in page.get("Contents", [])}


def test_prepare_reads_and_writes_through_s3(s3, s3_data, tiny_model_dir):
    from orchestrator.prepare import PreparedData, prepare

    cfg = experiment_config(
        f"s3://{BUCKET}/out",
        data={"sources": [f"{s3_data}/train.jsonl"], "image_root": s3_data, "synthetic": None, "max_bad_fraction": 0.1},
    )
    lines: list[str] = []
    prepared = prepare(cfg, tiny_model_dir, progress=lines.append)
    assert prepared.path.startswith(f"s3://{BUCKET}/out/prepared/")
    m = prepared.manifest
    assert (m["rows_in"], m["rows_written"], m["rows_quarantined"]) == (63, 60, 3)
    assert m["quarantined_by_reason"] == {"corrupt_image": 1, "image_outside_root": 1, "missing_image": 1}
    assert any("validated 63 rows" in line for line in lines)

    prefix = prepared.path[len(f"s3://{BUCKET}/") :] + "/"
    written = _keys(s3, prefix)
    manifest_key = prefix + "manifest.json"
    assert json.loads(s3.get_object(Bucket=BUCKET, Key=manifest_key)["Body"].read())["key"] == m["key"]
    assert prefix + "task_templates.json" in written
    shard_keys = [k for k in written if k.startswith(prefix + "shards/") and k.endswith(".parquet")]
    shards = [pq.read_table(io.BytesIO(s3.get_object(Bucket=BUCKET, Key=k)["Body"].read())) for k in shard_keys]
    assert sum(t.num_rows for t in shards) == 60
    assert all(
        image.startswith("images/syn-") for t in shards for images in t.column("images").to_pylist() for image in images
    )
    quarantine_keys = [k for k in written if k.startswith(prefix + "quarantine/") and k.endswith(".parquet")]
    quarantined = [
        r
        for k in quarantine_keys
        for r in pq.read_table(io.BytesIO(s3.get_object(Bucket=BUCKET, Key=k)["Body"].read())).to_pylist()
    ]
    assert {r["id"]: r["reason"] for r in quarantined} == {
        "missing": "missing_image",
        "escape": "image_outside_root",
        "corrupt": "corrupt_image",
    }
    assert all(r["source"] == f"{s3_data}/train.jsonl" and r["line"] in (31, 32, 33) for r in quarantined)

    # Preparing again is a no-op: same folder, nothing rewritten.
    again = prepare(cfg, tiny_model_dir, progress=None)
    assert again.path == prepared.path and again.manifest == m
    assert _keys(s3, prefix) == written
    assert PreparedData.load(prepared.path).manifest["rows_written"] == 60
