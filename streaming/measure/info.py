"""What every benchmark result records about where it ran: device, versions, load and commit, and the JSON writer.

Benchmarks call :func:`environment` when they start (so the load average is the one their timings saw) and
:func:`write_result` at the end; a result written without an ``"environment"`` entry gets one at write time.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def device_name(device: str = "cpu") -> str:
    """The CUDA device's name, or the CPU model from /proc/cpuinfo (the platform's processor string elsewhere)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """HEAD of the engine's checkout, with ``-dirty`` when the tree has uncommitted changes; "unknown" without git."""
    try:
        head = _git("rev-parse", "HEAD")
        dirty = _git("status", "--porcelain")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def load_average() -> float | None:
    """The 1-minute load average: on a shared machine a value above the core count inflates every timing."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def environment(device: str = "cpu") -> dict[str, Any]:
    """Device, platform, versions, threads, load, commit and UTC time, as recorded in every benchmark result."""
    return {
        "device": device_name(device),
        "device_type": torch.device(device).type,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": load_average(),
        "commit": git_commit(),
        "timestamp_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_result(path: Path, payload: dict[str, Any]) -> Path:
    """Writes ``payload`` as indented JSON (parent folders created), adding ``environment()`` if it has none."""
    record = payload if "environment" in payload else {**payload, "environment": environment()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def _git(*args: str) -> str:
    # run in the engine's checkout, not the caller's working directory, so the commit is the code that ran
    return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()
