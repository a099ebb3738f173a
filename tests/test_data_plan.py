"""The data plan (workloads/batching.py) and a training run's folder, in a plain process: no Ray, no training."""

import json
from pathlib import Path

import numpy as np
import pytest


def _plan(lengths, micro, gas, world, **kw):
    from workloads.batching import BatchPlan

    return BatchPlan(np.asarray(lengths), micro, gas, world, **kw)


def test_plan_gives_every_layout_the_same_global_batches():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 200, size=203)
    layouts = [(16, 1, 1), (4, 4, 1), (4, 2, 2), (8, 1, 2), (2, 2, 4), (1, 4, 4)]
    reference = _plan(lengths, *layouts[0], group_steps=3, seed=7)
    assert reference.steps_per_epoch == 203 // 16
    for epoch in (0, 1):
        want = [set(step) for step in reference.steps(epoch)]
        for micro, gas, world in layouts[1:]:
            plan = _plan(lengths, micro, gas, world, group_steps=3, seed=7)
            batches = plan.micro_batches(epoch)
            assert [set(step.reshape(-1)) for step in batches] == want, (micro, gas, world)
            owner = plan.rank_of_rows()
            for rank in range(world):
                order = plan.order(rank, epoch)
                assert list(order) == list(batches[:, :, rank, :].reshape(-1))
                assert np.all(owner[order] == rank)
            assert np.sum(owner >= 0) == plan.steps_per_epoch * plan.global_batch
    # Another epoch visits the same global batches in another order; another seed too.
    assert [set(s) for s in reference.steps(0)] != [set(s) for s in reference.steps(1)]
    assert sorted(map(sorted, reference.steps(0).tolist())) == sorted(map(sorted, reference.steps(1).tolist()))


def test_length_grouping_cuts_padding_and_keeps_micro_batches_unequal():
    rng = np.random.default_rng(1)
    lengths = rng.integers(20, 300, size=512)
    plan = _plan(lengths, 4, 2, 2, group_steps=8)
    assert plan.padding_share(grouped=True) < 0.5 * plan.padding_share(grouped=False)
    trained = lengths[plan.micro_batches(0)].sum(axis=-1)  # [steps, accumulation, rank]
    assert (trained.max(axis=(1, 2)) > trained.min(axis=(1, 2))).all()


def test_ordered_micro_batches_follow_the_plan_whatever_the_arrival_order():
    from workloads.batching import ordered_micro_batches

    order = np.array([5, 1, 4, 0, 3, 2])
    arrival = [
        {
            "row": np.array(chunk),
            "input_ids": [np.array([r]) for r in chunk],
            "segments": [np.array([r]) for r in chunk],
            "pixel_values": [None] * len(chunk),
        }
        for chunk in ([0, 1], [2, 3, 4], [5])
    ]
    batches = list(ordered_micro_batches(iter(arrival), order, 2))
    assert [[int(x[0]) for x in b["input_ids"]] for b in batches] == [[5, 1], [4, 0], [3, 2]]
    with pytest.raises(RuntimeError, match="ended 6 planned rows early"):
        list(ordered_micro_batches(iter(arrival[:2]), order, 2))


def test_load_rows_reads_the_planned_rows_with_their_images(synthetic_data, tiny_model_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestrator.ingest import LoadRows, read_prepared_rows
    from orchestrator.prepare import PreparedData

    images = [json.loads(line)["image"] for line in Path(synthetic_data.train_file).read_text().splitlines()[:300]]
    shards = tmp_path / "prepared" / "shards"
    shards.mkdir(parents=True)
    for part, (lo, hi) in enumerate([(0, 250), (250, 300)]):
        table = pa.table(
            {
                "input_ids": [list(range(i % 9 + 1)) for i in range(lo, hi)],
                "segments": [[3] * (i % 9 + 1) for i in range(lo, hi)],
                "images": [[images[i]] for i in range(lo, hi)],
                "length": [i % 9 + 1 for i in range(lo, hi)],
            }
        )
        pq.write_table(table, shards / f"part-{part}.parquet", row_group_size=100)
    rows = read_prepared_rows(PreparedData(str(tmp_path / "prepared"), {}))
    assert len(rows.lengths) == 300 and rows.lengths[7] == 8
    assert [(g["first_row"], g["rows"]) for g in rows.groups] == [(0, 100), (100, 100), (200, 50), (250, 50)]
    load = LoadRows(tiny_model_dir, str(shards), str(synthetic_data.image_root))
    planned = [r for r in range(299, 90, -1) if r % 3 == 1]  # across row groups and files, backwards
    out = load(planned)
    assert out["row"] == planned
    with pytest.raises(IndexError, match="row 300 is not in the shards"):
        load([300])
    for row, ids, pixels in zip(out["row"], out["input_ids"], out["pixel_values"]):
        assert list(ids) == list(range(row % 9 + 1)) and pixels.shape == (1, 3, 32, 32)


def test_a_run_folder_is_resumed_only_by_the_same_unfinished_configuration(tmp_path, capsys):
    from orchestrator.train import RUN_STATE_FILE, _claim_run_folder

    run = tmp_path / "runs" / "r"
    _claim_run_folder(str(run), "aaa", "r")
    (run / "checkpoint_000001").mkdir()
    _claim_run_folder(str(run), "aaa", "r")  # same configuration, unfinished: Ray Train resumes it
    assert (run / "checkpoint_000001").exists() and "resuming" in capsys.readouterr().out
    _claim_run_folder(str(run), "bbb", "r")  # another configuration: a fresh run
    assert not (run / "checkpoint_000001").exists() and "replacing" in capsys.readouterr().out
    (run / "checkpoint_000002").mkdir()
    (run / RUN_STATE_FILE).write_text(json.dumps({"fingerprint": "bbb", "finished": True}))
    _claim_run_folder(str(run), "bbb", "r")  # finished: a re-run trains again
    assert not (run / "checkpoint_000002").exists()
