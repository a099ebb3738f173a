"""Connecting to Ray and sizing requests from what the cluster has.

Resource requests are logical, so l2t derives them from the cluster instead
of hard-coding them: on a 2-core laptop two CPU workers at 1 CPU each would
leave nothing for Ray Data and the worker group would never start (see
docs/design.md, "Ray on small machines").
"""

from __future__ import annotations

import logging
import os

# Share of a CPU-only cluster kept free for Ray Data while Train workers run.
DATA_CPU_RESERVE = 0.5


def connect(address: str | None = None, *, num_cpus: int | None = None, verbose: bool = True) -> None:
    """Join RAY_ADDRESS / `address` if given, else start a local cluster on this machine.

    Not `verbose`: the workers' output stays in Ray's session logs (their folder is printed) instead of
    being forwarded to this console, and Ray's own log records go to `console.quiet_logs`'s file.
    """
    import ray

    from orchestrator import console

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    address = address or os.environ.get("RAY_ADDRESS")
    quiet = {} if verbose else {"log_to_driver": False}
    if address:
        ray.init(address=address, logging_level=logging.WARNING, **quiet)
    else:  # the dashboard serves Train's state API
        ray.init(num_cpus=num_cpus, logging_level=logging.WARNING, **quiet)
    if not verbose:
        console.redirect_loggers()
        console.log(f"[ray] logs: {console.log_file() or 'Ray only'}; workers' logs in {_session_logs()} (-v: live)")
    from ray.data import DataContext

    context = DataContext.get_current()
    context.execution_options.preserve_order = True  # same data order on every run and every resume
    # l2t logs its own progress lines; Ray Data's bars, redrawn by every worker and forwarded to
    # the driver, turn job logs and CI output into pages of terminal escape codes.
    context.enable_progress_bars = False


def _session_logs() -> str:
    try:
        import ray._private.worker as worker

        return worker._global_node.get_logs_dir_path()
    except Exception:  # noqa: BLE001 - a private API: say where it usually is
        return "/tmp/ray/session_latest/logs"


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def cpus_per_worker(num_workers: int, requested: float | None, use_gpu: bool) -> float:
    """Logical CPUs per Train worker: as requested, else what leaves room for Ray Data."""
    if requested:
        return requested
    if use_gpu:
        return 1.0
    free = max(cluster_cpus() - DATA_CPU_RESERVE, 0.25 * num_workers)
    return round(max(0.25, min(1.0, free / num_workers)), 2)
