"""A newcomer's first hour: own data over the synthetic set, paths that resolve outside the checkout,
finding sweeps by name, the model folder's experiment, links in the docs."""

from __future__ import annotations

from orchestrator.config import CONFIG_DIR, load_config


def test_explicit_sources_win_over_the_synthetic_set(tmp_path, capsys):
    data = tmp_path / "my.json"
    data.write_text("[]")
    cfg = load_config(CONFIG_DIR / "quickstart.yaml", [f"data.sources=[{data}]", f"data.image_root={tmp_path}"])
    assert cfg.data.synthetic is None and cfg.data.sources == [str(data)]
    assert "data.synthetic is ignored" in capsys.readouterr().err
    plain = load_config(CONFIG_DIR / "quickstart.yaml")
    assert plain.data.synthetic is not None and "ignored" not in capsys.readouterr().err


def test_materialize_synthetic_keeps_explicit_sources(tmp_path):
    from orchestrator.config import with_overrides
    from orchestrator.inputs import materialize_synthetic

    cfg = load_config(CONFIG_DIR / "quickstart.yaml", [f"storage.path={tmp_path}"])
    both = with_overrides(cfg, {"data.sources": ["my.json"]})
    assert both.data.synthetic is not None
    out = materialize_synthetic(both)
    assert out.data.sources == ["my.json"] and out.data.synthetic is None
    assert not (tmp_path / "data").exists()


def _store(tmp_path):
    """A config whose local SQLite store lives under tmp_path, its experiment created by l2t."""
    from orchestrator.tracking import ensure_experiment

    cfg = load_config(CONFIG_DIR / "quickstart.yaml", [f"storage.path={tmp_path / 'store'}"])
    ensure_experiment(cfg)
    return cfg


def _sweep(client, experiment_id: str, sweep: str, children: int = 1) -> str:
    parent = client.create_run(experiment_id, tags={"l2t.kind": "parent", "l2t.sweep": sweep}, run_name=sweep)
    for i in range(children):
        child = client.create_run(
            experiment_id,
            tags={"l2t.kind": "trial", "mlflow.parentRunId": parent.info.run_id},
            run_name=f"{sweep}-{i}",
        )
        client.log_param(child.info.run_id, "masking.lambda_instruction", str(0.5 * i))
        client.log_metric(child.info.run_id, "eval/accuracy", 0.5)
        client.set_terminated(child.info.run_id)
    client.set_terminated(parent.info.run_id)
    return parent.info.run_id


def test_sweeps_are_found_by_a_prefix_and_artifacts_stay_under_storage(tmp_path, monkeypatch):
    import mlflow
    import pytest

    from orchestrator.compare import find_runs
    from orchestrator.tracking import tracking_uri

    monkeypatch.chdir(tmp_path)
    cfg = _store(tmp_path)
    client = mlflow.tracking.MlflowClient(tracking_uri(cfg))
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.artifact_location == (tmp_path / "store" / "mlruns").as_uri()
    parent = _sweep(client, experiment.experiment_id, "lambda-grid-sweep-0a1b2c", children=2)
    title, parent_id, runs = find_runs("lambda-grid", cfg.tracking.experiment)
    assert parent_id == parent and len(runs) == 2 and "lambda-grid-sweep-0a1b2c" in title
    _sweep(client, experiment.experiment_id, "lambda-grid-sweep-ffffff")
    with pytest.raises(LookupError, match="lambda-grid-sweep-0a1b2c, lambda-grid-sweep-ffffff"):
        find_runs("lambda-grid", cfg.tracking.experiment)
    with pytest.raises(LookupError, match="sweeps here: lambda-grid-sweep-0a1b2c"):
        find_runs("nothing-like-it", cfg.tracking.experiment)
    assert not (tmp_path / "mlruns").exists()


def test_compare_takes_the_configs_store_and_overrides_and_never_creates_one(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from orchestrator.cli import app

    monkeypatch.chdir(tmp_path)
    missing = CliRunner().invoke(app, ["compare", "lambda-grid", "--config", str(CONFIG_DIR / "quickstart.yaml")])
    assert missing.exit_code != 0 and "no MLflow store at" in missing.output
    assert not (tmp_path / "l2t_quickstart").exists() and not list(tmp_path.rglob("mlflow.db"))
    import mlflow

    from orchestrator.tracking import tracking_uri

    cfg = _store(tmp_path)
    client = mlflow.tracking.MlflowClient(tracking_uri(cfg))
    _sweep(client, client.get_experiment_by_name(cfg.tracking.experiment).experiment_id, "lambda-grid-sweep-0a1b2c")
    args = ["compare", "lambda-grid", "--config", str(CONFIG_DIR / "quickstart.yaml"), "--output", str(tmp_path / "c")]
    found = CliRunner().invoke(app, [*args, f"storage.path={tmp_path / 'store'}"])
    assert found.exit_code == 0, found.output
    assert "lambda-grid-sweep-0a1b2c" in found.output


def test_a_model_folder_carries_its_experiment(tmp_path):
    from orchestrator.experiment import MODEL_EXPERIMENT_FILE, model_experiment, write_model_experiment

    cfg = load_config(CONFIG_DIR / "quickstart.yaml", ["eval.max_rows=17", "masking.lambda_instruction=0.5"])
    assert model_experiment(tmp_path) is None
    write_model_experiment(tmp_path, cfg)
    assert (tmp_path / MODEL_EXPERIMENT_FILE).is_file()
    loaded = model_experiment(tmp_path)
    assert loaded == cfg and loaded.eval.max_rows == 17


def test_a_model_that_does_not_exist_fails_fast_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from orchestrator.cli import app

    result = CliRunner().invoke(
        app,
        ["train", str(CONFIG_DIR / "quickstart.yaml"), f"model.name_or_path={tmp_path}/no-such-model",
         f"storage.path={tmp_path}"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "Traceback" not in result.output and "model.name_or_path" in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) <= 2
    assert not (tmp_path / "logs").exists(), "refused before anything starts"


def test_trials_are_named_by_their_point_and_carry_only_what_differs():
    from orchestrator.config import with_overrides
    from orchestrator.sweep import trial_params, trial_title

    base = load_config(CONFIG_DIR / "quickstart.yaml")
    point = {"masking.lambda_instruction": 0.5, "masking.lambda_response": 1.0, "train.warmup_ratio": 0.1}
    cfg = with_overrides(base, point)
    assert trial_title(cfg, point) == "l2t λI=0.5 λA=1 warmup_ratio=0.1 seed=0"
    params = trial_params(cfg, point)
    assert params["masking.lambda_instruction"] == 0.5 and params["train.warmup_ratio"] == 0.1
    assert {"masking.mode", "train.seed", "train.lr"} <= set(params) and "data.max_length" not in params


def test_an_installed_wheel_finds_its_configs_outside_the_checkout(tmp_path):
    """Build the wheel from a copy of the sources, install it bare, and resolve the quickstart from elsewhere."""
    import shutil
    import subprocess
    import sys

    from orchestrator.config import REPO_ROOT

    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    for name in ("orchestrator", "workloads", "configs"):
        shutil.copytree(REPO_ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    wheels, target, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", str(source), "-w", str(wheels)], check=True)
    (wheel,) = wheels.glob("*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)
    probe = (
        "import json, orchestrator.config as c, orchestrator.train as t, orchestrator.tracking as k;"
        "cfg = c.load_config(c.CONFIG_DIR / 'quickstart.yaml');"
        "print(json.dumps({'dir': str(c.CONFIG_DIR), 'stage': t.load_deepspeed_config(cfg.train.deepspeed)"
        "['zero_optimization']['stage'], 'name': cfg.name, 'commit': k.git_commit()}))"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{target}:{':'.join(p for p in sys.path if 'site-packages' in p)}"}
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True, check=True
    ).stdout
    import json

    found = json.loads(out.strip().splitlines()[-1])
    assert found["dir"].startswith(str(target)) and found["dir"].endswith("l2t_configs")
    assert found["stage"] == 2 and found["name"] == "quickstart"
    assert found["commit"] != "unknown"


def test_the_text_inspector_gives_each_segment_its_own_color_and_marks_spans_when_piped():
    from workloads.mask_inspect import SEGMENT_LETTERS, TERMINAL_COLORS, to_plain_text

    assert len(set(TERMINAL_COLORS.values())) == len(TERMINAL_COLORS)
    assert len(set(SEGMENT_LETTERS.values())) == len(SEGMENT_LETTERS)
    rows = [
        {
            "id": "r1",
            "tokens": [
                {"text": "USER:", "segment": "role", "weight": 0.0},
                {"text": " red?", "segment": "instruction", "weight": 1.0},
                {"text": " Red", "segment": "response", "weight": 1.0},
            ],
        }
    ]
    text = to_plain_text(rows)
    assert text.startswith("legend: ") and "I=instruction" in text
    assert "[r]USER:[I] red?[A] Red" in text


def test_readme_and_docs_links_resolve_and_every_command_is_listed():
    import re

    from typer.main import get_command

    from orchestrator.cli import app
    from orchestrator.config import REPO_ROOT

    for page in [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://", "#", "mailto:")):
                continue
            assert (page.parent / target.split("#")[0]).exists(), f"{page.name}: broken link {target}"
    readme = (REPO_ROOT / "README.md").read_text()
    root = get_command(app)
    for name, command in root.commands.items():
        subcommands = getattr(command, "commands", None)
        for full in [f"l2t {name} {sub}" for sub in subcommands] if subcommands else [f"l2t {name}"]:
            assert full in readme, f"README does not show {full}"
    assert "docs/design.md" in readme
