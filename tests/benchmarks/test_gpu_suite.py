"""The GPU suite keeps working where CI runs (a CPU): its dry mode runs every step it can, tiny, and says which
steps it skipped and why (the CUDA-only ones here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_suite_dry_run_writes_its_record(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_suite.py", "--dry-run", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "gpu_suite_dry.json").read_text())
    assert record["benchmark"] == "gpu_suite" and record["device"] and record["commit"]
    results = record["results"]
    rows = results["warp_decode"]["eager-standard/fp32"]
    assert rows["1"]["ms_per_frame"] > 0 and rows["2"]["frames_per_s"] > 0
    assert results["worker"]["2"]["sessions"] == 2 and results["worker"]["2"]["frames_per_s"] > 0
    assert results["lmdm"]["fp32"]["ms_per_window"] > 0
    together = results["lmdm"]["sessions"]["2"]
    assert together["alone"]["steps_per_call"] == 1.0 and together["shared"]["steps_per_call"] > 1.0
    assert set(record["skipped"]) >= {"cuda_tests", "kernels"}  # said, not silently missing
    assert (tmp_path / "gpu_suite_dry.png").stat().st_size > 1000
