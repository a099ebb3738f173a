"""The GPU-efficiency benchmarks run end to end on CPU (miniature sizes; the measured numbers live in
benchmarks/results/)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, timeout: int = 600) -> None:
    # a fresh process: not the rendezvous of a process group this test process may hold
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK")}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, str(ROOT / "benchmarks" / script), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


def test_loss_memory_benchmark_measures_both_variants(tmp_path):
    out = tmp_path / "loss_memory.json"
    _run("loss_memory.py", "--tokens", "256", "--vocab", "4000", "--hidden", "32", "--chunk", "64",
         "--grad-tokens", "64", "--output", str(out))  # fmt: skip
    result = json.loads(out.read_text())
    assert result["peak_mb_full"] > 0 and result["peak_mb_chunked"] > 0
    assert result["max_grad_diff"] < 1e-5 and "load_average_before" in result


def test_packing_benchmark_gives_the_padded_losses(tmp_path):
    out = tmp_path / "packing.json"
    _run("packing.py", "--rows", "24", "--micro-batch", "8", "--repeats", "1", "--output", str(out))
    result = json.loads(out.read_text())
    assert result["max_abs_loss_diff"] <= 1e-4
    assert result["positions_packed"] < result["positions_padded"] and result["tokens_per_s_ratio_packed_vs_padded"]


@pytest.mark.slow
def test_the_gpu_benchmark_runs_its_code_path_on_cpu(tmp_path):
    """`benchmarks/gpu.py --smoke-on-cpu`: both shapes (ZeRO-2 and ZeRO-3), padded and packed, l2t and response,
    through build_engine and train_step in one process; MFU and memory are GPU-only (null here)."""
    out = tmp_path / "gpu.json"
    _run("gpu.py", "--smoke-on-cpu", "--rounds", "1", "--warmup", "1", "--output", str(out))
    result = json.loads(out.read_text())
    assert set(result["shapes"]) == {"tinyllava-0.5b", "llava-1.5-7b-cut"}
    assert result["goals"]["mfu"] == {"llava-1.5-7b-cut": 0.40, "tinyllava-0.5b": 0.30}
    for shape in result["shapes"].values():
        assert "error" not in shape, shape
        for way in ("padded_l2t", "padded_response", "packed_l2t", "packed_response"):
            assert shape[way]["tokens_per_s"] > 0 and math.isfinite(shape[way]["loss"])
            assert shape[way]["mfu"] is None and shape[way]["peak_memory_gib"] is None
        assert shape["l2t_over_response_step_time_padded"] > 0 and shape["tokens_per_s_ratio_packed_vs_padded"] > 0
    assert [s["zero_stage"] for s in result["shapes"].values()] == [2, 3]
