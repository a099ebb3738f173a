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
    rows = json.loads(invoke("--format", "json", "--limit", "2", "--mode", "l2t"))
    assert len(rows) == 2
    tokens = rows[0]["tokens"]
    assert {"text", "id", "segment", "weight"} <= set(tokens[0])
    by_segment = {}
    for token in tokens:
        by_segment.setdefault(token["segment"], set()).add(token["weight"])
    assert by_segment["response"] == {1.0}
    assert by_segment["system"] == {0.0} and by_segment["role"] == {0.0} and by_segment["image"] == {0.0}
    assert len([t for t in tokens if t["segment"] == "image"]) == 17
    # Task templates come from the config's own data when no list is configured (not from the shown rows).
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


UNSEEN = [
    {
        "id": "unseen-1",
        "image": "street.png",
        "conversations": [
            {
                "from": "human",
                "value": "How many bicycles lean on the fence?\nAnswer the question using a single word.",
            },
            {"from": "gpt", "value": "Three."},
            {"from": "human", "value": "Describe the weather. Be brief."},
            {"from": "gpt", "value": "It is overcast, with wet pavement after rain."},
        ],
    },
    {
        "id": "unseen-2",
        "image": "kitchen.png",
        "conversations": [
            {"from": "human", "value": "What is on the counter, left of the sink?\n<image>"},
            {"from": "gpt", "value": "A wooden cutting board with two lemons."},
        ],
    },
]
INSTRUCTION_SIDE = {"system", "role", "instruction", "task_template"}
TRAINED_BY_MODE = {
    "response": {"response", "end_of_turn"},
    "l2t_full": {"system", "role", "task_template", "instruction", "response", "end_of_turn"},
    "l2t_no_system": {"task_template", "instruction", "response", "end_of_turn"},
    "l2t": {"instruction", "response", "end_of_turn"},
}


@pytest.mark.parametrize("mode", sorted(TRAINED_BY_MODE))
def test_the_ladder_weights_exactly_its_segments_on_unseen_rows(tiny_model_dir, tmp_path, mode):
    """Fixed task templates, conversations the tokenizer never saw: each mode trains exactly its segments."""
    from workloads.task_templates import TaskTemplateList

    rows_file = tmp_path / "unseen.jsonl"
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in UNSEEN))
    templates = tmp_path / "templates.json"
    TaskTemplateList.from_sentences(["Answer the question using a single word.", "Be brief."]).save(templates)
    result = CliRunner().invoke(
        app,
        [
            "data",
            "inspect",
            str(rows_file),
            "--config",
            str(CONFIG_DIR / "quickstart.yaml"),
            "--format",
            "json",
            "--mode",
            mode,
            f"model.name_or_path={tiny_model_dir}",
            "data.synthetic=null",
            f"data.sources=[{rows_file}]",
            f"masking.task_templates.file={templates}",
            f"storage.path={tmp_path}",
            "masking.lambda_instruction=0.5",
            "masking.lambda_response=2.0",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "task templates: 2 from masking.task_templates.file" in result.stderr
    rows = json.loads(result.stdout)
    assert [r["id"] for r in rows] == ["unseen-1", "unseen-2"]
    tokens = [t for r in rows for t in r["tokens"]]
    seen = {t["segment"] for t in tokens}
    assert {"system", "role", "image", "instruction", "task_template", "response", "end_of_turn"} <= seen
    for token in tokens:
        trained = token["segment"] in TRAINED_BY_MODE[mode]
        expected = (0.5 if token["segment"] in INSTRUCTION_SIDE else 2.0) if trained else 0.0
        assert token["weight"] == expected, (mode, token)
        if mode == "l2t" and token["weight"] > 0 and token["segment"] in INSTRUCTION_SIDE:
            assert token["text"].strip(), f"a whitespace-only token is trained in l2t: {token}"
