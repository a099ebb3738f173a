"""Several Ray nodes on one machine: training across nodes, losing a node mid-run, autoscaling sweeps.

Each scenario's driver runs in a subprocess of its own (this file, run as a
script), because `ray.init` is process-wide and the session's `ray_cluster`
fixture may already hold this pytest process. Every cluster lives in a
temporary folder of its own (`RAY_TMPDIR`, its own ports), so nothing here
finds, joins or stops another Ray cluster on the machine; leftovers are ended
by pid, never with `ray stop`.

- `ray.cluster_utils.Cluster`: a head that takes no work (0 CPUs) and two
  2-CPU worker nodes. A 2-worker Ray Train run whose workers need more than
  half a node each (1.5 CPUs), so it spans both nodes. Once a checkpoint is in
  storage, one worker node is removed abruptly (its processes killed, as a
  spot reclaim would) and a fresh node joins (what the autoscaler does); the
  run restarts from the checkpoint and finishes with every step.
- Ray's fake multi-node autoscaler (the `fake_multinode` provider that
  `ray.cluster_utils.AutoscalingCluster` drives), started here with
  `ray start --head --autoscaling-config`: AutoscalingCluster itself can't
  be used, as Ray 2.60's wheel lacks the example.yaml it reads, and its
  start() runs `ray stop --force`, which would stop every Ray cluster on the
  machine. A head with 0 CPUs and no worker nodes. A 2-trial sweep asks for
  more than the cluster has; the autoscaler adds nodes, and the trials' Train
  worker groups land on different nodes.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MB = 1024 * 1024


# ---------------------------------------------------------------- the pytest side


def _run_scenario(name: str, args: dict, tmp_path: Path, env: dict[str, str], timeout: float) -> dict:
    """Run `python tests/test_multinode_ray.py NAME ARGS.json` and return the JSON it writes."""
    from test_submit_ray import run_logged

    args = {**args, "out": str(tmp_path / f"{name}.json")}
    args_file = tmp_path / f"{name}-args.json"
    args_file.write_text(json.dumps(args))
    code, out, err = run_logged(
        [sys.executable, str(Path(__file__)), name, str(args_file)], tmp_path / name, timeout, cwd=REPO, env=env
    )
    assert code == 0, f"scenario {name} failed:\n{out[-5000:]}\n{err[-5000:]}"
    return json.loads(Path(args["out"]).read_text())


def _data_args(synthetic_data, tiny_model_dir, storage: Path) -> dict:
    return {
        "storage": str(storage),
        "train_file": str(synthetic_data.train_file),
        "eval_file": str(synthetic_data.eval_file),
        "image_root": str(synthetic_data.image_root),
        "model": tiny_model_dir,
    }


def test_training_spans_two_nodes_and_finishes_after_losing_one(synthetic_data, tiny_model_dir, tmp_path):
    from test_submit_ray import clean_env, end_processes_under

    root = Path(tempfile.mkdtemp(prefix="l2t-mn-", dir="/tmp"))  # short: Ray's sockets live under it
    env = clean_env(RAY_TMPDIR=str(root), RAY_AUTH_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    try:
        result = _run_scenario(
            "node_loss", _data_args(synthetic_data, tiny_model_dir, tmp_path / "store"), tmp_path, env, timeout=540
        )
    finally:
        end_processes_under(root)
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({k: v for k, v in result.items() if k not in ("raw_steps",)}, indent=1))

    head, workers = result["head_node"], result["worker_nodes"]
    train_nodes = set(result["train_worker_nodes_before_loss"])
    assert len(train_nodes) == 2 and head not in train_nodes and train_nodes <= set(workers), (
        "the run spanned both worker nodes"
    )
    assert result["removed_node"] in train_nodes
    after = set(result["train_worker_nodes_after_loss"])
    assert result["replacement_node"] in after and result["removed_node"] not in after, (
        "the restarted group uses the new node"
    )
    assert result["step_when_removed"] < result["max_steps"], "the node went away mid-run"

    # The worker group failed once, was restarted, and went on from the last checkpoint, not from step 0.
    events = result["events"]
    failures = [i for i, e in enumerate(events) if e["event"] == "failure"]
    assert failures, f"Ray Train saw no worker failure: {events}"
    checkpoints = [e["step"] for e in events[: failures[0]] if e["event"] == "report" and e["checkpoint"]]
    assert checkpoints, "a checkpoint was in storage before the node went"
    first_after = next(e["step"] for e in events[failures[-1] :] if e["event"] == "report")
    assert first_after == checkpoints[-1] + result["log_every"], (
        f"did not resume from the step-{checkpoints[-1]} checkpoint: {events}"
    )

    # Nothing lost: every planned report is there exactly once and the run reached its last step.
    assert result["history_steps"] == list(range(result["log_every"], result["max_steps"] + 1, result["log_every"]))
    assert sorted(set(result["raw_steps"])) == result["history_steps"]
    assert result["final_step"] == result["max_steps"] and result["model_saved"]


def test_sweep_scales_the_cluster_up_and_spreads_trials_over_nodes(synthetic_data, tiny_model_dir, tmp_path):
    from test_submit_ray import LocalHead, clean_env

    head = LocalHead(num_cpus=0)
    autoscaling = {
        "cluster_name": "l2t-fake",
        "max_workers": 3,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": head.gcs_address,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu1": {
                "resources": {"CPU": 1, "object_store_memory": 300 * MB},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 3,
            },
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }
    config_file = head.root / "autoscaling.json"
    config_file.write_text(json.dumps(autoscaling))
    head.env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    head.extra_args = [f"--autoscaling-config={config_file}"]
    with head:
        env = clean_env(
            RAY_ADDRESS=head.gcs_address,
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(head.token_file),
            RAY_TMPDIR=str(head.root),
            TOKENIZERS_PARALLELISM="false",
        )
        result = _run_scenario(
            "sweep_autoscale",
            _data_args(synthetic_data, tiny_model_dir, tmp_path / "store"),
            tmp_path,
            env,
            timeout=600,
        )
        monitor_log = head.log_tail("monitor.log", chars=200_000)
        (tmp_path / "monitor.log").write_text(monitor_log)  # the autoscaler's decisions, for a post-mortem
    print(json.dumps({k: v for k, v in result.items() if k != "polls"}, indent=1))

    assert result["worker_nodes_at_start"] == 0
    assert result["max_worker_nodes_seen"] >= 2, "the autoscaler added nodes for the sweep"
    assert "cpu1" in monitor_log and ("Adding" in monitor_log or "launch" in monitor_log.lower())
    assert [t["status"] for t in result["trials"]] == ["completed", "completed"]
    groups = result["train_placement_groups"]
    assert len(groups) >= 2, groups
    nodes_per_group = [set(g) for g in groups.values()]
    assert all(len(n) == 1 for n in nodes_per_group), "each trial's workers packed on one node"
    assert len(set.union(*nodes_per_group)) >= 2, "the trials ran on different nodes"
    assert result["mlflow_children"] == 2


# ---------------------------------------------------------------- the scenarios (run as a script)


def _config(args: dict, **sections):
    sys.path.insert(0, str(HERE))
    from conftest import experiment_config

    data = {
        "synthetic": None,
        "sources": [args["train_file"]],
        "image_root": args["image_root"],
        "eval_file": args["eval_file"],
    }
    return experiment_config(args["storage"], data=data, model={"name_or_path": args["model"]}, **sections)


def _alive_train_workers() -> list[dict]:
    from ray.util.state import list_actors

    actors = list_actors(
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")], raise_on_missing_output=False
    )
    return [{"actor_id": a.actor_id, "node_id": a.node_id} for a in actors]


def _event_log(path: str):
    """A Ray Train callback (it runs in the controller) that records reports, checkpoints and worker failures."""
    from ray.train import UserCallback

    class Events(UserCallback):
        def _write(self, row: dict) -> None:
            with open(path, "a") as handle:
                handle.write(json.dumps({**row, "time": time.time()}) + "\n")

        def after_report(self, run_context, metrics, checkpoint):
            self._write(
                {"event": "report", "step": int(metrics[0].get("step", 0)), "checkpoint": checkpoint is not None}
            )

        def after_exception(self, run_context, worker_exceptions):
            self._write(
                {
                    "event": "failure",
                    "ranks": sorted(worker_exceptions),
                    "errors": [type(e).__name__ for e in worker_exceptions.values()],
                }
            )

    return Events()


def scenario_node_loss(args: dict) -> dict:
    """ray.cluster_utils.Cluster: head (0 CPU) + 2 worker nodes; lose one mid-run, add a fresh one."""
    import ray
    from ray.cluster_utils import Cluster
    from test_submit_ray import free_port

    from orchestrator.experiment import prepare_inputs
    from orchestrator.train import run_train

    max_steps, log_every, checkpoint_every = 40, 5, 10
    node_args = {"num_cpus": 2, "object_store_memory": 250 * MB}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "object_store_memory": 250 * MB,
            "include_dashboard": True,
            "dashboard_port": free_port(),
            "dashboard_agent_listen_port": free_port(),
        },
    )
    try:
        workers = [cluster.add_node(**node_args) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="WARNING")
        # Workers need 1.5 of a node's 2 CPUs: two can't share a node, so the run spans both.
        cfg = _config(
            args,
            train={
                "max_steps": max_steps,
                "log_every": log_every,
                "checkpoint_every": checkpoint_every,
                "max_failures": 3,
                "num_workers": 2,
                "cpus_per_worker": 1.5,
                "micro_batch_size": 8,
                "lr_schedule": "constant",
                "warmup_ratio": 0.0,
            },
        )
        resolved, model_dir, prepared = prepare_inputs(cfg)
        run_name = "node-loss"
        run_path = Path(args["storage"], "runs", run_name)
        outcome: dict = {}

        events_file = Path(args["out"]).with_suffix(".events.jsonl")

        def fit() -> None:
            try:
                outcome["result"] = run_train(
                    resolved, prepared, model_dir, run_name, callbacks=[_event_log(str(events_file))]
                )
            except BaseException as error:  # noqa: BLE001 - reported to the test
                outcome["error"] = repr(error)

        thread = threading.Thread(target=fit, daemon=True)
        thread.start()

        def reported_steps() -> list[int]:
            log = run_path / "metrics.jsonl"
            if not log.exists():
                return []
            return [int(json.loads(line)["step"]) for line in log.read_text().splitlines() if line.strip()]

        before: dict[str, str] = {}  # Train worker actor -> node
        nodes_before: set[str] = set()
        deadline = time.time() + 300
        while thread.is_alive() and time.time() < deadline:
            before.update({w["actor_id"]: w["node_id"] for w in _alive_train_workers()})
            nodes_before = set(before.values())
            if (
                list(run_path.glob("checkpoint_*"))
                and any(s >= checkpoint_every for s in reported_steps())
                and len(nodes_before) == 2
            ):
                break
            time.sleep(0.2)
        if not thread.is_alive():
            raise RuntimeError(f"the run ended before a node could be removed: {outcome}")
        victim = next(w for w in workers if w.node_id in nodes_before)
        step_when_removed = max(reported_steps())
        cluster.remove_node(victim, allow_graceful=False)  # abrupt: raylet and workers killed
        replacement = cluster.add_node(**node_args)  # what the autoscaler does for pending demand
        after: dict[str, str] = {}  # the restarted group's actors (not seen before the loss) -> node
        while thread.is_alive():
            after.update({w["actor_id"]: w["node_id"] for w in _alive_train_workers() if w["actor_id"] not in before})
            time.sleep(0.5)
        thread.join()
        if "error" in outcome:
            raise RuntimeError(f"the run failed after the node loss: {outcome['error']}")
        result = outcome["result"]
        return {
            "head_node": cluster.head_node.node_id,
            "worker_nodes": [w.node_id for w in workers] + [replacement.node_id],
            "train_worker_nodes_before_loss": sorted(nodes_before),
            "train_worker_nodes_after_loss": sorted(set(after.values())),
            "events": [json.loads(line) for line in events_file.read_text().splitlines()],
            "removed_node": victim.node_id,
            "replacement_node": replacement.node_id,
            "step_when_removed": step_when_removed,
            "raw_steps": reported_steps(),
            "history_steps": [int(r["step"]) for r in result.history],
            "final_step": int(result.history[-1]["step"]),
            "model_saved": Path(result.model_dir, "config.json").exists(),
            "max_steps": max_steps,
            "log_every": log_every,
            "checkpoint_every": checkpoint_every,
        }
    finally:
        ray.shutdown()
        cluster.shutdown()


def scenario_sweep_autoscale(args: dict) -> dict:
    """A 2-trial sweep on an autoscaling cluster that starts with no worker node."""
    import mlflow
    import ray
    from ray.util.state import list_placement_groups

    from orchestrator.cluster import connect
    from orchestrator.sweep import run_sweep
    from orchestrator.tracking import tracking_uri

    connect()  # RAY_ADDRESS: the head started by the test
    head_id = ray.get_runtime_context().get_node_id()

    def worker_nodes() -> int:
        return sum(1 for n in ray.nodes() if n["Alive"] and n["NodeID"] != head_id)

    at_start = worker_nodes()
    # Each trial: 2 workers x 0.4 CPU, the trial itself (0.01) and Ray Data's per-rank tasks (0.05 each)
    # fit one 1-CPU node, two trials do not: two at a time need two nodes.
    cfg = _config(
        args,
        train={"max_steps": 4, "log_every": 2, "num_workers": 2, "cpus_per_worker": 0.4, "micro_batch_size": 8},
        eval={"max_rows": 8},
        sweep={"lambda_instruction": [0.0, 1.0], "max_concurrent_trials": 2},
        tracking={"experiment": "multinode-sweep"},
    )
    polls: list[dict] = []
    groups: dict[str, list[str]] = {}
    most = [at_start]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            try:
                most[0] = max(most[0], worker_nodes())
                for pg in list_placement_groups(detail=True, raise_on_missing_output=False):
                    bundles = pg.bundles or []
                    cpu = [b for b in bundles if (b.get("unit_resources") or {}).get("CPU") == 0.4]
                    if len(cpu) == 2 and all(b.get("node_id") for b in cpu):
                        groups[pg.placement_group_id] = sorted({b["node_id"] for b in cpu})
            except Exception as error:  # noqa: BLE001 - keep watching
                polls.append({"error": repr(error)})
            done.wait(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        result = run_sweep(cfg)
    finally:
        done.set()
        watcher.join()
    mlflow.set_tracking_uri(tracking_uri(cfg))
    children = mlflow.search_runs(
        experiment_names=["multinode-sweep"],
        filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'",
        output_format="list",
    )
    return {
        "worker_nodes_at_start": at_start,
        "max_worker_nodes_seen": most[0],
        "trials": [
            {"point": t["point"], "status": t["status"]}
            for t in sorted(result.trials, key=lambda t: t["point"]["masking.lambda_instruction"])
        ],
        "train_placement_groups": groups,
        "mlflow_children": len(children),
        "polls": polls[-5:],
    }


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(HERE))
    scenario, args_file = sys.argv[1], sys.argv[2]
    arguments = json.loads(Path(args_file).read_text())
    output = {"node_loss": scenario_node_loss, "sweep_autoscale": scenario_sweep_autoscale}[scenario](arguments)
    Path(arguments["out"]).write_text(json.dumps(output, indent=1))
