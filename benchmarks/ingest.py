"""Is l2t's image ingest through Ray Data at least as fast as a torch DataLoader with as many worker processes?

Run: ``python benchmarks/ingest.py [--rows 2048] [--workers 1,2] [--repeats 3] [--image-format jpeg]``
(about 4 minutes on a quiet 2-core machine; ``--workdir DIR`` keeps the data, model and shards for
another run).

In real visual instruction tuning the images, not the text, are the data-loading cost: LLaVA-665K
has 624K images at 336 px and more, and LLaVA and TinyLLaVA load them with a torch ``DataLoader``
and worker processes. This benchmark builds, here (no download):

- ``--rows`` conversations of the synthetic generator (``workloads.synthetic.generate_records``),
  each with its own image rendered by the generator (``render_scene``) at COCO-like sizes
  (640x480, 480x640, 512x512, 336x336), with a little noise so the files weigh what photos
  weigh (about 65 kB), written as JPEG (or PNG);
- the tiny model preset at 336 px (patch 14: 577 image tokens per image, as LLaVA-1.5), whose
  processor is a CLIP image processor (resize to 336, rescale, normalize);
- the prepared shards, by ``orchestrator.prepare.prepare`` on a local Ray cluster.

Then, on the same rows in the same plan order (``BatchPlan`` of one rank), each path yields the
tensors of every micro-batch (``workloads.micro_batch.collate``: padded ids, segments, attention
mask, pixel values):

(a) l2t: the rank's dataset as ``run_train`` builds it (``rank_datasets`` over
    ``training_dataset``, ``--workers`` loading tasks at a time), read as a Train worker reads it
    (``iterator().iter_batches`` of whole blocks as they are done, prefetch 1,
    ``ordered_micro_batches``, ``collate``);
(b) the reference: a map-style ``torch.utils.data.Dataset`` over the same shards whose
    ``__getitem__`` opens one row's image (the same confined opener) and runs the same
    processor on it, as LLaVA's ``LazySupervisedDataset`` does, in a ``DataLoader`` with
    ``num_workers=--workers``, the plan order as its sampler and ``collate`` as ``collate_fn``.

For each worker count, each repeat runs both, the first path alternating, so load bursts on a
shared machine hit both alike; every run is kept with the load average before and after it and
the CPU seconds of the whole process tree (sampled while it runs, so Ray's workers count). Per
run: ``samples_per_s`` over the whole epoch from the first request (start-up of the loading
processes included: each epoch pays it in training too), ``first_batch_s`` (the start-up) and
``steady_samples_per_s`` (over the second half of the epoch). The best run of each path counts;
``ratio_vs_dataloader`` = (a) / (b) whole-epoch samples/s at the worst worker count (goal >= 1.0),
``steady_ratio_vs_dataloader`` the same at steady state. Ray's workers run at nice 0 here, as the
DataLoader's do (Ray's default is 15). Writes ``benchmarks/results/ingest.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GOAL_RATIO = 1.0
IMAGE_SIZES = ((640, 480), (480, 640), (512, 512), (336, 336))
"""Image sizes, cycled over rows: COCO's common shapes and LLaVA-1.5's input size."""
MODEL_IMAGE_SIZE, MODEL_PATCH_SIZE = 336, 14


# ---------------------------------------------------------------- data


def write_data(workdir: Path, rows: int, image_format: str, seed: int = 0) -> Path:
    """train.jsonl with one image per row under workdir/images (cached: kept when already there)."""
    from PIL import Image

    from workloads.synthetic import generate_records, make_scene
    from workloads.synthetic_common import render_scene

    data = workdir / f"train-{rows}-{image_format}.jsonl"
    if data.exists():
        return data
    started = time.perf_counter()
    (workdir / "images").mkdir(parents=True, exist_ok=True)
    suffix = {"jpeg": "jpg", "png": "png"}[image_format]
    noise = np.random.default_rng(seed).integers(-12, 13, size=(704, 704, 3), dtype=np.int16)
    with open(data.with_suffix(".partial"), "w", encoding="utf-8") as handle:
        for index, record in enumerate(generate_records(rows, seed=seed, image_size=512, max_objects=3)):
            width, height = IMAGE_SIZES[index % len(IMAGE_SIZES)]
            scene = render_scene(make_scene(seed, index, max_objects=3, image_size=512)).resize((width, height))
            shift = index % 64
            pixels = np.asarray(scene, dtype=np.int16) + noise[shift : shift + height, shift // 2 : shift // 2 + width]
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
            record["image"] = f"images/{record['id']}.{suffix}"
            image.save(workdir / record["image"], **({"quality": 90} if image_format == "jpeg" else {}))
            handle.write(json.dumps(record) + "\n")
    data.with_suffix(".partial").replace(data)
    print(f"wrote {rows:,} rows and images -> {workdir} in {time.perf_counter() - started:.1f} s", flush=True)
    return data


def make_model(workdir: Path, data: Path) -> Path:
    """The tiny LLaVA preset at 336 px, patch 14 (577 image tokens), tokenizer trained on the rows."""
    from orchestrator.inputs import tokenizer_corpus
    from workloads.config import TinyModelConfig
    from workloads.tiny_model import build_tiny_model

    out = workdir / "tiny-model-336"
    if not (out / "config.json").exists():
        spec = TinyModelConfig(image_size=MODEL_IMAGE_SIZE, patch_size=MODEL_PATCH_SIZE)
        build_tiny_model(out, tokenizer_corpus([str(data)], "vicuna_v1"), spec)
    return out


def prepare_rows(workdir: Path, data: Path, model: Path):
    from orchestrator.config import config_from_dict
    from orchestrator.prepare import prepare

    cfg = config_from_dict(
        {
            "data": {
                "sources": [str(data)],
                "image_root": str(workdir),
                "check_images": "off",
                "chat_template": "vicuna_v1",
                "max_length": 1024,
            },
            "storage": {"path": str(workdir / "storage")},
        }
    )
    return prepare(cfg, str(model), progress=None)


# ---------------------------------------------------------------- the two paths


def ray_epoch(prepared, model: Path, image_root: str, plan, micro_batch: int, workers: int, pad: int, meter):
    """(a): the rank's dataset as run_train builds it, consumed as a Train worker consumes it."""
    import torch

    from orchestrator.ingest import dataset_name, rank_datasets, training_dataset
    from workloads.batching import ordered_micro_batches
    from workloads.micro_batch import collate

    def make_dataset(order, rank):
        return training_dataset(prepared, str(model), image_root, 1.0, order=order, workers=workers)

    started = time.perf_counter()
    ds = rank_datasets(plan, make_dataset)[dataset_name(0)]
    batches = ds.iterator().iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1)
    micro_batches = ordered_micro_batches(batches, plan.order(0, 0), micro_batch, log=lambda message: None)
    return _epoch(started, (collate(micro, pad, torch.device("cpu")) for micro in micro_batches), meter)


def _epoch(started: float, tensors, meter: CpuMeter) -> dict:
    """Samples and wall time of the whole epoch, the time to the first micro-batch (start-up), and the
    steady rate: samples per second over the second half of the epoch, when both paths run full."""
    samples, marks = 0, []
    sampled = started
    for batch in tensors:
        samples += len(batch["lengths"])
        marks.append((time.perf_counter() - started, samples))
        if time.perf_counter() - sampled > 0.5:
            meter.sample()
            sampled = time.perf_counter()
    wall = time.perf_counter() - started
    half_s, half = next(((t, n) for t, n in marks if n >= samples / 2), (wall, samples))
    steady = (samples - half) / (wall - half_s) if wall > half_s else 0.0
    first_s = marks[0][0] if marks else wall
    return {
        "samples": samples,
        "wall_s": wall,
        "first_batch_s": round(first_s, 3),
        "steady_samples_per_s": round(steady, 2),
    }


class ReferenceRows:
    """(b): LLaVA's LazySupervisedDataset shape: one row per `__getitem__`, its image opened and processed."""

    def __init__(self, prepared, model: Path, image_root: str):
        import pyarrow.parquet as pq

        # the row numbering of read_prepared_rows: shard files by name, then position
        files = sorted(str(p) for p in Path(prepared.shards).rglob("*.parquet"))
        table = pq.ParquetDataset(files).read(columns=["id", "input_ids", "segments", "images"])
        self.ids = table.column("id").to_pylist()
        self.input_ids = table.column("input_ids")
        self.segments = table.column("segments")
        self.images = table.column("images").to_pylist()
        self.model, self.image_root = str(model), image_root
        self.processor = None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        from transformers import AutoImageProcessor

        from orchestrator.images import open_confined_image

        if self.processor is None:  # in the worker process
            self.processor = AutoImageProcessor.from_pretrained(self.model)
        images = [open_confined_image(self.image_root, path) for path in self.images[index]]
        pixels = self.processor(images=images, return_tensors="np")["pixel_values"].astype(np.float32)
        return {
            "input_ids": self.input_ids[index].values.to_numpy().astype(np.int32),
            "segments": self.segments[index].values.to_numpy().astype(np.int8),
            "pixel_values": pixels,
        }


def _collate_rows(items: list[dict], pad: int) -> dict:
    import torch

    from workloads.micro_batch import collate

    batch = {key: [item[key] for item in items] for key in ("input_ids", "segments", "pixel_values")}
    return collate(batch, pad, torch.device("cpu"))


def dataloader_epoch(dataset: ReferenceRows, plan, micro_batch: int, workers: int, pad: int, meter) -> dict:
    import functools

    from torch.utils.data import DataLoader

    started = time.perf_counter()
    loader = DataLoader(
        dataset,
        batch_size=micro_batch,
        sampler=[int(r) for r in plan.order(0, 0)],
        num_workers=workers,
        collate_fn=functools.partial(_collate_rows, pad=pad),
    )
    return _epoch(started, iter(loader), meter)


class CpuMeter:
    """CPU seconds of this process and every process below it (Ray's raylet and workers, a DataLoader's
    workers) since it started, sampled while they run: a worker that exits between samples loses its last
    fraction of a second, never its whole time."""

    def __init__(self):
        import psutil

        self.me = psutil.Process()
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.sample(first=True)

    def sample(self, first: bool = False) -> None:
        import psutil

        for process in [self.me, *self.me.children(recursive=True)]:
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            key = (process.pid, process.create_time())
            seconds = times.user + times.system
            if first:
                self.first[key] = seconds
            self.last[key] = seconds

    def seconds(self) -> float:
        self.sample()
        return sum(seconds - self.first.get(key, 0.0) for key, seconds in self.last.items())


def _timed(fn) -> dict:
    load_before = os.getloadavg()[0]
    meter = CpuMeter()
    result = fn(meter)
    result["cpu_s"] = round(meter.seconds(), 2)
    result["samples_per_s"] = round(result["samples"] / result["wall_s"], 2)
    result["wall_s"] = round(result["wall_s"], 3)
    result["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return result


def _side_by_side(paths: dict, repeats: int) -> dict:
    """Every path once per repeat, the first path alternating; the best run of each counts."""
    runs: dict[str, list[dict]] = {name: [] for name in paths}
    names = list(paths)
    for repeat in range(repeats):
        for name in names[::-1] if repeat % 2 else names:
            run = _timed(paths[name])
            runs[name].append(run)
            print(
                f"  {name:>10}: {run['samples']:,} samples in {run['wall_s']:.1f} s = {run['samples_per_s']:,.1f} "
                f"samples/s (steady {run['steady_samples_per_s']:,.1f}, first batch at {run['first_batch_s']:.1f} s), "
                f"{run['cpu_s']:.0f} CPU-s; load {run['load_average'][0]} -> {run['load_average'][1]}",
                flush=True,
            )
    entry: dict = {}
    for name, results in runs.items():
        best = max(results, key=lambda r: r["samples_per_s"])
        entry[f"{name}_samples_per_s"] = best["samples_per_s"]
        entry[f"{name}_steady_samples_per_s"] = max(r["steady_samples_per_s"] for r in results)
        entry[f"{name}_cpu_ms_per_sample"] = round(min(r["cpu_s"] / r["samples"] for r in results) * 1e3, 2)
    entry["ratio_vs_dataloader"] = round(entry["ray_data_samples_per_s"] / entry["dataloader_samples_per_s"], 3)
    entry["steady_ratio_vs_dataloader"] = round(
        entry["ray_data_steady_samples_per_s"] / entry["dataloader_steady_samples_per_s"], 3
    )
    entry["runs"] = runs
    return entry


# ---------------------------------------------------------------- main


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--workers", default="1,2", help="loading processes of each path (comma-separated counts)")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-format", choices=("jpeg", "png"), default="jpeg")
    parser.add_argument("--cpus", type=int, default=None, help="Ray cluster CPUs (default: all)")
    parser.add_argument("--workdir", default=None, help="where data, model and shards go (default: a temporary one)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ingest.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_worker_niceness", "0")  # Ray's default, 15, would rank its loader below a DataLoader's

    from transformers import AutoTokenizer

    from orchestrator.cluster import connect
    from orchestrator.ingest import read_prepared_rows
    from workloads.batching import BatchPlan

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="l2t-bench-ingest-"))
    workdir.mkdir(parents=True, exist_ok=True)
    data = write_data(workdir, args.rows, args.image_format)
    model = make_model(workdir, data)
    connect(num_cpus=args.cpus, verbose=False)
    prepared = prepare_rows(workdir, data, model)
    rows = read_prepared_rows(prepared)
    plan = BatchPlan(rows.lengths, args.micro_batch, 1, 1)
    pad = AutoTokenizer.from_pretrained(model).pad_token_id or 0
    reference = ReferenceRows(prepared, model, str(workdir))
    result = {
        "rows": args.rows,
        "samples_per_epoch": plan.steps_per_epoch * plan.global_batch,
        "image_format": args.image_format,
        "image_sizes": [list(size) for size in IMAGE_SIZES],
        "processor_image_size": MODEL_IMAGE_SIZE,
        "micro_batch": args.micro_batch,
        "cpu_count": os.cpu_count(),
        "by_workers": {},
    }
    for workers in [int(w) for w in str(args.workers).split(",")]:
        paths = {
            "ray_data": lambda meter: ray_epoch(
                prepared, model, str(workdir), plan, args.micro_batch, workers, pad, meter
            ),
            "dataloader": lambda meter: dataloader_epoch(reference, plan, args.micro_batch, workers, pad, meter),
        }
        print(f"\n== {workers} loading process(es) each", flush=True)
        result["by_workers"][str(workers)] = _side_by_side(paths, args.repeats)
    ratios = [entry["ratio_vs_dataloader"] for entry in result["by_workers"].values()]
    result["ratio_vs_dataloader"] = min(ratios)  # the worst worker count counts
    result["goal"] = {"ratio_vs_dataloader_at_least": GOAL_RATIO, "met": min(ratios) >= GOAL_RATIO}
    for workers, entry in result["by_workers"].items():
        print(
            f"{args.rows:,} rows, {workers} worker(s) each: Ray Data {entry['ray_data_samples_per_s']:,.1f} "
            f"samples/s, DataLoader {entry['dataloader_samples_per_s']:,.1f}: ratio {entry['ratio_vs_dataloader']:.2f} "
            f"(steady state {entry['steady_ratio_vs_dataloader']:.2f}; CPU-s per sample "
            f"{entry['ray_data_cpu_ms_per_sample']:.1f} vs {entry['dataloader_cpu_ms_per_sample']:.1f} ms)"
        )
    print(f"ratio_vs_dataloader {result['ratio_vs_dataloader']:.2f} (goal >= {GOAL_RATIO})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
