"""Shared fixtures: a small synthetic data set, the tiny model, one Ray cluster per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    from workloads.synthetic import write_synthetic_dataset

    out = tmp_path_factory.mktemp("synthetic")
    return write_synthetic_dataset(
        out,
        train_rows=400,
        eval_rows=40,
        seed=0,
        max_objects=1,
        image_size=32,
        kinds=("color", "shape", "exists", "caption"),
    )


@pytest.fixture(scope="session")
def tiny_model_dir(synthetic_data, tmp_path_factory) -> str:
    """The tiny LLaVA preset, its tokenizer trained on the synthetic corpus rendered with vicuna_v1."""
    from orchestrator.inputs import tokenizer_corpus
    from workloads.config import TinyModelConfig
    from workloads.tiny_model import build_tiny_model

    out = tmp_path_factory.mktemp("tiny-model")
    build_tiny_model(out, tokenizer_corpus([str(synthetic_data.train_file)], "vicuna_v1"), TinyModelConfig())
    return str(out)


S3_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on loopback for the session, in this process's AWS environment (dummy keys).

    Set before the session's Ray cluster starts, so its workers find the endpoint and the keys
    through the standard AWS chain, as cluster nodes do (instance roles, IRSA): l2t never ships
    keys to workers itself.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {**S3_TEST_ENV, "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        yield env
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    """One local Ray cluster for every Ray test of the session (start-up costs seconds)."""
    import ray

    from orchestrator.cluster import connect

    connect(num_cpus=2)
    yield
    ray.shutdown()


def fail_once_after(step: int, marker: str):
    """A `wrap_report` for fault injection: rank 0 raises right after reporting `step`, once (a file marks it).

    Nested functions, so Ray ships them to workers by value (cloudpickle), with no test module to import there.
    """

    def wrap(report):
        def report_then_fail(metrics, checkpoint_dir):
            import torch.distributed as dist

            report(metrics, checkpoint_dir)
            rank = dist.get_rank() if dist.is_initialized() else 0
            if int(metrics.get("step", -1)) == step and not metrics.get("final") and rank == 0:
                if not Path(marker).exists():
                    Path(marker).write_text(str(step))
                    raise RuntimeError(f"injected failure after step {step}")

        return report_then_fail

    return wrap


@pytest.fixture(scope="session")
def inject_failure():
    """`fail_once_after(step, marker)`: a report wrapper that fails a run once after `step`."""
    return fail_once_after


def experiment_config(storage_path: Path | str, **sections):
    """A small experiment config (synthetic data, tiny model) with section overrides."""
    from orchestrator.config import config_from_dict

    raw = {
        "name": "test",
        "data": {
            "synthetic": {
                "train_rows": 400,
                "eval_rows": 40,
                "max_objects": 1,
                "kinds": ["color", "shape", "exists", "caption"],
            },
            "chat_template": "vicuna_v1",
            "max_length": 128,
        },
        "model": {"name_or_path": "tiny", "freeze": "none"},
        "train": {"max_steps": 10, "lr": 2e-3, "micro_batch_size": 8, "num_workers": 2, "log_every": 5},
        "eval": {"max_rows": 40},
        "storage": {"path": str(storage_path)},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return config_from_dict(raw)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on loopback (SQLite store), started once per session: its URI."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    root = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(root / "server.log", "w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(1)
    yield uri
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
