"""Cluster infrastructure and job submission, checked without a cluster.

- infra/aws/cluster.yaml passes Ray's own cluster-config validation (the
  schema JSON shipped in the ray package, after Ray fills in its AWS
  defaults) and keeps its promises: a head that takes no work, GPU groups
  from 0 with spot options, an idle timeout, the image, instance profiles,
  no port open to the world (SSH only from the user's CIDR, in a group Ray
  does not make), token auth;
- the KubeRay manifests parse and carry what the operator needs, /dev/shm
  memory volumes, MLflow credentials from a Secret, true resume steps;
- the Dockerfile builds on Ray's GPU image of the installed Ray version.

`l2t submit`'s job plans are tests/test_submit_plan.py.
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


def test_aws_opens_no_port_to_the_world_ssh_included(aws, monkeypatch):
    """A group Ray makes itself always gets SSH from 0.0.0.0/0; every node names the user's group instead."""
    from ray.autoscaler._private.aws import config as aws_config
    from ray.autoscaler._private.util import prepare_config

    rules = aws["provider"].get("security_group", {}).get("IpPermissions", [])
    for rule in rules:
        ranges = {r.get("CidrIp") for r in rule.get("IpRanges", [])} | {
            r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])
        }
        assert not ranges & WORLD, f"open to the world: {rule}"
    for name, node_type in aws["available_node_types"].items():
        assert node_type["node_config"]["SecurityGroupIds"] == ["L2T_SECURITY_GROUP_ID"], name
    # What `ray up` does with the groups: with SecurityGroupIds on every node type it makes none (no AWS call).
    monkeypatch.setattr(aws_config, "_resource", lambda *a, **k: pytest.fail("Ray would make a security group"))
    monkeypatch.setattr(aws_config, "_client", lambda *a, **k: pytest.fail("Ray would make a security group"))
    prepared = prepare_config(copy.deepcopy(aws))
    assert aws_config._configure_security_group(prepared) is prepared
    text = AWS_YAML.read_text()
    assert "--dashboard-port" not in text and "8265" not in yaml.safe_dump(aws["provider"])
    assert "infra/aws/security-group.sh VPC_ID SSH_CIDR" in text and "L2T_SECURITY_GROUP_ID/$group" in text
    assert aws["provider"].get("use_internal_ips") in (None, False)


def test_aws_security_group_script_opens_ssh_to_the_users_cidr_only(tmp_path):
    import os
    import subprocess

    script = INFRA / "aws" / "security-group.sh"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "aws").write_text('#!/bin/sh\necho "$@" >> "$AWS_CALLS"\necho sg-0123\n')
    (fake / "aws").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "AWS_CALLS": str(tmp_path / "calls")}

    def run(*args):
        return subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=30)

    for world in ("0.0.0.0/0", "::/0", "SSH_CIDR", "not-a-cidr"):
        refused = run("vpc-1", world)
        assert refused.returncode == 2 and not (tmp_path / "calls").exists(), (world, refused.stderr)
    assert run("vpc-1").returncode != 0, "SSH_CIDR is required"
    made = run("vpc-1", "203.0.113.7/32")
    assert made.returncode == 0 and made.stdout.strip() == "sg-0123", made.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    ingress = [c for c in calls if c.startswith("ec2 authorize-security-group-ingress")]
    assert len(ingress) == 2
    assert any("UserIdGroupPairs=[{GroupId=sg-0123}]" in c for c in ingress), "node to node"
    (ssh,) = [c for c in ingress if "--port 22" in c]
    assert "--cidr 203.0.113.7/32" in ssh and "0.0.0.0/0" not in " ".join(calls)


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


def _check_shm(pod: dict, container: dict, where: str) -> None:
    """Ray's object store lives in /dev/shm: a memory volume there (a container's own is 64 MiB)."""
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    assert "/dev/shm" in mounts, f"{where}: no /dev/shm volume (Ray's object store would fall back to /tmp)"
    (volume,) = [v for v in pod.get("volumes", []) if v["name"] == mounts["/dev/shm"]]
    assert volume["emptyDir"]["medium"] == "Memory", f"{where}: /dev/shm must be an emptyDir of medium Memory"
    assert QUANTITY.match(str(volume["emptyDir"]["sizeLimit"])), where


def _check_tracking_credentials(container: dict, where: str) -> None:
    """MLflow's login reaches the head (the drivers) from a Secret, never as a value or from a ConfigMap."""
    env = {e["name"]: e for e in container.get("env", [])}
    for name, key in (("MLFLOW_TRACKING_USERNAME", "username"), ("MLFLOW_TRACKING_PASSWORD", "password")):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "l2t-mlflow" and ref["key"] == key and "value" not in env[name], where
    for name, entry in env.items():
        if re.search(r"(?i)(secret|key_id|password|token)", name):
            assert "value" not in entry and set(entry["valueFrom"]) == {"secretKeyRef"}, f"{where}: {name}"


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
    _check_shm(head["template"]["spec"], container, f"{where} head")
    _check_tracking_credentials(container, f"{where} head")
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
        _check_shm(pod, worker, gwhere)
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


def test_kuberay_rayjob_says_how_to_resume_truthfully():
    """Applying an unchanged spec to a Failed RayJob does nothing: the comment says delete + apply."""
    header = " ".join(line.lstrip("# ") for line in RAYJOB.read_text().split("apiVersion:", 1)[0].splitlines())
    assert "Re-applying after a failure resumes" not in header
    resume = header[header.index("Resuming after a failure") :]
    assert "changes nothing" in resume
    delete = resume.index("kubectl delete -f infra/kuberay/rayjob-sweep.yaml")
    assert delete < resume.index("kubectl apply -f infra/kuberay/rayjob-sweep.yaml")
    assert "kubectl replace --force -f infra/kuberay/rayjob-sweep.yaml" in resume
    docs = (REPO / "docs" / "cluster.md").read_text()
    assert "kubectl delete -f infra/kuberay/rayjob-sweep.yaml && kubectl apply" in docs
    assert "kubectl replace --force" in docs


def test_the_experiment_configmap_holds_no_tracking_credentials():
    """The RayJob's ConfigMap is made from the cluster experiment: its tracking URI carries no user:password@."""
    from orchestrator import storage
    from orchestrator.config import load_config

    cfg = load_config(EXPERIMENT)
    assert cfg.tracking.uri and not storage.URL_USERINFO.search(cfg.tracking.uri)
    for path in (RAYJOB, RAYCLUSTER):
        text = path.read_text()
        assert not storage.URL_USERINFO.search(text.replace("${", "")), f"{path.name}: a URL with credentials"
        assert "configMapKeyRef" not in text, f"{path.name}: settings from a ConfigMap into the environment"


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


def test_docs_name_only_files_and_commands_that_exist():
    text = (REPO / "docs" / "cluster.md").read_text()
    for path in set(
        re.findall(
            r"\b(infra/[\w./-]+\.(?:yaml|json|md)|infra/docker/Dockerfile|configs/[\w./-]+\.(?:yaml|json))\b", text
        )
    ):
        assert (REPO / path).exists(), f"docs/cluster.md names {path}, which does not exist"
    assert "l2t submit" in text and "ray job submit --working-dir . -- l2t sweep" in text
