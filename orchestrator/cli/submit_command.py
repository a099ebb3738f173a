"""`l2t submit`: the command line of `orchestrator.submit` (run `l2t train` or `l2t sweep` as a Ray Job)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from orchestrator.cli.common import fail
from orchestrator.config import ConfigError
from orchestrator.submit import SubmitError, parse_pairs, plan_submission, resolve_address, run


def command(
    config: Annotated[
        Path,
        typer.Argument(help="Experiment config, inside the working directory (or, with --image, inside the image)."),
    ],
    overrides: Annotated[
        Optional[list[str]],
        typer.Argument(help="Dotted overrides, e.g. storage.path=s3://bucket/l2t", show_default=False),
    ] = None,
    address: Annotated[
        Optional[str],
        typer.Option(help="Ray dashboard address, e.g. http://HEAD:8265 (else RAY_API_SERVER_ADDRESS or RAY_ADDRESS)."),
    ] = None,
    sweep: Annotated[
        bool, typer.Option("--sweep", help="Run `l2t sweep` (the λ grid) instead of `l2t train`.")
    ] = False,
    working_dir: Annotated[
        Path, typer.Option(help="Uploaded as the job's working directory (.gitignore honoured).")
    ] = Path("."),
    image: Annotated[
        Optional[str], typer.Option(help="Container image with l2t installed (Ray image_uri); no upload.")
    ] = None,
    pip: Annotated[Optional[list[str]], typer.Option(help="Extra pip requirement for the job (repeatable).")] = None,
    env: Annotated[
        Optional[list[str]], typer.Option(help="KEY=VALUE for the job (repeatable); credentials are refused.")
    ] = None,
    submission_id: Annotated[
        Optional[str], typer.Option(help="Job id; default l2t-<command>-<name>-<time>-<hex>.")
    ] = None,
    entrypoint_num_cpus: Annotated[Optional[float], typer.Option(help="CPUs reserved for the driver.")] = None,
    entrypoint_num_gpus: Annotated[
        Optional[float], typer.Option(help="GPUs reserved for the driver (e.g. 1 to evaluate on a GPU node).")
    ] = None,
    entrypoint_memory: Annotated[Optional[int], typer.Option(help="Memory (bytes) reserved for the driver.")] = None,
    entrypoint_resource: Annotated[
        Optional[list[str]], typer.Option(help="NAME=AMOUNT custom resource for the driver (repeatable).")
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow/--no-follow", help="Stream the driver's logs until the job ends.")
    ] = True,
    mlflow_ui: Annotated[
        Optional[str], typer.Option(help="MLflow UI address for the final link (default: the config's tracking.uri).")
    ] = None,
) -> None:
    """Run `l2t train` (or `l2t sweep`) on a Ray cluster as a Ray Job; follow its logs; link its MLflow run."""
    try:
        resources = {k: float(v) for k, v in parse_pairs(entrypoint_resource, "--entrypoint-resource").items()}
    except ValueError:
        fail("--entrypoint-resource amounts must be numbers")
    try:
        plan = plan_submission(
            config,
            overrides,
            sweep=sweep,
            working_dir=None if image else working_dir,
            image=image,
            pip=pip,
            env=parse_pairs(env, "--env"),
            submission_id=submission_id,
            entrypoint_num_cpus=entrypoint_num_cpus,
            entrypoint_num_gpus=entrypoint_num_gpus,
            entrypoint_memory=entrypoint_memory,
            entrypoint_resources=resources,
        )
        code = run(plan, resolve_address(address), follow=follow, mlflow_ui=mlflow_ui)
    except (ConfigError, SubmitError) as error:
        fail(str(error))
    raise typer.Exit(code)
