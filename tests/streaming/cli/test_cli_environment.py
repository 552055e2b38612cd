"""``engine serve`` lets PyTorch's OpenMP threads sleep between operations (OMP_WAIT_POLICY=PASSIVE): the variable
must be set before torch loads the OpenMP runtime, and a value the user set wins."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = """
import os, sys
import click
from streaming.cli import main
before = "torch" in sys.modules
main.get_command(click.Context(main), "serve")
print(before, "torch" in sys.modules, os.environ.get("OMP_WAIT_POLICY"))
"""


def _probe(**env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


def test_serve_sets_passive_waiting_before_torch_loads_and_keeps_the_users_choice() -> None:
    assert _probe() == ["False", "True", "PASSIVE"]  # torch came with the serve module, after the variable
    assert _probe(OMP_WAIT_POLICY="ACTIVE")[2] == "ACTIVE"
