"""`l2t data inspect`: every token with its segment and weight, as JSON, HTML and terminal text."""

import json

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.config import CONFIG_DIR


@pytest.fixture()
def invoke(synthetic_data, tiny_model_dir, tmp_path):
    def run(*args):
        result = CliRunner().invoke(
            app,
            [
                "data",
                "inspect",
                str(synthetic_data.train_file),
                "--config",
                str(CONFIG_DIR / "quickstart.yaml"),
                *args,
                f"model.name_or_path={tiny_model_dir}",
                f"storage.path={tmp_path}",
            ],
        )
        assert result.exit_code == 0, result.output
        return result.stdout

    return run


def test_json_lists_every_token_with_segment_and_weight(invoke):
    rows = json.loads(invoke("--format", "json", "--limit", "2", "--mode", "l2t_no_template"))
    assert len(rows) == 2
    tokens = rows[0]["tokens"]
    assert {"text", "id", "segment", "weight"} <= set(tokens[0])
    by_segment = {}
    for token in tokens:
        by_segment.setdefault(token["segment"], set()).add(token["weight"])
    assert by_segment["response"] == {1.0}
    assert by_segment["system"] == {0.0} and by_segment["role"] == {0.0} and by_segment["image"] == {0.0}
    assert len([t for t in tokens if t["segment"] == "image"]) == 17
    # Task templates come from the inspected rows when no list is configured.
    assert any(
        r["tokens"] and any(t["segment"] == "task_template" for t in r["tokens"])
        for r in json.loads(invoke("--format", "json", "--limit", "20"))
    )


def test_html_is_a_standalone_page_and_text_shows_segments(invoke):
    page = invoke("--format", "html", "--limit", "1")
    assert page.lstrip().lower().startswith("<!doctype html") and "task_template" in page and "</html>" in page
    text = invoke("--limit", "1")
    assert "<image>×17" in text or "image" in text


def test_bad_mode_is_refused(synthetic_data, tiny_model_dir):
    result = CliRunner().invoke(
        app,
        [
            "data",
            "inspect",
            str(synthetic_data.train_file),
            "--config",
            str(CONFIG_DIR / "quickstart.yaml"),
            "--mode",
            "everything",
        ],
    )
    assert result.exit_code == 2 and "--mode must be one of" in result.output
