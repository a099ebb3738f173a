"""Ray Jobs on a real `ray start --head` cluster with token authentication, S3 on moto's server.

One cluster for the module, started by `ray start --head` in a temporary
folder of its own (its own ports, its own token file, `RAY_TMPDIR` pointing
there), so that nothing here touches another Ray cluster on this machine:
`ray stop` is never called; the cluster's processes are found by that folder
(in their command line or environment) and ended by pid.

The cluster's environment holds the S3 endpoint and a dummy key pair (the
standard AWS chain of its nodes). Storage is `s3://` on moto's S3 server on
loopback: prepared data, Ray Train checkpoints, Tune state, MLflow artifacts
(the MLflow experiment's artifact location is s3://, so the driver writes
them there itself). The dummy secret is then looked for everywhere it must
not be: job metadata and runtime_env, logs, MLflow params, S3 objects.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import experiment_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
BUCKET = "l2t-submit"
SECRET = "l2tTestSecret" + secrets.token_hex(8)
ACCESS_KEY = "AKIAL2TTEST" + secrets.token_hex(4).upper()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any Ray address or auth settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "RAY_API_SERVER"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def processes_under(root: Path) -> list:
    """This machine's processes that belong to the Ray cluster kept in `root`: the folder is in their
    command line (session and log paths) or is their RAY_TMPDIR."""
    import psutil

    mine = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if process.pid == os.getpid():
            continue
        try:
            if str(root) in " ".join(process.info["cmdline"] or []) or process.environ().get("RAY_TMPDIR") == str(root):
                mine.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return mine


def end_processes_under(root: Path) -> None:
    """Terminate (then kill) the processes of the cluster kept in `root`, by pid; never `ray stop`."""
    import psutil

    for _ in range(3):  # workers can spawn while the first ones go
        procs = processes_under(root)
        if not procs:
            return
        for process in procs:
            try:
                process.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=15)
        for process in alive:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass


class LocalHead:
    """`ray start --head` isolated in a folder of its own; stopped by ending its own processes."""

    PORTS = (
        "port",
        "dashboard-port",
        "ray-client-server-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "runtime-env-agent-port",
        "metrics-export-port",
    )

    def __init__(
        self, num_cpus: float, env: dict[str, str] | None = None, auth: bool = True, extra_args: list[str] | None = None
    ):
        # Short: Ray's unix sockets live under it.
        self.root = Path(tempfile.mkdtemp(prefix="l2t-ray-", dir="/tmp"))
        self.ports = {name: free_port() for name in self.PORTS}
        self.token_file = self.root / "auth_token"
        fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, secrets.token_hex(32).encode())
        os.close(fd)
        self.env = clean_env(RAY_TMPDIR=str(self.root), **(env or {}))
        if auth:
            self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_file))
        else:
            self.env["RAY_AUTH_MODE"] = "disabled"
        self.num_cpus = num_cpus
        self.extra_args = list(extra_args or [])

    @property
    def address(self) -> str:
        """The dashboard (Ray Jobs) address."""
        return f"http://127.0.0.1:{self.ports['dashboard-port']}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.ports['port']}"

    def start(self) -> "LocalHead":
        command = [
            # Ray looks for `ray_current_cluster` in $RAY_TMPDIR/ray: processes that find the cluster
            # without an address (Ray Train's placement-group cleaner does) must find this one.
            str(VENV_BIN / "ray"),
            "start",
            "--head",
            f"--num-cpus={self.num_cpus}",
            f"--temp-dir={self.root / 'ray'}",
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=true",
            "--disable-usage-stats",
            "--object-store-memory=800000000",
            *(f"--{name}={port}" for name, port in self.ports.items()),
            *self.extra_args,
        ]
        out = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=240)
        if out.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        return self

    def processes(self):
        return processes_under(self.root)

    def stop(self) -> None:
        end_processes_under(self.root)
        shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, name: str, chars: int = 3000) -> str:
        found = sorted(self.root.glob(f"ray/session_latest/logs/{name}"))
        return "\n".join(f.read_text(errors="replace")[-chars:] for f in found)

    def __enter__(self) -> "LocalHead":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on loopback and the environment that points at it (dummy keys)."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET,
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=BUCKET)
    yield {"env": env, "client": client}
    server.stop()


def _staging_repo(root: Path) -> Path:
    """A copy of the code a job needs (what `--working-dir .` uploads from a checkout)."""
    out = root / "repo"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("orchestrator", "workloads", "configs"):
        shutil.copytree(REPO / name, out / name, ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", out / "pyproject.toml")
    return out


def run_logged(command: list[str], log: Path, timeout: float, **kwargs) -> tuple[int, str, str]:
    """Run a command with its output in files (readable while it runs); (exit code, stdout, stderr)."""
    import signal

    out, err = log.with_suffix(".out"), log.with_suffix(".err")
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True, start_new_session=True, **kwargs)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise AssertionError(
                f"{command[:4]} ran past {timeout:g} s:\n{out.read_text()[-4000:]}\n{err.read_text()[-3000:]}"
            ) from None
    return code, out.read_text(), err.read_text()


def _write_config(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


def _all_objects(client, prefix: str = "") -> dict[str, int]:
    out, token = {}, None
    while True:
        kwargs = {"Bucket": BUCKET, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
        page = client.list_objects_v2(**kwargs)
        out.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
        if not page.get("IsTruncated"):
            return out
        token = page["NextContinuationToken"]


def _runs(tracking_uri: str, experiment: str):
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    parents = [r for r in runs if r.data.tags.get("l2t.kind") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    return client, parents, children


def test_submit_and_ray_job_submit_run_sweeps_on_a_token_cluster_with_s3_storage(
    mlflow_server, s3, synthetic_data, tiny_model_dir, tmp_path, monkeypatch
):
    import mlflow
    from ray.job_submission import JobSubmissionClient

    from orchestrator.sweep import sweep_name

    for key, value in s3["env"].items():
        monkeypatch.setenv(key, value)
    repo = _staging_repo(tmp_path)
    store = f"s3://{BUCKET}/store"
    client = mlflow.tracking.MlflowClient(tracking_uri=mlflow_server)
    for name in ("submit-s3", "submit-plain"):
        client.create_experiment(name, artifact_location=f"s3://{BUCKET}/mlflow/{name}")

    def config(experiment, **sweep):
        return experiment_config(
            store,
            data={
                "synthetic": None,
                "sources": [str(synthetic_data.train_file)],
                "image_root": str(synthetic_data.image_root),
                "eval_file": str(synthetic_data.eval_file),
            },
            model={"name_or_path": tiny_model_dir},
            masking={"mode": "l2t"},
            # 2 trials x 2 workers x 0.4 CPU leave room on 2 CPUs for Ray Data's per-rank tasks (0.05 CPU each).
            train={
                "max_steps": 4,
                "log_every": 2,
                "checkpoint_every": 2,
                "micro_batch_size": 8,
                "cpus_per_worker": 0.4,
            },
            eval={"max_rows": 8},
            tracking={"uri": mlflow_server, "experiment": experiment},
            sweep=sweep,
        )

    grid = config("submit-s3", lambda_instruction=[0.0, 1.0], max_concurrent_trials=2)
    single = config("submit-plain", search="points", points=[{"masking.lambda_instruction": 0.5}])
    _write_config(grid, repo / "grid.yaml")
    _write_config(single, repo / "single.yaml")

    # The cluster's nodes hold the S3 endpoint and keys (their standard chain); the client side gets
    # the keys too, to prove that `l2t submit` does not forward them.
    with LocalHead(num_cpus=2, env=s3["env"]) as head:
        submit_env = clean_env(**s3["env"], RAY_AUTH_TOKEN_PATH=str(head.token_file), TOKENIZERS_PARALLELISM="false")

        # Without the token the cluster refuses, and the error says what to set.
        code, _, err = run_logged(
            [sys.executable, "-m", "orchestrator.cli", "submit", "grid.yaml", "--sweep", "--address", head.address],
            tmp_path / "no-token",
            120,
            cwd=repo,
            env=clean_env(HOME=str(tmp_path)),
        )
        assert code == 2, err[-2000:]
        assert "RAY_AUTH_MODE=token" in err and "RAY_AUTH_TOKEN" in err

        # 1. `l2t submit` (the same command, run as a module): a 2-trial sweep, logs followed, the MLflow link printed.
        started = time.time()
        code, out, err = run_logged(
            [sys.executable, "-m", "orchestrator.cli", "submit", "grid.yaml", "--sweep", "--address", head.address],
            tmp_path / "l2t-submit",
            600,
            cwd=repo,
            env=submit_env,
        )
        submit_s = time.time() - started
        assert code == 0, f"{out[-4000:]}\n{err[-3000:]}"
        assert "[sweep]" in out, "the driver's logs were followed"
        submission_id = err.split("submitted ", 1)[1].split(" ", 1)[0]
        assert submission_id.startswith("l2t-sweep-test-")
        link = next(line for line in err.splitlines() if line.startswith("MLflow parent run: "))
        assert link.startswith(f"MLflow parent run: {mlflow_server}/#/experiments/")
        parent_id = link.rsplit("/", 1)[1]

        jobs = JobSubmissionClient(head.address, headers={"Authorization": f"Bearer {head.token_file.read_text()}"})
        info = jobs.get_job_info(submission_id)
        assert info.entrypoint == "python -m orchestrator.cli sweep grid.yaml"
        assert info.metadata["l2t.command"] == "sweep" and info.metadata["l2t.sweep"] == sweep_name(grid)
        env_vars = info.runtime_env["env_vars"]
        assert env_vars["AWS_ENDPOINT_URL"] == s3["env"]["AWS_ENDPOINT_URL"]
        assert "AWS_SECRET_ACCESS_KEY" not in env_vars and "AWS_ACCESS_KEY_ID" not in env_vars
        logs = {submission_id: jobs.get_job_logs(submission_id)}

        # 2. Plain `ray job submit` of `l2t sweep` (the cluster's installed l2t), as the README shows it.
        started = time.time()
        code, out, err = run_logged(
            [
                str(VENV_BIN / "ray"),
                "job",
                "submit",
                "--address",
                head.address,
                "--working-dir",
                ".",
                "--submission-id",
                "plain-sweep",
                "--",
                "l2t",
                "sweep",
                "single.yaml",
            ],
            tmp_path / "ray-job-submit",
            600,
            cwd=repo,
            env=clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(head.token_file)),
        )
        plain_s = time.time() - started
        assert code == 0, f"{out[-4000:]}\n{err[-2000:]}"
        assert "succeeded" in out.lower()
        logs["plain-sweep"] = jobs.get_job_logs("plain-sweep")
        job_infos = json.dumps([jobs.get_job_info(j).model_dump() for j in logs], default=str)
    print(f"l2t submit: {submit_s:.0f} s, ray job submit: {plain_s:.0f} s")

    # MLflow: a parent per sweep, one child per trial, metrics and artifacts; artifacts live in S3.
    _, parents, children = _runs(mlflow_server, "submit-s3")
    assert [p.info.run_id for p in parents] == [parent_id]
    assert sorted(c.data.params["masking.lambda_instruction"] for c in children) == ["0.0", "1.0"]
    for child in children:
        assert "eval/accuracy" in child.data.metrics and child.info.artifact_uri.startswith(
            f"s3://{BUCKET}/mlflow/submit-s3/"
        )
        assert {"config.json", "eval", "metrics"} <= {a.path for a in client.list_artifacts(child.info.run_id)}
    _, plain_parents, plain_children = _runs(mlflow_server, "submit-plain")
    assert len(plain_parents) == 1 and len(plain_children) == 1
    assert plain_children[0].data.params["masking.lambda_instruction"] == "0.5"

    # S3 holds the prepared data, the Tune state, Ray Train's checkpoints and MLflow's artifacts.
    objects = _all_objects(s3["client"])
    keys = list(objects)
    name = sweep_name(grid)
    assert any(k.startswith("store/prepared/") and k.endswith("manifest.json") for k in keys)
    assert f"store/sweeps/{name}/sweep.json" in objects
    for child in children:
        run_name = child.data.tags["l2t.run_folder"]  # the MLflow run is named by its point
        checkpoints = {k.split("/")[3] for k in keys if k.startswith(f"store/runs/{run_name}/checkpoint_")}
        assert len(checkpoints) >= 1, f"no checkpoint of {run_name} in S3: {sorted(keys)[:40]}"
        assert f"mlflow/submit-s3/{child.info.run_id}/artifacts/config.json" in objects

    # The secret key is nowhere: not in the jobs' metadata or runtime_env, logs, MLflow params, S3 objects.
    assert SECRET not in job_infos
    for job_id, text in logs.items():
        assert SECRET not in text, f"the secret key is in the logs of {job_id}"
    for run in [*parents, *children, *plain_parents, *plain_children]:
        assert SECRET not in json.dumps(run.data.params) and SECRET not in json.dumps(run.data.tags)
    leaked = [
        k
        for k, size in objects.items()
        if size < 20_000_000 and SECRET.encode() in s3["client"].get_object(Bucket=BUCKET, Key=k)["Body"].read()
    ]
    assert not leaked, (
        f"the secret key was written to S3 in {leaked}: a pyarrow S3FileSystem built with explicit keys "
        "(orchestrator/storage.py) carries them into everything Ray pickles, Tune's tuner.pkl included"
    )
