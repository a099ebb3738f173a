"""Local paths behind the storage interface, and credential redaction."""

from orchestrator import storage
from orchestrator.config import CONFIG_DIR, load_config


def test_local_round_trip(tmp_path):
    uri = storage.join(str(tmp_path), "a", "b.txt")
    assert not storage.exists(uri)
    storage.write_text(uri, "hello")
    storage.append_text(uri, " world")
    assert storage.read_text(uri) == "hello world"
    assert storage.list_files(str(tmp_path)) == [uri]
    assert "|11|" in storage.file_fingerprint(uri)
    storage.delete_dir(str(tmp_path / "a"))
    assert not storage.exists(uri)


def test_s3_uris_join_with_slashes():
    assert storage.join("s3://bucket/runs", "x", "y.json") == "s3://bucket/runs/x/y.json"
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/tmp/x")
    assert storage.absolute("s3://b/k") == "s3://b/k"


def test_redact_removes_credentials_everywhere():
    raw = {
        "tracking.uri": "http://alice:hunter2@mlflow.internal:5000",
        "aws_secret_access_key": "abc",
        "nested": {"api_token": "t", "ok": "s3://bucket/path", "list": ["https://u:p@host/x"]},
    }
    clean = storage.redact(raw)
    text = repr(clean)
    assert "hunter2" not in text and "abc" not in text and "'t'" not in text and "u:p@" not in text
    assert clean["nested"]["ok"] == "s3://bucket/path"
    assert clean["tracking.uri"] == "http://***@mlflow.internal:5000"


def test_config_params_are_redacted(tmp_path):
    cfg = load_config(CONFIG_DIR / "quickstart.yaml", ["tracking.uri=http://bob:pw@127.0.0.1:5000"])
    params = storage.redact(cfg.flat())
    assert params["tracking.uri"] == "http://***@127.0.0.1:5000"


def test_only_local_paths_and_s3_are_locations(tmp_path):
    import pytest

    assert storage.url_scheme("HTTP://x/y") == "http" and storage.url_scheme("/tmp/x") is None
    storage.check_location("s3://bucket/x")
    storage.check_location(str(tmp_path))
    for uri in ("http://u:pw@host/x", "gs://bucket/x", "file:///tmp/x", "hdfs://nn/x"):
        with pytest.raises(storage.StorageError, match="not supported") as error:
            storage.filesystem(uri)
        assert "pw" not in str(error.value)
