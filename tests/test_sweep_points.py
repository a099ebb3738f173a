"""Which trials a sweep runs, and how they share the cluster (no Ray needed)."""

import pytest
from conftest import experiment_config

from orchestrator.config import ConfigError
from orchestrator.sweep import sweep_name, sweep_points


def test_grid_is_the_product_of_lambdas_and_parameters(tmp_path):
    cfg = experiment_config(
        tmp_path,
        sweep={
            "lambda_instruction": [0, 1],
            "lambda_response": [1, 2],
            "parameters": {"masking.mode": ["l2t_full", "l2t"]},
        },
    )
    points = sweep_points(cfg)
    assert len(points) == 8
    assert {"masking.lambda_instruction": 0, "masking.lambda_response": 2, "masking.mode": "l2t"} in points


def test_random_search_is_seeded(tmp_path):
    cfg = experiment_config(
        tmp_path,
        sweep={
            "search": "random",
            "num_samples": 5,
            "lambda_instruction": [0, 0.5, 1],
            "parameters": {"train.lr": [1e-4, 3e-4]},
        },
    )
    assert sweep_points(cfg) == sweep_points(cfg)
    assert len(sweep_points(cfg)) == 5


def test_points_are_validated_with_their_keys(tmp_path):
    cfg = experiment_config(
        tmp_path, sweep={"search": "points", "points": [{"masking.lambda_instruction": 0.5}, {"train.lrr": 1}]}
    )
    with pytest.raises(ConfigError, match=r"(?s)sweep point 1 .*train.lrr: unknown key"):
        sweep_points(cfg)
    with pytest.raises(ConfigError, match="nothing to sweep"):
        sweep_points(experiment_config(tmp_path))


def test_sweep_name_is_stable_and_ignores_where_results_go(tmp_path):
    a = experiment_config(tmp_path / "a", sweep={"lambda_instruction": [0, 1]})
    b = experiment_config(tmp_path / "b", sweep={"lambda_instruction": [0, 1]}, tracking={"uri": "http://x"})
    c = experiment_config(tmp_path / "a", sweep={"lambda_instruction": [0, 2]})
    assert sweep_name(a) == sweep_name(b) != sweep_name(c)


def test_a_trials_row_selection_is_held_to_the_cpu_share_its_layout_budgets(tmp_path):
    """A sweep trial's rank datasets only select rows of the shared materialized dataset: each may run one
    LIGHT_TASK_CPUS task at a time (trial_layout budgets that much per rank), so Ray Data can't fill the
    CPUs a concurrent trial's evaluation actor waits for; a fit that loads its own images is not limited.
    Every rank dataset hands blocks over as they are done, whatever the context's order setting (the
    worker puts rows in plan order)."""
    from ray.data import DataContext

    from orchestrator.ingest import LIGHT_TASK_CPUS
    from orchestrator.train import _trainer

    cfg = experiment_config(tmp_path)
    datasets = {"train_rank0": object(), "train_rank1": object()}
    options = DataContext.get_current().execution_options
    before, options.preserve_order = options.preserve_order, True  # as run_train sets it
    try:
        shared = _trainer(cfg, "run", 0.44, {}, datasets, [], shared=True)
        alone = _trainer(cfg, "run", 0.44, {}, datasets, [])
    finally:
        options.preserve_order = before
    for name in datasets:
        options = shared.data_config._resolve_execution_options(name)
        assert options.resource_limits.cpu == LIGHT_TASK_CPUS
        assert not options.preserve_order
        assert not alone.data_config._resolve_execution_options(name).preserve_order
    assert alone.data_config._resolve_execution_options("train_rank0").resource_limits.cpu == float("inf")
