"""Configs: every YAML loads, unknown keys fail with their dotted path, overrides apply."""

import json

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.config import CONFIG_DIR, ConfigError, ExperimentConfig, apply_overrides, json_schema, load_config

ALL_YAML = sorted(CONFIG_DIR.rglob("*.yaml"))


def test_there_are_configs():
    assert any(p.name == "quickstart.yaml" for p in ALL_YAML)


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_every_yaml_in_configs_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)
    header = path.read_text().split("\n\n")[0]
    assert header.lstrip().startswith("#"), "each recipe starts with a header comment giving its launch command"
    launches = [
        line.lstrip("# ").strip() for line in header.splitlines() if line.lstrip("# ").startswith(("l2t ", "kubectl "))
    ]
    assert any(f"configs/{path.name}" in line for line in launches), (
        f"{path.name}: no launch command naming the file in its header"
    )


@pytest.mark.parametrize("name", ["tinyllava_0.5b_lambda_grid.yaml", "llava15_7b_lambda_grid.yaml"])
def test_production_configs_follow_the_papers_recipe(name):
    cfg = load_config(CONFIG_DIR / name)
    train = cfg.train
    assert train.num_workers * train.micro_batch_size * train.gradient_accumulation == 128
    assert (train.lr, train.epochs, train.max_steps, train.lr_schedule, train.warmup_ratio) == (
        2e-5,
        1.0,
        None,
        "cosine",
        0.03,
    )
    assert (
        train.use_gpu
        and json.loads((CONFIG_DIR.parent / train.deepspeed).read_text())["zero_optimization"]["stage"] == 3
    )
    assert cfg.model.freeze == "vision_tower" and cfg.model.dtype == "bfloat16"
    assert (
        0.0 in cfg.sweep.lambda_instruction and len(cfg.sweep.lambda_instruction) * len(cfg.sweep.lambda_response) == 9
    )


@pytest.mark.parametrize("path", sorted((CONFIG_DIR / "deepspeed").glob("*.json")), ids=lambda p: p.name)
def test_deepspeed_jsons_parse(path):
    config = json.loads(path.read_text())
    assert config["zero_optimization"]["stage"] in (0, 1, 2, 3)


def test_misspelled_key_names_its_dotted_path(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIG_DIR / "quickstart.yaml").read_text().replace("lambda_instruction", "lambda_instuction"))
    with pytest.raises(ConfigError) as error:
        load_config(bad)
    message = str(error.value)
    assert "masking.lambda_instuction: unknown key" in message
    assert "did you mean masking.lambda_instruction" in message


def test_wrong_type_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.lr"):
        load_config(CONFIG_DIR / "quickstart.yaml", ["train.lr=fast"])


def test_overrides_apply_and_validate():
    cfg = load_config(
        CONFIG_DIR / "quickstart.yaml", ["train.lr=1e-4", "masking.mode=response", "masking.lambda_instruction=0"]
    )
    assert cfg.train.lr == 1e-4
    assert cfg.masking.mode == "response"
    assert cfg.masking.lambda_instruction == 0
    with pytest.raises(ConfigError, match="masking.mode"):
        load_config(CONFIG_DIR / "quickstart.yaml", ["masking.mode=everything"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["train.lr"])


def test_the_old_mode_name_fails_with_the_new_one(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(CONFIG_DIR / "quickstart.yaml", ["masking.mode=l2t_no_template"])
    assert "masking.mode" in str(error.value) and "use 'l2t'" in str(error.value)
    from orchestrator.sweep import sweep_points

    swept = load_config(
        CONFIG_DIR / "lambda_grid.yaml", ["sweep.parameters={masking.mode: [response, l2t_no_template]}"]
    )
    with pytest.raises(ConfigError, match="use 'l2t'"):
        sweep_points(swept)


def test_masking_knobs_are_dotted_keys():
    cfg = load_config(
        CONFIG_DIR / "quickstart.yaml",
        [
            "masking.weights.role=0.1",
            "masking.normalize=per_part",
            "masking.schedule.lambda_instruction.kind=cosine",
            "masking.schedule.lambda_instruction.end=0",
            "data.image_placement=as_written",
        ],
    )
    assert cfg.masking.weights.role == 0.1 and cfg.masking.normalize == "per_part"
    assert cfg.masking.schedule.lambda_instruction.kind == "cosine" and cfg.masking.schedule.lambda_instruction.end == 0
    with pytest.raises(ConfigError, match=r"masking\.normalize"):
        load_config(CONFIG_DIR / "quickstart.yaml", ["masking.normalize=mean"])
    with pytest.raises(ConfigError, match=r"masking\.weights\.rol: unknown key"):
        load_config(CONFIG_DIR / "quickstart.yaml", ["masking.weights.rol=1"])


def test_a_source_is_required():
    with pytest.raises(ConfigError, match="data.sources or data.synthetic"):
        from orchestrator.config import config_from_dict

        config_from_dict({"data": {}})


def test_every_field_is_documented():
    schema = json_schema()

    def walk(node, path):
        for name, prop in node.get("properties", {}).items():
            assert prop.get("description"), f"{path}{name} has no description"
        return True

    walk(schema, "")
    for name, definition in schema.get("$defs", {}).items():
        walk(definition, f"{name}.")


def test_cli_validate_and_schema(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["config", "validate", str(CONFIG_DIR / "quickstart.yaml")])
    assert ok.exit_code == 0, ok.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  synthetic: {}\ntrian:\n  lr: 1\n")
    failed = runner.invoke(app, ["config", "validate", str(bad)])
    assert failed.exit_code == 2
    assert "trian: unknown key" in failed.output and "did you mean train" in failed.output
    schema = runner.invoke(app, ["config", "schema"])
    assert json.loads(schema.output)["title"] == "ExperimentConfig"


def test_cli_lists_the_commands():
    result = CliRunner().invoke(app, ["--help"])
    for command in ("quickstart", "config", "data", "train"):
        assert command in result.output
