"""The training ingest's blocks: what `LoadRows` hands Ray Data is cheap to move and matches the processor.

Without a Ray cluster: `LoadRows` is called as Ray Data calls it, and its output goes through Ray Data's own
batch-to-block conversion, so a column that would be pickled row by row is caught here.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image


@pytest.fixture()
def shards(tmp_path, tiny_model_dir):
    """8 rows in one row group: rows 0-2 share one image, row 3's image is gone, rows 4-7 have their own."""
    from transformers import AutoConfig

    from workloads.model import num_image_tokens

    config = AutoConfig.from_pretrained(tiny_model_dir)
    image_id = getattr(config, "image_token_id", None) or config.image_token_index
    count = num_image_tokens(config)
    root = tmp_path / "images"
    root.mkdir()
    names = ["shared.png"] * 3 + ["gone.png"] + [f"own{i}.png" for i in range(4, 8)]
    for i, name in enumerate(dict.fromkeys(names)):
        if name != "gone.png":
            Image.new("RGB", (40 + 8 * i, 32), (30 * i % 255, 90, 200)).save(root / name)
    ids = [[1, *([image_id] * count), 5 + i, 6] for i in range(8)]
    table = pa.table(
        {
            "id": [f"r{i}" for i in range(8)],
            "input_ids": pa.array(ids, pa.list_(pa.int32())),
            "segments": pa.array([[1, *([3] * count), 4, 6]] * 8, pa.list_(pa.int8())),
            "images": [[name] for name in names],
            "length": [len(x) for x in ids],
        }
    )
    folder = tmp_path / "prepared" / "shards"
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "part-0.parquet")
    return tmp_path, root, table


def _load(tiny_model_dir, tmp_path, root):
    from orchestrator.ingest import LoadRows

    return LoadRows(tiny_model_dir, str(tmp_path / "prepared" / "shards"), str(root))


def test_a_block_with_a_bad_row_keeps_pixel_values_a_tensor_column(shards, tiny_model_dir):
    from ray.data.block import BlockAccessor

    tmp_path, root, _ = shards
    load = _load(tiny_model_dir, tmp_path, root)
    out = load(range(8))
    assert [bool(p) for p in out["problem"]] == [False, False, False, True, False, False, False, False]
    assert out["pixel_values"][3].shape[0] == 0 and out["pixel_values"][0].shape[0] == 1
    block = BlockAccessor.batch_to_block(out)
    kind = str(block.schema.field("pixel_values").type).lower()
    assert "tensor" in kind and "pickled" not in kind, kind
    batch = BlockAccessor.for_block(block).to_numpy()
    assert len(batch["pixel_values"]) == 8 and len(batch["pixel_values"][3]) == 0


def test_rows_read_the_prepared_tokens_and_the_processor_s_pixels(shards, tiny_model_dir):
    from transformers import AutoImageProcessor

    tmp_path, root, table = shards
    load = _load(tiny_model_dir, tmp_path, root)
    calls = []
    processor = load.processor

    class Counting:  # the real processor, counted
        def __call__(self, images, **kwargs):
            calls.append(len(images))
            return processor(images=images, **kwargs)

        def __getattr__(self, name):
            return getattr(processor, name)

    load.processor = Counting()
    out = load(range(8))
    assert calls == [1] * 5, "the image rows 0-2 share is processed once; row 3 never reaches the processor"
    reference = AutoImageProcessor.from_pretrained(tiny_model_dir)
    for i in (0, 2, 5):
        image = Image.open(root / table.column("images")[i].as_py()[0]).convert("RGB")
        expected = reference(images=[image], return_tensors="np")["pixel_values"].astype(np.float32)
        np.testing.assert_array_equal(out["pixel_values"][i], expected)
    for i in range(8):
        assert out["input_ids"][i].dtype == np.int32 and out["segments"][i].dtype == np.int8
        assert out["input_ids"][i].tolist() == table.column("input_ids")[i].as_py()
        assert out["segments"][i].tolist() == table.column("segments")[i].as_py()


def test_load_rows_keeps_one_loader_per_process_for_the_same_settings(shards, tiny_model_dir):
    import pyarrow as pa

    from orchestrator import ingest

    tmp_path, root, _ = shards
    settings = {"model_dir": tiny_model_dir, "shards": str(tmp_path / "prepared" / "shards"), "image_root": str(root)}
    unit = pa.Table.from_pylist(ingest.load_units(np.array([7, 1, 4, 0, 2, 5, 6, 3])))  # as the task gets it
    assert unit.num_rows == 1, "up to FIRST_UNIT_ROWS rows: one unit"
    (first,) = ingest.load_rows(unit, **settings)
    loader = ingest._LOADER[1]
    assert first["row"] == [7, 1, 4, 0, 2, 5, 6, 3], "the unit's rows, in its order"
    assert next(ingest.load_rows(unit, **settings))["row"] == first["row"] and ingest._LOADER[1] is loader
    assert len(next(ingest.load_rows(unit, **{**settings, "image_root": str(tmp_path)}))["row"]) == 8
    assert ingest._LOADER[1] is not loader, "other settings: another loader"


def test_load_rows_hands_a_unit_over_in_blocks(shards, tiny_model_dir, monkeypatch):
    import pyarrow as pa

    from orchestrator import ingest

    tmp_path, root, table = shards
    monkeypatch.setattr(ingest, "LOAD_BLOCK_ROWS", 3)
    settings = {"model_dir": tiny_model_dir, "shards": str(tmp_path / "prepared" / "shards"), "image_root": str(root)}
    order = list(range(table.num_rows))[::-1]
    blocks = list(ingest.load_rows(pa.Table.from_pylist([{"rows": order}]), **settings))
    assert [len(b["row"]) for b in blocks] == [3, 3, 2], "8 rows: blocks of LOAD_BLOCK_ROWS, the rest last"
    assert [r for b in blocks for r in b["row"]] == order, "the unit's rows once each, in its order"


def test_load_units_grow_from_a_micro_batch_shrink_at_the_end_and_keep_the_order():
    from orchestrator.ingest import FIRST_UNIT_ROWS, LOAD_BLOCK_ROWS, LOAD_UNIT_ROWS, load_units

    order = np.random.default_rng(0).permutation(1500)
    units = [u["rows"] for u in load_units(order)]
    grown, full, shrunk = [FIRST_UNIT_ROWS, 16, 32, 64, 128], [LOAD_UNIT_ROWS] * 3, [242, 121, LOAD_BLOCK_ROWS, 57]
    assert [len(u) for u in units] == grown + full + shrunk
    assert np.array_equal(np.concatenate(units), order), "every row once, in order"
    assert [len(u["rows"]) for u in load_units(order[:300])] == [8, 16, 32, 64, 90, 90]
    assert [len(u["rows"]) for u in load_units(order[:60])] == [8, 16, 36], "the last 4 rows join the task before"
    assert load_units(order[:0]) == []
