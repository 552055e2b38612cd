"""``engine serve --ray`` without Ray installed fails in one line naming the extra (no traceback, no Ray import)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from streaming.cli import main, serve_ray
from streaming.cluster.ray_app import INSTALL_HINT


def test_serve_ray_without_ray_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serve_ray, "ray_missing", lambda: INSTALL_HINT)
    result = CliRunner().invoke(main, ["serve", "--ray", "--mode", "classic"])
    assert result.exit_code == 1
    assert result.output.strip() == 'Error: Ray is not installed: pip install -e ".[ray]"'
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_serve_needs_a_transport_and_the_core_cli_does_not_import_ray() -> None:
    result = CliRunner().invoke(main, ["serve"])
    assert result.exit_code == 2 and "--ray" in result.output
    # a fresh interpreter: the engine command and the cluster package load without importing Ray
    code = "import sys, streaming.cli, streaming.cluster.ray_app; sys.exit(int('ray' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], check=False, timeout=60).returncode == 0


def test_bad_cluster_numbers_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serve_ray, "ray_missing", lambda: None)
    result = CliRunner().invoke(main, ["serve", "--ray", "--mode", "classic", "--min-replicas", "2"])
    assert result.exit_code == 2 and "needs both min_replicas and max_replicas" in result.output
