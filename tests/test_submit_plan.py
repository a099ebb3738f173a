"""`l2t submit`, planned without a cluster: jobs (entrypoint, runtime_env, id, metadata, auth) and the
credentials it refuses, before any cluster is contacted."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def _plan(*overrides, sweep=True, **kwargs):
    from orchestrator.submit import plan_submission

    kwargs.setdefault("environ", {})
    return plan_submission(
        Path("configs/lambda_grid.yaml"),
        ["storage.path=s3://bucket/l2t", "tracking.uri=http://mlflow:5000", *overrides],
        sweep=sweep,
        **kwargs,
    )


def test_submit_plans_a_sweep_job_from_the_working_directory(in_repo):
    from orchestrator.config import load_config
    from orchestrator.sweep import sweep_name

    plan = _plan(
        "train.lr=1e-4",
        environ={
            "AWS_ENDPOINT_URL": "http://minio:9000",
            "AWS_SECRET_ACCESS_KEY": "x",
            "AWS_ACCESS_KEY_ID": "y",
            "AWS_REGION": "eu-west-1",
        },
    )
    assert (
        plan.entrypoint == "python -m orchestrator.cli sweep configs/lambda_grid.yaml storage.path=s3://bucket/l2t "
        "tracking.uri=http://mlflow:5000 train.lr=1e-4"
    )
    assert re.fullmatch(r"l2t-sweep-lambda-grid-\d{8}-\d{6}-[0-9a-f]{4}", plan.submission_id)
    assert plan.runtime_env["working_dir"] == str(REPO)
    assert ".venv/" in plan.runtime_env["excludes"] and ".git/" in plan.runtime_env["excludes"]
    assert plan.runtime_env["env_vars"] == {
        "AWS_ENDPOINT_URL": "http://minio:9000",
        "AWS_REGION": "eu-west-1",
        "PYTHONUNBUFFERED": "1",
    }
    cfg = load_config(
        REPO / "configs/lambda_grid.yaml",
        ["storage.path=s3://bucket/l2t", "tracking.uri=http://mlflow:5000", "train.lr=1e-4"],
    )
    assert plan.metadata["l2t.sweep"] == sweep_name(cfg) and plan.metadata["l2t.command"] == "sweep"
    assert all(isinstance(v, str) for v in plan.metadata.values())
    assert plan.tracking_uri == "http://mlflow:5000"
    assert len(plan.warnings) == 1 and "data.synthetic" in plan.warnings[0], (
        "the synthetic set can't be generated on S3"
    )
    train = _plan(sweep=False, entrypoint_num_gpus=1, entrypoint_resources={"head": 0.01}, pip=["wandb==0.21"])
    assert train.entrypoint.startswith("python -m orchestrator.cli train ") and "metadata" in train.submit_kwargs()
    kwargs = train.submit_kwargs()
    assert (
        kwargs["entrypoint_num_gpus"] == 1
        and kwargs["entrypoint_resources"] == {"head": 0.01}
        and "entrypoint_num_cpus" not in kwargs
    )
    assert train.runtime_env["pip"] == {"packages": ["wandb==0.21"], "pip_check": False}


def test_submit_with_an_image_uploads_nothing(in_repo):
    from orchestrator.submit import SubmitError

    plan = _plan(image="registry/l2t:0.1.0", working_dir=None)
    assert (
        plan.runtime_env.keys() == {"image_uri", "env_vars"} and plan.runtime_env["image_uri"] == "registry/l2t:0.1.0"
    )
    assert plan.entrypoint.startswith("l2t sweep configs/lambda_grid.yaml ")
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**plan.runtime_env)  # Ray accepts it (image_uri combines with env_vars only)
    with pytest.raises(SubmitError, match="--pip"):
        _plan(image="registry/l2t:0.1.0", working_dir=None, pip=["x"])


def test_submit_refuses_credentials_and_unusable_configs(in_repo, tmp_path):
    from orchestrator.config import ConfigError
    from orchestrator.submit import SubmitError, plan_submission

    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN", "WANDB_API_KEY", "MLFLOW_TRACKING_PASSWORD"):
        with pytest.raises(SubmitError, match="credential"):
            _plan(env={name: "x"})
    assert _plan(env={"TOKENIZERS_PARALLELISM": "false"}).runtime_env["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    with pytest.raises(SubmitError, match="user:password"):
        _plan("tracking.uri=http://me:pw@mlflow:5000")
    with pytest.raises(SubmitError, match="relative"):
        plan_submission(Path("configs/lambda_grid.yaml"), [], sweep=True, environ={})
    outside = tmp_path / "x.yaml"
    outside.write_text((REPO / "configs/lambda_grid.yaml").read_text())
    with pytest.raises(SubmitError, match="outside the working directory"):
        plan_submission(outside, ["storage.path=s3://b/x"], sweep=True, environ={})
    with pytest.raises(ConfigError, match="train.lrr"):
        _plan("train.lrr=1")
    with pytest.raises(ConfigError, match="nothing to sweep"):
        plan_submission(Path("configs/quickstart.yaml"), ["storage.path=s3://b/x"], sweep=True, environ={})
    local = plan_submission(Path("configs/quickstart.yaml"), ["storage.path=/shared/l2t"], environ={})
    assert any("local to each node" in w for w in local.warnings) and any(
        "tracking.uri is unset" in w for w in local.warnings
    )


def test_submit_sends_the_token_only_where_ray_would(tmp_path, monkeypatch):
    from orchestrator.submit import SubmitError, auth_headers, find_token

    monkeypatch.setenv("HOME", str(tmp_path))
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert find_token({"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(token_file)}) == "from-env"
    assert find_token({"RAY_AUTH_TOKEN_PATH": str(token_file)}) == "from-file"
    assert find_token({}) is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("default")
    assert find_token({}) == "default"
    with pytest.raises(SubmitError, match="RAY_AUTH_TOKEN_PATH"):
        find_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})

    bearer = {"Authorization": "Bearer default"}
    assert auth_headers("http://127.0.0.1:8265", {}) == bearer  # a local `ray start --head`, a tunnel, a port-forward
    assert auth_headers("http://localhost:8265", {}) == bearer
    assert auth_headers("http://10.1.2.3:8265", {}) == {}  # never sent elsewhere unless asked for
    assert auth_headers("http://10.1.2.3:8265", {"RAY_AUTH_MODE": "token"}) == bearer
    assert auth_headers("http://127.0.0.1:8265", {"RAY_AUTH_MODE": "disabled"}) == {}
    (tmp_path / ".ray" / "auth_token").unlink()
    assert auth_headers("http://127.0.0.1:8265", {}) == {}
    with pytest.raises(SubmitError, match="no token"):
        auth_headers("http://10.1.2.3:8265", {"RAY_AUTH_MODE": "token"})


def test_submit_finds_mlflow_runs_in_driver_logs_and_links_them():
    from orchestrator.submit import mlflow_link, mlflow_runs_in

    a, b = "a" * 32, "0123456789abcdef" * 2
    logs = (
        f"...\nsweep x: 2 trials; MLflow parent\nrun\n{a} in http://m:5000\n"
        f"MLflow run {b} in sqlite:///x.db\nMLflow parent run {a} in ...\n"
    )
    assert mlflow_runs_in(logs) == [("parent run", a), ("run", b)]
    assert mlflow_link("http://127.0.0.1:9", a) == f"http://127.0.0.1:9 (run {a})"  # no server: the run id and where
    assert mlflow_link(None, a) == f"run {a} in a SQLite store under storage.path on the cluster"
    assert mlflow_link("http://user:pw@m:5000", a, ui_url="https://ui.example") == f"https://ui.example (run {a})"
    assert "pw" not in mlflow_link("http://user:pw@127.0.0.1:9", a)


def test_submit_command_line():
    import typer
    from typer.testing import CliRunner

    from orchestrator import cli
    from orchestrator.cli.submit_command import command

    app = typer.Typer()
    app.command()(command)
    result = CliRunner().invoke(app, ["--help"], terminal_width=200)
    assert result.exit_code == 0
    for option in (
        "--address",
        "--sweep",
        "--working-dir",
        "--image",
        "--pip",
        "--env",
        "--submission-id",
        "--entrypoint-num-gpus",
        "--entrypoint-resource",
        "--no-follow",
        "--mlflow-ui",
    ):
        assert option in result.output, option
    bad = CliRunner().invoke(
        app,
        [
            str(REPO / "configs/lambda_grid.yaml"),
            "--sweep",
            "--env",
            "HF_TOKEN=x",
            "--working-dir",
            str(REPO),
            "--address",
            "http://127.0.0.1:9",
            "storage.path=s3://b/l2t",
        ],
    )
    assert bad.exit_code == 2 and "credential" in bad.output
    if "submit" in {c.name for c in cli.app.registered_commands}:
        assert CliRunner().invoke(cli.app, ["submit", "--help"]).exit_code == 0
