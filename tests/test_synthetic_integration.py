"""`data.synthetic.world` reaches the generated files and the synthetic eval suite.

Both call sites live outside workloads/: `orchestrator.inputs.materialize_synthetic` (the data set a run
trains on) and `SyntheticSuite` (orchestrator/eval_inputs.py, `l2t eval --suite synthetic`); a config with
``world: scenes`` must get the scenes world in both.
"""

from __future__ import annotations

import json

from conftest import experiment_config

from orchestrator import eval_inputs, inputs
from workloads.synthetic import generate_records
from workloads.synthetic_scenes import EVAL_KINDS

SCENES = {"world": "scenes", "train_rows": 20, "eval_rows": 30, "max_objects": 3, "kinds": None}


def test_materialized_data_is_the_configured_world(tmp_path):
    cfg = inputs.materialize_synthetic(experiment_config(tmp_path, data={"synthetic": SCENES}))
    with open(cfg.data.sources[0], encoding="utf-8") as handle:
        assert [json.loads(line) for line in handle] == list(
            generate_records(20, seed=0, world="scenes", max_objects=3)
        )
    with open(cfg.data.eval_file, encoding="utf-8") as handle:
        kinds = {json.loads(line)["kind"] for line in handle}
    assert kinds <= set(EVAL_KINDS) and {"size", "relation"} & kinds


def test_synthetic_eval_suite_is_the_configured_world(tmp_path):
    suite = eval_inputs.SyntheticSuite.from_config(experiment_config(tmp_path, data={"synthetic": SCENES}), rows=40)
    questions, _, _ = eval_inputs.load_suite("synthetic", str(tmp_path / "eval"), synthetic=suite)
    kinds = {q["kind"] for q in questions}
    assert kinds <= set(EVAL_KINDS) and {"size", "relation"} & kinds
