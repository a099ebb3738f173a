"""`l2t submit`: run `l2t train` or `l2t sweep` as a Ray Job on a remote cluster.

The config is checked here first (schema, overrides, sweep points), so a typo
fails in a second on the laptop, not minutes later on the cluster. The job
then gets:

- the code: the working directory (this repository) uploaded by Ray Jobs,
  with `.gitignore` honoured and virtual environments and outputs left out;
  its entrypoint runs that uploaded copy (`python -m orchestrator.cli ...`).
  Or a container image (`--image`, Ray's `image_uri`) that has the project
  installed (infra/docker/Dockerfile): the entrypoint is then `l2t ...` and
  CONFIG is a path inside the image;
- extra pip packages (`--pip`), environment variables (`--env`, plus the S3
  endpoint and region variables when set here) and entrypoint resources;
- a readable submission id, `l2t-<command>-<name>-<time>-<4 hex>`, and
  metadata naming the config, the overrides and the git commit.

Credentials never travel with a job: variables that look like secrets are
refused, AWS keys are never forwarded, and overrides carrying
`user:password@` are refused. On the cluster they come from the standard
chains (instance profile or service account for S3, the cluster's environment
for MLflow).

Ray 2.60 clusters may require an auth token. Ray's own clients send one when
`RAY_AUTH_MODE=token` (token from `RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH` or
`~/.ray/auth_token`); `l2t submit` does the same, and also sends the token it
finds when the address is on this machine (a local `ray start --head`, an SSH
tunnel, a `kubectl port-forward`), the case where `ray start` turned token
authentication on by itself. The token is never printed.

After submitting, the driver's logs are followed until the job ends, and the
MLflow run (a sweep's parent run) is printed as a link.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import secrets
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from orchestrator import storage
from orchestrator.config import REPO_ROOT, ExperimentConfig, load_config
from orchestrator.tracking import git_commit

# Set here and present on the cluster's side too: the S3 endpoint and region (never keys).
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "MLFLOW_S3_ENDPOINT_URL",
)
# Names that must not be sent with a job: the job's runtime_env is stored by the cluster and shown on the dashboard.
SECRET_WORDS = set("secret token password passwd pwd credential credentials session key apikey private".split())
# Left out of the uploaded working directory (on top of .gitignore, which Ray honours).
EXCLUDES = [
    ".git/",
    ".venv/",
    "venv/",
    "**/__pycache__/",
    ".pytest_cache/",
    ".hypothesis/",
    "mlruns/",
    "l2t_runs/",
    "l2t_quickstart/",
    "l2t_compare/",
    "*.egg-info/",
]
RUN_ID_IN_LOGS = re.compile(r"MLflow\s+(parent\s+run|run)\s+([0-9a-f]{32})")  # rich may wrap the line anywhere


class SubmitError(RuntimeError):
    """The job can't be submitted as asked."""


@dataclass
class Submission:
    """Everything `JobSubmissionClient.submit_job` gets, decided before contacting the cluster."""

    command: str
    entrypoint: str
    submission_id: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None
    entrypoint_memory: int | None = None
    entrypoint_resources: dict[str, float] | None = None
    tracking_uri: str | None = None
    """The config's MLflow URI (None: a SQLite store on the cluster)."""
    experiment: str = "l2t"
    warnings: list[str] = field(default_factory=list)

    def submit_kwargs(self) -> dict[str, Any]:
        kwargs = {
            "entrypoint": self.entrypoint,
            "submission_id": self.submission_id,
            "runtime_env": self.runtime_env,
            "metadata": self.metadata,
            "entrypoint_num_cpus": self.entrypoint_num_cpus,
            "entrypoint_num_gpus": self.entrypoint_num_gpus,
            "entrypoint_memory": self.entrypoint_memory,
            "entrypoint_resources": self.entrypoint_resources,
        }
        return {k: v for k, v in kwargs.items() if v is not None}


# ---------------------------------------------------------------- planning


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "run"


def submission_id_for(command: str, name: str) -> str:
    """Readable and unique: `l2t-sweep-lambda-grid-20251126-141502-3fa9`."""
    return f"l2t-{command}-{_slug(name)}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def parse_pairs(items: list[str] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SubmitError(f"{what} {item!r} is not of the form KEY=VALUE")
        out[key.strip()] = value
    return out


def looks_secret(name: str) -> bool:
    """AWS_SECRET_ACCESS_KEY, HF_TOKEN, WANDB_API_KEY, DB_PASSWORD... (TOKENIZERS_PARALLELISM is not)."""
    return bool(SECRET_WORDS & set(re.split(r"[^a-z0-9]+", name.lower())))


def job_env(extra: dict[str, str] | None = None, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The job's environment variables: S3 endpoint/region from here, then `extra`; secrets refused."""
    environ = os.environ if environ is None else environ
    env = {name: environ[name] for name in FORWARDED_ENV if environ.get(name)}
    for name, value in (extra or {}).items():
        if looks_secret(name):
            raise SubmitError(
                f"--env {name}: looks like a credential. Jobs carry no credentials (their runtime_env is stored "
                "by the cluster and shown on its dashboard); set it on the cluster instead: an instance profile or "
                "service account for AWS, the cluster's environment or a Kubernetes Secret for the rest"
            )
        if storage.URL_USERINFO.search(value):
            raise SubmitError(f"--env {name}: the value holds user:password@; give credentials to the cluster instead")
        env[name] = value
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _inside(path: Path, root: Path) -> Path | None:
    try:
        return path.resolve().relative_to(root.resolve())
    except ValueError:
        return None


def check_overrides(overrides: list[str]) -> None:
    """Refuse overrides that carry credentials (they would be stored with the job)."""
    for item in overrides:
        if storage.URL_USERINFO.search(item):
            raise SubmitError(f"override {item.split('=')[0]}: holds user:password@; jobs carry no credentials")


def storage_warnings(cfg: ExperimentConfig) -> list[str]:
    """Refuse a relative storage.path (lost with the job's working directory); warn about settings that
    only work on one machine or keep the runs out of sight from here."""
    warnings: list[str] = []
    store = cfg.storage.path
    if not store.startswith("s3://"):
        if not os.path.isabs(os.path.expanduser(store)):
            raise SubmitError(
                f"storage.path {store!r} is relative: on the cluster it would land in the job's temporary working "
                "directory and be lost. Give s3://BUCKET/PREFIX, or an absolute path on storage every node shares "
                "(e.g. storage.path=s3://my-bucket/l2t)"
            )
        warnings.append(f"storage.path {store} is local to each node: fine for a one-machine cluster, not for several")
    if cfg.data.synthetic is not None and store.startswith("s3://"):
        warnings.append(
            "data.synthetic is generated on local disk: with an s3:// storage.path, generate it once, "
            "upload it and set data.sources"
        )
    if not cfg.tracking.uri:
        warnings.append(
            "tracking.uri is unset: MLflow runs go to a SQLite file under storage.path on the cluster; "
            "set tracking.uri=http://MLFLOW:5000 to see them from here"
        )
    return warnings


def image_code(config: Path, image: str, pip: list[str] | None, warnings: list[str]) -> tuple[str, str, dict]:
    """(runner, config argument, runtime_env entries) for code installed in a container image."""
    if pip:
        raise SubmitError(
            "--pip can't be combined with --image (Ray runs an image_uri job as is): install the packages in the image"
        )
    if Path(config).is_absolute():
        warnings.append(f"{config} is an absolute path: with --image it must exist inside the image")
    return "l2t", str(config), {"image_uri": image}


def uploaded_code(config: Path, working_dir: Path | None, pip: list[str] | None) -> tuple[str, str, dict]:
    """(runner, config argument, runtime_env entries) for the working directory uploaded with the job."""
    if working_dir is None:
        raise SubmitError("give --working-dir (the repository) or --image")
    wd = Path(working_dir).expanduser().resolve()
    if not wd.is_dir():
        raise SubmitError(f"--working-dir {working_dir}: not a folder")
    relative = _inside(Path(config), wd)
    if relative is None:
        raise SubmitError(
            f"{config} is outside the working directory {wd}, so the job would not have it: "
            "keep the config in the repository (e.g. configs/) or pass --working-dir"
        )
    # The uploaded copy of the code runs when it is there; else the cluster's installed `l2t`.
    uploaded = (wd / "orchestrator" / "cli" / "__init__.py").is_file()
    entries: dict[str, Any] = {"working_dir": str(wd), "excludes": list(EXCLUDES)}
    if pip:
        entries["pip"] = {"packages": list(pip), "pip_check": False}
    return ("python -m orchestrator.cli" if uploaded else "l2t"), relative.as_posix(), entries


def job_metadata(
    cfg: ExperimentConfig, command: str, config_arg: str, overrides: list[str], code_dir: Path
) -> dict[str, str]:
    """What the job is: command, config, name, overrides, experiment, git commit (and the sweep's name)."""
    metadata = {
        "l2t.command": command,
        "l2t.config": config_arg,
        "l2t.name": cfg.name,
        "l2t.overrides": " ".join(overrides),
        "l2t.experiment": cfg.tracking.experiment,
        "l2t.git_commit": git_commit(code_dir),
    }
    if command == "sweep":
        from orchestrator.sweep import sweep_name

        metadata["l2t.sweep"] = sweep_name(cfg)
    return metadata


def plan_submission(
    config: Path,
    overrides: list[str] | None = None,
    *,
    sweep: bool = False,
    working_dir: Path | None = Path("."),
    image: str | None = None,
    pip: list[str] | None = None,
    env: dict[str, str] | None = None,
    submission_id: str | None = None,
    entrypoint_num_cpus: float | None = None,
    entrypoint_num_gpus: float | None = None,
    entrypoint_memory: int | None = None,
    entrypoint_resources: dict[str, float] | None = None,
    environ: dict[str, str] | None = None,
) -> Submission:
    """Check the config locally and decide the job's entrypoint, runtime_env, id and metadata."""
    overrides = list(overrides or [])
    command = "sweep" if sweep else "train"
    check_overrides(overrides)
    cfg = load_config(config, overrides)  # ConfigError names the bad key
    if sweep:
        from orchestrator.sweep import sweep_points

        sweep_points(cfg)  # ConfigError when there is nothing to sweep or a point is invalid
    warnings = storage_warnings(cfg)
    runtime_env: dict[str, Any] = {"env_vars": job_env(env, environ)}
    if image:
        runner, config_arg, code = image_code(config, image, pip, warnings)
    else:
        runner, config_arg, code = uploaded_code(config, working_dir, pip)
    runtime_env.update(code)
    entrypoint = " ".join([runner, command, shlex.quote(config_arg), *(shlex.quote(o) for o in overrides)])
    code_dir = Path(working_dir) if working_dir and not image else REPO_ROOT
    return Submission(
        command=command,
        entrypoint=entrypoint,
        submission_id=submission_id or submission_id_for(command, cfg.name),
        runtime_env=runtime_env,
        metadata=job_metadata(cfg, command, config_arg, overrides, code_dir),
        entrypoint_num_cpus=entrypoint_num_cpus,
        entrypoint_num_gpus=entrypoint_num_gpus,
        entrypoint_memory=entrypoint_memory,
        entrypoint_resources=entrypoint_resources or None,
        tracking_uri=cfg.tracking.uri,
        experiment=cfg.tracking.experiment,
        warnings=warnings,
    )


# ---------------------------------------------------------------- talking to the cluster


def resolve_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("give --address http://HEAD:8265 (the Ray dashboard), or set RAY_API_SERVER_ADDRESS")
    return address


def _is_local(address: str) -> bool:
    host = urlparse(address if "://" in address else f"http://{address}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def find_token(environ: dict[str, str] | None = None) -> str | None:
    """Ray's token, where Ray looks for it: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    environ = os.environ if environ is None else environ
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return environ["RAY_AUTH_TOKEN"].strip()
    path = environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as error:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path}: can't read it ({error.strerror})") from None
        if not token:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path} is empty")
        return token
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file():
        return default.read_text().strip() or None
    return None


def auth_headers(address: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The Authorization header for a token-protected cluster, or none.

    Sent when `RAY_AUTH_MODE=token` (as Ray's own clients do), and when the
    mode is unset and the address is on this machine (local `ray start`,
    SSH tunnel, port-forward). Never sent with `RAY_AUTH_MODE=disabled`.
    """
    environ = os.environ if environ is None else environ
    mode = (environ.get("RAY_AUTH_MODE") or "").lower()
    if mode == "disabled" or (mode != "token" and not _is_local(address)):
        return {}
    token = find_token(environ)
    if token is None:
        if mode == "token":
            raise SubmitError(
                "RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, "
                "or write ~/.ray/auth_token"
            )
        return {}
    return {"Authorization": f"Bearer {token}"}


def connect(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=auth_headers(address))
    except Exception as error:  # noqa: BLE001 - turn Ray's connection errors into one readable line
        text = str(error)
        if "401" in text or "403" in text or "uthentication" in text:
            raise SubmitError(
                f"the cluster at {address} refused the request ({text.splitlines()[0]}). It uses token "
                "authentication: export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH)"
            ) from None
        raise SubmitError(
            f"can't reach the Ray dashboard at {address}: {text.splitlines()[0] if text else error!r}"
        ) from None


def submit(submission: Submission, client) -> str:
    try:
        return client.submit_job(**submission.submit_kwargs())
    except RuntimeError as error:
        raise SubmitError(f"the cluster did not take the job: {error}") from None


def follow_logs(client, submission_id: str, out=None) -> None:
    """Stream the driver's output until the job ends."""
    out = out or sys.stdout

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())


def wait_for_end(client, submission_id: str, poll_s: float = 2.0, timeout_s: float | None = None):
    from ray.job_submission import JobStatus

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = client.get_job_status(submission_id)
        if JobStatus(status).is_terminal():
            return JobStatus(status)
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {submission_id} still {status} after {timeout_s:g} s")
        time.sleep(poll_s)


def mlflow_runs_in(logs: str) -> list[tuple[str, str]]:
    """(kind, run id) for each MLflow run the driver printed: `run` (l2t train) or `parent run` (l2t sweep)."""
    seen, out = set(), []
    for kind, run_id in RUN_ID_IN_LOGS.findall(logs):
        if run_id not in seen:
            seen.add(run_id)
            out.append((" ".join(kind.split()), run_id))
    return out


def mlflow_link(tracking_uri: str | None, run_id: str, ui_url: str | None = None) -> str:
    """A link to the run in the MLflow UI, or where the run is when no UI is reachable from here."""
    base = ui_url or tracking_uri
    if not base or not base.startswith(("http://", "https://")):
        where = tracking_uri or "a SQLite store under storage.path on the cluster"
        return f"run {run_id} in {storage.redact(where)}"
    server = tracking_uri if tracking_uri and tracking_uri.startswith(("http://", "https://")) else None
    experiment_id = _experiment_of(server, run_id) if server else None
    base = storage.redact(base.rstrip("/"))
    if experiment_id is None:
        return f"{base} (run {run_id})"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def _experiment_of(tracking_uri: str, run_id: str, timeout_s: float = 5.0) -> str | None:
    """The run's experiment id from MLflow's REST API: one quick request, no retries (the server may
    only be reachable from inside the cluster)."""
    import base64
    import json
    import urllib.parse
    import urllib.request

    url = f"{tracking_uri.rstrip('/')}/api/2.0/mlflow/runs/get?{urllib.parse.urlencode({'run_id': run_id})}"
    request = urllib.request.Request(url)
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        request.add_header("Authorization", f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}")
    elif os.environ.get("MLFLOW_TRACKING_USERNAME"):
        pair = f"{os.environ['MLFLOW_TRACKING_USERNAME']}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}"
        request.add_header("Authorization", "Basic " + base64.b64encode(pair.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.load(response)["run"]["info"]["experiment_id"]
    except (OSError, ValueError, KeyError):
        return None


def run(
    submission: Submission, address: str, *, follow: bool = True, mlflow_ui: str | None = None, out=None, say=None
) -> int:
    """Submit, follow the logs, report the end state and the MLflow link. Returns the exit code."""
    out = out or sys.stdout
    say = say or (lambda message: print(message, file=sys.stderr, flush=True))
    for warning in submission.warnings:
        say(f"warning: {warning}")
    client = connect(address)
    submission_id = submit(submission, client)
    say(f"submitted {submission_id} to {address}: {submission.entrypoint}")
    if not follow:
        say(f"follow it:  ray job logs --address {address} --follow {submission_id}")
        say(f"stop it:    ray job stop --address {address} {submission_id}")
        return 0
    try:
        try:
            follow_logs(client, submission_id, out)
        except Exception as error:  # noqa: BLE001 - a dropped stream does not end the job
            say(f"lost the log stream ({error}); waiting for the job to end")
        status = wait_for_end(client, submission_id)
    except KeyboardInterrupt:
        say(f"stopped following; {submission_id} keeps running.")
        say(f"follow again: ray job logs --address {address} --follow {submission_id}")
        say(f"stop it:      ray job stop --address {address} {submission_id}")
        return 130
    info = client.get_job_info(submission_id)
    if status.value != "SUCCEEDED":
        say(f"job {submission_id} {status.value}: {info.message or ''}".rstrip(": "))
        return 1
    runs = mlflow_runs_in(client.get_job_logs(submission_id))
    say(f"job {submission_id} SUCCEEDED")
    for kind, run_id in runs:
        say(f"MLflow {kind}: {mlflow_link(submission.tracking_uri, run_id, mlflow_ui)}")
    if not runs:
        say("no MLflow run was printed by the job")
    return 0
