"""One bad row, path or setting never crashes a stage: regressions of the hardening issue, without Ray.

Each numbered test is the input that showed the problem:
1 invalid UTF-8 in the tiny tokenizer's corpus, 2 a NUL byte in an image path,
3 a PNG with sound checksums and garbage pixels, 4 an escaping symlink with
image checks off, 5 duplicate ids, 6 model.name_or_path, 7 train.deepspeed,
8 a URL-looking storage.path, 9 credentials in tracking.uri (10, the cluster
configs, is tests/test_infra.py). Then the mixed file of every kind of bad
row through preparation's row functions, and the training ingest surviving
images that break after preparation.
"""

from __future__ import annotations

import http.server
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from bad_rows import MAX_ROW_BYTES, garbage_png, llava, prepare_rows, write_mixed_file
from conftest import experiment_config
from PIL import Image
from typer.testing import CliRunner

from orchestrator.validation import validate_rows


def _batch(lines, source="data.jsonl"):
    return pa.table(
        {
            "source": pa.array([source] * len(lines), pa.string()),
            "line": pa.array(np.arange(1, len(lines) + 1), pa.int64()),
            "raw": pa.array(lines, pa.string()),
            "error": pa.array([None] * len(lines), pa.string()),
        }
    )


def _reasons(lines, image_root, check_images="decode"):
    out = validate_rows(_batch(lines), "auto", image_root, check_images).to_pydict()
    return dict(zip(out["id"], out["reason"]))


@pytest.fixture()
def root(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(images / "ok.png")
    (images / "garbage.png").write_bytes(garbage_png())
    (tmp_path / "outside.png").write_bytes((images / "ok.png").read_bytes())
    (images / "escape.png").symlink_to(tmp_path / "outside.png")
    return images


# ---------------------------------------------------------------- 1-5: rows


def test_1_invalid_utf8_does_not_crash_the_tiny_tokenizer_corpus(tmp_path):
    from orchestrator.inputs import tokenizer_corpus

    data = tmp_path / "train.jsonl"
    data.write_bytes(
        json.dumps(llava("a", "x.png")).encode() + b"\n\xff\xfe not utf-8\n" + json.dumps(llava("b", "y.png")).encode()
    )
    texts = list(tokenizer_corpus([str(data)], "vicuna_v1"))
    assert len(texts) == 2 and all("What color" in t for t in texts), "the bad line is left out, the rest kept"
    array = tmp_path / "train.json"  # JSON arrays are read as records too, not line by line
    array.write_text(json.dumps([llava("c", "x.png"), {"broken": True}]))
    assert len(list(tokenizer_corpus([str(array)], "tokenizer"))) == 2  # c's two turns


def test_2_a_nul_byte_in_an_image_path_is_a_bad_row(root):
    lines = [json.dumps(llava("nul", "ok.png\x00.txt")), json.dumps(llava("good", "ok.png"))]
    for mode in ("decode", "header", "off"):
        assert _reasons(lines, str(root), mode) == {"nul": "invalid_image_path", "good": ""}


def test_3_a_png_with_sound_checksums_and_garbage_pixels_is_caught_by_decoding(root):
    from orchestrator.images import check_image

    lines = [json.dumps(llava("garbage", "garbage.png"))]
    assert _reasons(lines, str(root)) == {"garbage": "corrupt_image"}, "decode is the default"
    assert "broken data stream" in check_image("garbage.png", str(root))[1]
    assert _reasons(lines, str(root), "header") == {"garbage": ""}, "verify() alone passes it: why decode is default"
    from orchestrator.config import DataConfig

    assert DataConfig(sources=["x"]).check_images == "decode"
    assert DataConfig(sources=["x"], check_images=True).check_images == "decode"
    assert DataConfig(sources=["x"], check_images=False).check_images == "off"
    with pytest.raises(ValueError):
        DataConfig(sources=["x"], check_images="maybe")


def test_4_an_escaping_symlink_is_refused_with_image_checks_off(root):
    lines = [json.dumps(llava("escape", "escape.png")), json.dumps(llava("absent", "never-written.png"))]
    assert _reasons(lines, str(root), "off") == {"escape": "image_outside_root", "absent": ""}
    assert _reasons(lines, str(root), False) == {"escape": "image_outside_root", "absent": ""}, "the old boolean"


def test_4b_resolved_folders_kept_between_paths_confine_as_a_full_resolve_does(tmp_path):
    from orchestrator.images import ImagePathError, confined_path

    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "a" / "b").mkdir(parents=True)
    outside.mkdir()
    (root / "a" / "b" / "x.png").write_bytes(b"x")
    (outside / "y.png").write_bytes(b"y")
    (root / "a" / "link.png").symlink_to(outside / "y.png")  # a file leaving the root
    (root / "a" / "inner.png").symlink_to(root / "a" / "b" / "x.png")  # a file staying inside
    (root / "out").symlink_to(outside)  # a folder leaving the root
    (root / "in").symlink_to(root / "a")  # a folder staying inside
    images = ["a/b/x.png", "a/link.png", "a/inner.png", "out/y.png", "in/b/x.png", "in/link.png", "a/missing.png",
              "x.png", "a/./b/x.png", "a/b/../b/x.png", "a\\b\\x.png", "in/b/", "../root/a/b/x.png"]  # fmt: skip

    def outcome(image, folders):
        try:
            return confined_path(str(root), image, folders)
        except ImagePathError as error:
            return error.reason

    folders: dict[str, str] = {}
    for _ in range(2):  # the second time every folder is already kept
        assert [outcome(i, folders) for i in images] == [outcome(i, None) for i in images]
    assert outcome("out/y.png", folders) == outcome("a/link.png", folders) == "image_outside_root"
    assert outcome("in/b/x.png", folders) == str((root / "a" / "b" / "x.png").resolve())


def test_5_duplicate_ids_are_counted_and_quarantined_after_the_first(tmp_path, tiny_model_dir):
    from orchestrator.validation import duplicate_report

    lines = [llava("a"), llava("b"), llava("a"), llava("c"), llava("a")]
    lines = [dict(r, conversations=[{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Yo."}]) for r in lines]
    data = b"\n".join(json.dumps(r).encode() for r in lines)
    first = {"a": ["d.jsonl", 1]}  # what the global pass finds (orchestrator.validation.first_occurrences)
    out = prepare_rows({"d.jsonl": data}, tiny_model_dir, None, first=first)
    assert out.written == ["a", "b", "c"]
    assert [(r["id"], r["line"], r["reason"]) for r in out.quarantined] == [
        ("a", 3, "duplicate_id"),
        ("a", 5, "duplicate_id"),
    ]
    assert "first at d.jsonl:1" in out.quarantined[0]["message"]
    summary, warning = duplicate_report({"a": 3}, "warn")
    assert summary == {"mode": "warn", "ids": 1, "extra_rows": 2, "examples": ["a"]}
    assert "1 ids are carried by more than one row (2 rows beyond the first" in warning and "'a'" in warning
    assert duplicate_report({}, "warn") == ({"mode": "warn", "ids": 0, "extra_rows": 0, "examples": []}, None)
    from orchestrator.config import DataConfig

    assert DataConfig(sources=["x"]).duplicate_ids == "warn"


# ---------------------------------------------------------------- 6-9: settings, before Ray starts


@pytest.fixture()
def no_ray(monkeypatch):
    """Ray must not start: the checks come first."""
    import orchestrator.cluster

    monkeypatch.setattr(orchestrator.cluster, "connect", lambda *a, **k: pytest.fail("connect() before the checks"))


def _config_file(tmp_path, **sections) -> Path:
    import yaml

    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(llava("a")) + "\n")
    raw = {
        "data": {"sources": [str(data)]},
        "storage": {"path": str(tmp_path / "runs")},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _refused(args: list[str], *words: str) -> str:
    from orchestrator.cli import app

    started = time.perf_counter()
    result = CliRunner().invoke(app, args)
    elapsed = time.perf_counter() - started
    output = result.output
    assert result.exit_code == 2, output
    assert "Traceback" not in output and result.exception is None or isinstance(result.exception, SystemExit)
    assert elapsed < 5.0, f"{elapsed:.1f} s"
    line = next(line for line in output.splitlines() if line.startswith("error:"))
    for word in words:
        assert word in line, (word, output)
    return output


@pytest.mark.parametrize("command", [["train"], ["sweep"], ["data", "prepare"]])
def test_6_a_model_path_that_does_not_exist_is_refused_by_name(tmp_path, no_ray, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    for name in ("./no-such-model", "../no-such-model", "no-such-model", "a/b/c"):
        config = _config_file(tmp_path, model={"name_or_path": name})
        _refused([*command, str(config)], "model.name_or_path", repr(name), "not found")


def test_6_model_references(tmp_path, monkeypatch):
    from orchestrator.preflight import PreflightError, model_reference

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "mine").mkdir(parents=True)
    assert model_reference("tiny") == ("tiny", "tiny")
    assert model_reference("llava-hf/llava-1.5-7b-hf") == ("hub", "llava-hf/llava-1.5-7b-hf")
    assert model_reference("models/mine") == ("local", str(tmp_path / "models" / "mine"))
    assert model_reference("./models/mine")[0] == "local"
    for name in ("./llava-hf/llava", "../x", "/nope/model", "~/nope-model", "x", "a/../b", "s3://b/m", "models"[:0]):
        with pytest.raises(PreflightError, match="model.name_or_path"):
            model_reference(name)
    (tmp_path / "file.bin").write_text("x")
    with pytest.raises(PreflightError, match="is a file"):
        model_reference("file.bin")


def test_6_resolve_model_never_tries_a_missing_relative_path_as_a_hub_id(tmp_path):
    from orchestrator.inputs import resolve_model
    from orchestrator.preflight import PreflightError

    cfg = experiment_config(tmp_path, model={"name_or_path": "./checkpoints/llava"})
    with pytest.raises(PreflightError, match="not found"):
        resolve_model(cfg)


def test_7_a_missing_deepspeed_config_is_refused_before_ray(tmp_path, no_ray):
    config = _config_file(tmp_path, train={"deepspeed": "nope.json"})
    _refused(["train", str(config)], "train.deepspeed", "'nope.json'", "not found")
    (tmp_path / "broken.json").write_text("{not json")
    config = _config_file(tmp_path, train={"deepspeed": str(tmp_path / "broken.json")})
    _refused(["train", str(config)], "train.deepspeed", "not a readable JSON file")


@pytest.mark.parametrize("url", ["http://bucket.example.com/l2t", "gs://bucket/l2t", "file:///tmp/x"])
def test_8_a_url_looking_storage_path_is_refused_by_name(tmp_path, no_ray, url):
    from orchestrator import storage

    config = _config_file(tmp_path, storage={"path": url})
    scheme = url.split("://")[0]
    _refused(["data", "prepare", str(config)], "storage.path", f"{scheme}:// is not supported")
    with pytest.raises(storage.StorageError, match="not supported"):
        storage.filesystem(url)  # and never a local folder named 'http:'
    assert not Path(f"{scheme}:").exists()


class _AuthServer(http.server.BaseHTTPRequestHandler):
    seen: list[str | None] = []

    def do_GET(self):  # noqa: N802 - the http.server API
        _AuthServer.seen.append(self.headers.get("Authorization"))
        ok = self.headers.get("Authorization") == "Basic YWxpY2U6aHVudGVyMg=="  # alice:hunter2
        self.send_response(200 if ok else 401)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_9_credentials_in_the_tracking_uri_work_and_are_never_printed(tmp_path, monkeypatch):
    from orchestrator import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    server = http.server.HTTPServer(("127.0.0.1", 0), _AuthServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    uri = f"http://alice:hunter2@127.0.0.1:{port}"
    try:
        tracking.check_reachable(uri, timeout_s=3)  # used to fail: http.client.InvalidURL (nonnumeric port)
        assert _AuthServer.seen[-1] == "Basic YWxpY2U6aHVudGVyMg=="
        with pytest.raises(tracking.TrackingError) as error:
            tracking.check_reachable(f"http://alice:wrong@127.0.0.1:{port}", timeout_s=3)
        assert "401" in str(error.value) and "wrong" not in str(error.value) and "***@" in str(error.value)
    finally:
        server.shutdown()
    cfg = experiment_config(tmp_path, tracking={"uri": "http://alice:p%40ss@mlflow.internal:5000/"})
    assert tracking.tracking_uri(cfg) == "http://mlflow.internal:5000/"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice" and os.environ["MLFLOW_TRACKING_PASSWORD"] == "p@ss"
    assert tracking.split_credentials("http://host:5000") == ("http://host:5000", None, None)
    with pytest.raises(tracking.TrackingError) as error:
        tracking.check_reachable("http://bob:hunter3@127.0.0.1:9", timeout_s=2)
    assert "hunter3" not in str(error.value) and "unreachable" in str(error.value)


def test_9_the_preflight_names_the_tracking_uri_without_its_password(tmp_path, no_ray):
    config = _config_file(tmp_path, tracking={"uri": "http://carol:s3cret@127.0.0.1:9"})
    output = _refused(["train", str(config)], "tracking.uri", "***@127.0.0.1:9", "unreachable")
    assert "s3cret" not in output
    config = _config_file(tmp_path, tracking={"uri": f"sqlite:///{tmp_path}/no/such/folder/mlflow.db"})
    _refused(["train", str(config)], "tracking.uri", "does not exist")


def test_preflight_checks_every_named_file_and_lists_every_problem(tmp_path):
    from orchestrator.config import load_config
    from orchestrator.preflight import PreflightError, preflight

    config = _config_file(tmp_path)
    assert preflight(load_config(config), timeout_s=1) == []
    bad = [
        f"data.sources=[{tmp_path}/missing.jsonl]",
        f"data.image_root={tmp_path}/no-images",
        f"data.eval_file={tmp_path}/no-eval.jsonl",
        f"masking.task_templates.file={tmp_path}/no-templates.json",
        "storage.path=gs://bucket/x",
    ]
    with pytest.raises(PreflightError) as error:
        preflight(load_config(config, bad), timeout_s=1)
    lines = str(error.value).splitlines()
    keys = ("data.sources[0]", "data.image_root", "data.eval_file", "masking.task_templates.file", "storage.path")
    assert len(lines) == len(keys) and all(any(line.startswith(k + "=") for line in lines) for k in keys), lines
    # s3:// is left to the stage that reads it; preparation does not check training's settings
    remote = ["data.sources=[s3://bucket/train.jsonl]", "data.image_root=s3://bucket/images", "train.deepspeed=x"]
    assert preflight(load_config(config, remote), training=False) == []
    warned = preflight(load_config(config, [f"tracking.uri=file://{tmp_path}/mlruns"]))
    assert warned == []


# ---------------------------------------------------------------- the mixed file, in this process


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    return write_mixed_file(tmp_path_factory.mktemp("mixed"))


class _Opened:
    """Paths this process opens while `active` (an audit hook: hooks can't be removed, so it is switched)."""

    paths: list[str] = []
    active = False
    installed = False

    @classmethod
    def hook(cls, event, args):
        if cls.active and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            cls.paths.append(os.fsdecode(args[0]))


def test_the_mixed_file_quarantines_every_bad_row_and_reads_nothing_outside_the_root(mixed, tiny_model_dir):
    assert len(mixed.kinds) >= 30, sorted(mixed.kinds)
    if not _Opened.installed:
        sys.addaudithook(_Opened.hook)
        _Opened.installed = True
    _Opened.paths.clear()
    _Opened.active = True
    try:
        out = prepare_rows(
            {str(mixed.path): mixed.path.read_bytes()},
            tiny_model_dir,
            str(mixed.image_root),
            first={"dup-1": [str(mixed.path), 1]},
        )
    finally:
        _Opened.active = False
    assert any(str(mixed.image_root) in p for p in _Opened.paths), "the hook sees the images that are read"
    outside = [p for p in _Opened.paths if str(mixed.outside) in os.path.realpath(p)]
    assert not outside, f"opened outside the image root: {outside}"
    assert out.written == mixed.good, "every good row is written, in order"
    got = {}
    for row in out.quarantined:
        got[row["id"]] = row["reason"]
        assert row["source"] == str(mixed.path) and row["line"] >= 1 and row["message"], row
    assert got == {key: reason for key, (_, reason) in mixed.bad.items()}
    assert out.rows_in == len(out.written) + len(out.quarantined)
    huge = next(r for r in out.quarantined if r["reason"] == "row_too_large")
    assert len(huge["raw"]) <= 10_000 < MAX_ROW_BYTES, "the quarantine keeps the start of a huge row"


def test_every_stage_function_survives_the_mixed_file_with_checks_off(mixed, tiny_model_dir):
    out = prepare_rows({str(mixed.path): mixed.path.read_bytes()}, tiny_model_dir, str(mixed.image_root), "off")
    assert out.rows_in == len(out.written) + len(out.quarantined)
    reasons = out.reasons
    for row_id in ("link-escape", "dir-escape", "absolute", "dotdot", "nul", "loop"):
        assert reasons[row_id] in ("image_outside_root", "invalid_image_path"), row_id
    for row_id in ("garbage", "truncated", "missing", "folder"):
        assert row_id in out.written, "with checks off, only paths are judged"


# ---------------------------------------------------------------- the training ingest


@pytest.fixture()
def prepared_shards(tmp_path, tiny_model_dir):
    """Shards of 12 rows with one image each (rows 4..7 share one image), as preparation would write them."""
    from transformers import AutoConfig

    from workloads.model import num_image_tokens

    config = AutoConfig.from_pretrained(tiny_model_dir)
    image_id = getattr(config, "image_token_id", None) or config.image_token_index
    count = num_image_tokens(config)
    root = tmp_path / "images"
    root.mkdir()
    images = [f"img{i}.png" if not 4 <= i < 8 else "shared.png" for i in range(12)]
    for name in set(images):
        Image.new("RGB", (32, 32), (len(name) * 20 % 255, 50, 90)).save(root / name)
    ids = [[1, *([image_id] * count), 5 + i, 6, 7] for i in range(12)]
    segments = [[1, *([3] * count), 4, 6, 7] for _ in range(12)]
    shards = tmp_path / "prepared" / "shards"
    shards.mkdir(parents=True)
    table = pa.table(
        {
            "id": [f"r{i}" for i in range(12)],
            "input_ids": ids,
            "segments": segments,
            "images": [[name] for name in images],
            "length": [len(x) for x in ids],
        }
    )
    pq.write_table(table, shards / "part-0.parquet", row_group_size=6)
    return tmp_path, root


def test_the_ingest_survives_images_that_break_after_preparation(prepared_shards, tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForImageTextToText

    from orchestrator.ingest import LoadRows, read_prepared_rows
    from orchestrator.prepare import PreparedData
    from workloads.batching import ordered_micro_batches
    from workloads.loss import l2t_loss, step_denominators
    from workloads.segment_codes import MASKING_MODES, segment_weight_table, weights_from_table
    from workloads.train_loop import collate

    folder, root = prepared_shards
    (root / "img1.png").write_bytes(garbage_png())  # corrupted since preparation
    (root / "img2.png").unlink()  # deleted
    (tmp_path / "elsewhere.png").write_bytes((root / "img0.png").read_bytes())
    (root / "img3.png").unlink()
    (root / "img3.png").symlink_to(tmp_path / "elsewhere.png")  # now leaves the root
    (root / "shared.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")  # rows 4..7: a whole micro-batch
    rows = read_prepared_rows(PreparedData(str(folder / "prepared"), {}))
    load = LoadRows(tiny_model_dir, str(folder / "prepared" / "shards"), str(root))
    loaded = load(np.arange(len(rows.lengths)))
    problems = dict(zip(loaded["row"], loaded["problem"]))
    assert [r for r, p in problems.items() if p] == [1, 2, 3, 4, 5, 6, 7]
    assert "'r1'" in problems[1] and "img1.png" in problems[1] and "broken data stream" in problems[1]
    assert "ImagePathError" in problems[3] and "outside" in problems[3]

    logged: list[str] = []
    order = np.arange(12)
    batches = list(ordered_micro_batches(iter([loaded]), order, 4, max_bad_fraction=1.0, log=logged.append))
    assert [b["skipped_rows"] for b in batches] == [3, 4, 0], "every micro-batch comes, with its skipped rows"
    assert [len(b["input_ids"]) for b in batches] == [1, 1, 4]
    assert len(logged) == 7 and "skipped row 1" in logged[0] and "img1.png" in logged[0]
    placeholder = batches[1]
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    for batch in batches:
        tensors = collate(batch, 0, torch.device("cpu"))
        assert tensors["attention_mask"].sum(dim=1).min() > 0, "no fully masked row"
        for mode in MASKING_MODES:
            weights = weights_from_table(tensors["segments"], segment_weight_table(mode, 1.0, 1.0))
            trained = step_denominators(tensors["segments"], weights)[0]
            assert (trained == 0) == (batch is placeholder), mode
    tensors = collate(placeholder, 0, torch.device("cpu"))
    assert "pixel_values" not in tensors
    outputs = model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"])
    weights = weights_from_table(tensors["segments"], segment_weight_table("l2t_full", 1.0, 1.0))
    parts = l2t_loss(outputs.logits, tensors["input_ids"], tensors["segments"], weights, torch.tensor(7.0))
    parts.loss.backward()  # the rank takes part in the step and adds nothing to it
    assert parts.loss.item() == 0.0 and torch.isfinite(parts.loss)


def test_the_ingest_fails_only_past_max_bad_fraction(prepared_shards, tiny_model_dir):
    from workloads.batching import TooManyBadRows, ordered_micro_batches

    def rows(bad: set[int], count: int = 400):
        return [
            {
                "row": np.arange(count),
                "input_ids": [np.array([1, 2, 3])] * count,
                "segments": [np.array([1, 4, 6])] * count,
                "pixel_values": [np.zeros((0,), np.float32)] * count,
                "problem": np.array([f"row {r}: image gone" if r in bad else "" for r in range(count)]),
            }
        ]

    order = np.arange(400)
    quiet = dict(max_bad_fraction=0.01, log=lambda message: None)
    assert len(list(ordered_micro_batches(iter(rows({0, 1})), order, 4, **quiet))) == 100, "2 early: no 100% share"
    assert len(list(ordered_micro_batches(iter(rows({0, 150, 300})), order, 4, **quiet))) == 100, "1% of those seen"
    with pytest.raises(TooManyBadRows, match=r"3 of 204 rows seen"):
        list(ordered_micro_batches(iter(rows({0, 100, 200})), order, 4, **quiet))
    with pytest.raises(TooManyBadRows, match=r"4 of 4 rows seen .* data.max_bad_fraction=1.0%"):
        list(ordered_micro_batches(iter(rows({0, 1, 2, 3, 4})), order, 4, **quiet))
    # batches without a problem column (older datasets) are all good
    plain = rows(set())
    del plain[0]["problem"]
    assert all(b["skipped_rows"] == 0 for b in ordered_micro_batches(iter(plain), order, 4, **quiet))


def test_quarantine_counts_reach_mlflow_params(tmp_path):
    from orchestrator.tracking import manifest_params

    manifest = {
        "rows_in": 10,
        "rows_written": 7,
        "rows_quarantined": 3,
        "truncated_rows": 1,
        "quarantined_by_reason": {"corrupt_image": 2, "duplicate_id": 1},
        "duplicate_ids": {"mode": "quarantine", "ids": 1, "extra_rows": 1, "examples": ["a"]},
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert manifest_params({"prepared.path": str(tmp_path)}) == {
        "prepared.rows_in": 10,
        "prepared.rows_written": 7,
        "prepared.rows_quarantined": 3,
        "prepared.truncated_rows": 1,
        "prepared.quarantined.corrupt_image": 2,
        "prepared.quarantined.duplicate_id": 1,
        "prepared.duplicate_ids": 1,
    }
    assert manifest_params({}) == {} and manifest_params({"prepared.path": str(tmp_path / "none")}) == {}
