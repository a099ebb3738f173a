"""The console reports instead of dumping: a 20-step `l2t train` prints at most 30 lines (logs go to a file)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from orchestrator.config import CONFIG_DIR

pytestmark = pytest.mark.ray


def test_a_short_train_prints_at_most_30_lines_and_names_its_log_file(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [
        sys.executable, "-m", "orchestrator.cli", "train", str(CONFIG_DIR / "quickstart.yaml"),
        "train.max_steps=20", "data.synthetic.train_rows=400", "data.synthetic.eval_rows=40", "eval.max_rows=40",
        f"storage.path={tmp_path}",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) <= 30, "\n".join(lines)
    assert any("step 20/20" in line for line in lines)
    logs = list((tmp_path / "logs").glob("*.log"))
    assert logs and any(str(log) in done.stdout + done.stderr for log in logs)
