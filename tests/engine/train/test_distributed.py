"""Two processes under ``torchrun`` (gloo on CPU) follow the one-process loss curve for the same global batch.

Every process draws the whole global batch from the per-step generator and keeps its half; DDP averages the
gradients. Measured: the curves agree to about 2e-7 relative (float summation order); the bound is 1e-4.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from streaming.cli import main

from .synthetic import planted, write_dataset

TOLERANCE = 1e-4


def test_two_gloo_processes_match_one(tmp_path: Path) -> None:
    write_dataset(tmp_path / "ds", planted(3), [{"frames": 200, "split": "train"} for _ in range(3)])
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"steps": 30, "batch": 64, "threads": 1, "val_every": 10, "checkpoint_every": 1000,
                                  "optim": {"lr": 3e-3, "warmup_steps": 5}}))  # fmt: skip
    args = ["train", "heads", str(tmp_path / "ds"), "--config", str(config), "--device", "cpu", "--no-progress"]
    one = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "streaming.cli", *args, "--out", str(tmp_path / "two")],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2
    a = json.loads((tmp_path / "one" / "history.json").read_text())
    b = json.loads((tmp_path / "two" / "history.json").read_text())
    loss_a = np.array([h["loss"] for h in a if "loss" in h])
    loss_b = np.array([h["loss"] for h in b if "loss" in h])
    assert len(loss_a) == len(loss_b) == 30
    assert loss_a[-1] < 0.5 * loss_a[0]  # it trains
    np.testing.assert_allclose(loss_b, loss_a, rtol=TOLERANCE)
    val_a = [h["val"] for h in a if "val" in h]
    val_b = [h["val"] for h in b if "val" in h]
    np.testing.assert_allclose(val_b, val_a, rtol=TOLERANCE)
