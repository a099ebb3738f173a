"""Cluster infrastructure and job submission, checked without a cluster.

- infra/aws/cluster.yaml passes Ray's own cluster-config validation (the
  schema JSON shipped in the ray package, after Ray fills in its AWS
  defaults) and keeps its promises: a head that takes no work, GPU groups
  from 0 with spot options, an idle timeout, the image, instance profiles,
  no port open to the world but SSH, token auth;
- the KubeRay manifests parse and carry what the operator needs;
- the Dockerfile builds on Ray's GPU image of the installed Ray version;
- `l2t submit` plans jobs (entrypoint, runtime_env, id, metadata, auth)
  and refuses credentials, before any cluster is contacted.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
AWS_YAML = INFRA / "aws" / "cluster.yaml"
RAYCLUSTER = INFRA / "kuberay" / "raycluster.yaml"
RAYJOB = INFRA / "kuberay" / "rayjob-sweep.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
EXPERIMENT = REPO / "configs" / "llava15_7b_lambda_grid.yaml"
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")
WORLD = {"0.0.0.0/0", "::/0"}
KEY_PATTERNS = [
    re.compile(p)
    for p in (
        r"AKIA[0-9A-Z]{16}",
        r"(?i)aws_secret_access_key\s*[:=]",
        r"(?i)secret_access_key",
        r"(?i)BEGIN [A-Z ]*PRIVATE KEY",
    )
]


def _ray_version() -> str:
    import ray

    return ray.__version__


def _no_credentials(path: Path) -> None:
    text = path.read_text()
    for pattern in KEY_PATTERNS:
        assert not pattern.search(text), (
            f"{path.relative_to(REPO)} holds something like a credential: {pattern.pattern}"
        )


# ---------------------------------------------------------------- AWS cluster launcher


@pytest.fixture(scope="module")
def aws():
    return yaml.safe_load(AWS_YAML.read_text())


def test_aws_cluster_yaml_passes_rays_schema_validation(aws):
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(aws, schema)  # as written
    prepared = prepare_config(copy.deepcopy(aws))  # what `ray up` does first: AWS defaults, merged setup commands
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


def test_aws_head_takes_no_work_and_gpu_groups_autoscale_from_zero(aws):
    types = aws["available_node_types"]
    head = types[aws["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "the head advertises no CPU, so no task, actor or trial lands there"
    assert not head["node_config"]["InstanceType"].startswith(("g", "p")), "a CPU head"
    workers = {name: t for name, t in types.items() if name != aws["head_node_type"]}
    assert all(t["min_workers"] == 0 for t in workers.values()), "everything scales from zero"
    assert all(t["max_workers"] >= 1 for t in workers.values())
    families = {t["node_config"]["InstanceType"].split(".")[0] for t in workers.values()}
    assert {"g5", "p4d", "p5"} <= families
    for family in ("g5", "p4d", "p5"):
        spot = [
            t
            for t in workers.values()
            if t["node_config"]["InstanceType"].startswith(family + ".")
            and t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
        ]
        assert spot, f"{family} has a spot node type"
    assert 0 < aws["idle_timeout_minutes"] <= 30
    assert aws["max_workers"] >= max(t["max_workers"] for t in workers.values())


def test_aws_nodes_run_the_image_with_an_instance_profile_and_token_auth(aws):
    image = aws["docker"]["image"]
    assert image.endswith("/l2t:0.1.0")
    assert "--env RAY_AUTH_MODE=token" in aws["docker"]["run_options"]
    for name, node_type in aws["available_node_types"].items():
        profile = node_type["node_config"]["IamInstanceProfile"]["Arn"]
        assert re.fullmatch(r"arn:aws:iam::ACCOUNT_ID:instance-profile/l2t-ray-(head|worker)", profile), name
        assert node_type["node_config"]["ImageId"].startswith("resolve:ssm:/aws/service/deeplearning/")
    setup = " ".join(aws["setup_commands"])
    assert "/l2t/ray-auth-token" in setup and "0o600" in setup and "print" not in setup, (
        "the token is fetched, kept private, never printed"
    )
    assert any("--head" in c and "--autoscaling-config" in c for c in aws["head_start_ray_commands"])
    assert any("$RAY_HEAD_IP" in c for c in aws["worker_start_ray_commands"])
    _no_credentials(AWS_YAML)


def test_aws_opens_no_port_to_the_world_but_ssh(aws):
    rules = aws["provider"].get("security_group", {}).get("IpPermissions", [])
    for rule in rules:
        ranges = {r.get("CidrIp") for r in rule.get("IpRanges", [])} | {
            r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])
        }
        if ranges & WORLD:
            assert rule.get("FromPort") == rule.get("ToPort") == 22, f"open to the world: {rule}"
    text = AWS_YAML.read_text()
    assert "--dashboard-port" not in text and "8265" not in text.split("security_group", 1)[1].split("auth:", 1)[0]
    assert aws["provider"].get("use_internal_ips") in (None, False)


def test_iam_policies_grant_the_bucket_not_everything():
    policies = {p.name: json.loads(p.read_text()) for p in (INFRA / "aws" / "iam").glob("*.json")}
    assert {"head-policy.json", "worker-policy.json", "ec2-trust-policy.json"} <= set(policies)
    for name in ("head-policy.json", "worker-policy.json"):
        for statement in policies[name]["Statement"]:
            actions = [statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"]
            resources = [statement["Resource"]] if isinstance(statement["Resource"], str) else statement["Resource"]
            assert "*" not in actions and not any(a.endswith(":*") for a in actions), f"{name}: {statement['Sid']}"
            if any(a.startswith("s3:") for a in actions):
                assert all(r.startswith("arn:aws:s3:::L2T_BUCKET") for r in resources), (
                    f"{name}: S3 beyond the l2t bucket"
                )
    worker_actions = {
        a
        for s in policies["worker-policy.json"]["Statement"]
        for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])
    }
    assert not any(a.startswith(("ec2:", "iam:")) for a in worker_actions), "workers can't launch nodes or pass roles"
    pass_role = [s for s in policies["head-policy.json"]["Statement"] if "iam:PassRole" in s["Action"]]
    assert pass_role and all("l2t-ray-worker" in r for s in pass_role for r in s["Resource"])


# ---------------------------------------------------------------- KubeRay


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _check_string_map(params: dict, where: str) -> None:
    assert isinstance(params, dict), where
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in params.items()), (
        f"{where}: rayStartParams values must be strings"
    )


def _check_resources(resources: dict, where: str) -> None:
    for kind in ("requests", "limits"):
        for name, value in resources.get(kind, {}).items():
            assert QUANTITY.match(str(value)), f"{where}: {kind}.{name}={value!r} is not a Kubernetes quantity"
    gpus = {kind: resources.get(kind, {}).get("nvidia.com/gpu") for kind in ("requests", "limits")}
    assert gpus["requests"] == gpus["limits"], f"{where}: GPU requests and limits must match"


def _check_cluster_spec(spec: dict, where: str) -> dict:
    """What the KubeRay operator needs of a RayClusterSpec; returns the image."""
    assert spec["rayVersion"] == _ray_version(), f"{where}: rayVersion must match the installed Ray"
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["upscalingMode"] in ("Default", "Aggressive", "Conservative")
    assert (
        isinstance(spec["autoscalerOptions"]["idleTimeoutSeconds"], int)
        and spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    )
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    _check_string_map(head["rayStartParams"], f"{where} head")
    assert head["rayStartParams"]["num-cpus"] == "0", "the head takes no Ray work"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", (
        "no LoadBalancer/NodePort: the dashboard stays inside the cluster"
    )
    (container,) = head["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001}
    _check_resources(container["resources"], f"{where} head")
    image = container["image"]
    sa = head["template"]["spec"]["serviceAccountName"]
    names = set()
    for group in spec["workerGroupSpecs"]:
        gwhere = f"{where} group {group['groupName']}"
        assert group["groupName"] not in names
        names.add(group["groupName"])
        assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1, gwhere
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], gwhere
        _check_string_map(group["rayStartParams"], gwhere)
        pod = group["template"]["spec"]
        assert pod["serviceAccountName"] == sa, f"{gwhere}: same S3 identity as the head"
        (worker,) = pod["containers"]
        assert worker["image"] == image, gwhere
        _check_resources(worker["resources"], gwhere)
        for value in worker.get("env", []):
            assert "value" in value or "valueFrom" in value
            assert not re.search(r"(?i)(secret|key_id|password|token)", value["name"]), (
                f"{gwhere}: credentials in the pod spec"
            )
    gpu_groups = [
        g
        for g in spec["workerGroupSpecs"]
        if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
    ]
    assert gpu_groups, f"{where}: no GPU worker group"
    for group in gpu_groups:
        assert any(t.get("key") == "nvidia.com/gpu" for t in group["template"]["spec"].get("tolerations", []))
    return {"image": image, "service_account": sa}


def test_kuberay_raycluster_has_what_the_operator_needs():
    docs = _docs(RAYCLUSTER)
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"ServiceAccount", "RayCluster"}
    cluster = kinds["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["metadata"]["name"]
    found = _check_cluster_spec(cluster["spec"], "RayCluster")
    account = kinds["ServiceAccount"]
    assert account["metadata"]["name"] == found["service_account"]
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    assert found["image"] == yaml.safe_load(AWS_YAML.read_text())["docker"]["image"], "one image everywhere"
    assert {"a100-spot", "h100"} <= {g["groupName"] for g in cluster["spec"]["workerGroupSpecs"]}
    _no_credentials(RAYCLUSTER)


def test_kuberay_rayjob_runs_a_sweep_on_a_cluster_of_its_own():
    (job,) = _docs(RAYJOB)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["l2t", "sweep"]
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "SidecarMode", "InteractiveMode")
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    assert isinstance(spec["activeDeadlineSeconds"], int) and spec["activeDeadlineSeconds"] > 0
    assert all(isinstance(v, str) for v in spec.get("metadata", {}).values())
    found = _check_cluster_spec(spec["rayClusterSpec"], "RayJob")
    cluster = next(d for d in _docs(RAYCLUSTER) if d["kind"] == "RayCluster")
    assert found["image"] == _check_cluster_spec(cluster["spec"], "RayCluster")["image"]
    # The experiment comes from a ConfigMap mounted on the head, where the driver runs.
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in head["volumes"]}
    config_path = Path(argv[2])
    (volume,) = [name for name, v in volumes.items() if "configMap" in v]
    assert Path(mounts[volume]) == config_path.parent
    assert volumes[volume]["configMap"]["name"] == "l2t-experiment"
    assert f"--from-file={config_path.name}=configs/" in RAYJOB.read_text()
    _no_credentials(RAYJOB)


def test_cluster_experiment_is_the_papers_recipe_on_one_node_per_trial():
    from orchestrator.config import load_config, resolve_repo_path
    from orchestrator.sweep import sweep_points

    cfg = load_config(EXPERIMENT)
    assert cfg.train.num_workers * cfg.train.micro_batch_size * cfg.train.gradient_accumulation == 128
    assert cfg.train.use_gpu and cfg.train.epochs == 1 and cfg.train.lr == 2e-5 and cfg.train.warmup_ratio == 0.03
    assert cfg.model.freeze == "vision_tower" and cfg.data.max_length == 2048
    assert resolve_repo_path(cfg.train.deepspeed).exists()
    assert len(sweep_points(cfg)) == 9
    assert cfg.storage.path.startswith("s3://") and cfg.tracking.uri.startswith("http")


# ---------------------------------------------------------------- the image


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_installs_the_project_on_rays_gpu_image():
    import tomllib

    steps = _instructions(DOCKERFILE)
    assert set(w for w, _ in steps) <= {"ARG", "FROM", "WORKDIR", "COPY", "RUN", "ENV", "USER", "LABEL"}
    first_from = next(i for i, (w, _) in enumerate(steps) if w == "FROM")
    args = dict(a.split("=", 1) for w, a in steps[:first_from] if w == "ARG")
    base = steps[first_from][1]
    assert base == "rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-gpu"
    assert args["RAY_VERSION"] == _ray_version(), "the image's Ray must match the Ray that talks to it"
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    minimum = re.search(r">=\s*3\.(\d+)", pyproject["project"]["requires-python"]).group(1)
    assert int(args["PYTHON_TAG"].removeprefix("py3")) >= int(minimum)
    ray_pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("ray["))
    assert ray_pin.endswith(f">={_ray_version()}")
    after = steps[first_from + 1 :]
    assert any(w == "ARG" and a == "RAY_VERSION" for w, a in after), (
        "RAY_VERSION is used after FROM: declare it again there"
    )
    copied = [shlex.split(a) for w, a in after if w == "COPY"]
    for parts in copied:
        sources = [p for p in parts[:-1] if not p.startswith("--")]
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    copied_names = {Path(s).parts[0] for parts in copied for s in parts[:-1] if not s.startswith("--")}
    assert {"pyproject.toml", "orchestrator", "workloads", "configs"} <= copied_names
    runs = " ".join(a for w, a in after if w == "RUN")
    assert "pip install --no-cache-dir ." in runs
    assert not any(w == "USER" and a.split(":")[0] in ("root", "0") for w, a in after), "the image stays unprivileged"
    from orchestrator.submit import looks_secret

    for w, a in steps:
        if w in ("ENV", "ARG"):
            names = [item.split("=", 1)[0] for item in shlex.split(a)]
            assert not any(looks_secret(n) for n in names), f"{w} {a}: no credentials in images"
    ignore = [
        line.strip()
        for line in (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "**" and {"!orchestrator/**", "!workloads/**", "!configs/**", "!pyproject.toml"} <= set(ignore)
    _no_credentials(DOCKERFILE)


# ---------------------------------------------------------------- l2t submit, planned


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


def test_docs_name_only_files_and_commands_that_exist():
    text = (REPO / "docs" / "cluster.md").read_text()
    for path in set(
        re.findall(
            r"\b(infra/[\w./-]+\.(?:yaml|json|md)|infra/docker/Dockerfile|configs/[\w./-]+\.(?:yaml|json))\b", text
        )
    ):
        assert (REPO / path).exists(), f"docs/cluster.md names {path}, which does not exist"
    assert "l2t submit" in text and "ray job submit --working-dir . -- l2t sweep" in text
