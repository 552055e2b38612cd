"""Shared test setup: markers that skip without hardware, an isolated engine home, paths to golden data."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

GOLDEN_DIR = Path(__file__).parent / "data" / "golden"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    no_chromium = shutil.which("chromium") is None and shutil.which("chromium-browser") is None
    skip_browser = pytest.mark.skip(reason="Debian chromium not installed (.ci/run installs it)")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
        if "browser" in item.keywords and no_chromium:
            if os.environ.get("CI"):
                continue  # in CI a missing browser is a failure, not a skip
            item.add_marker(skip_browser)


@pytest.fixture(autouse=True)
def engine_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own engine home: no test reads or writes the user's real store."""
    home = tmp_path / "engine-home"
    monkeypatch.setenv("AVATAR_ENGINE_HOME", str(home))
    monkeypatch.setenv("AVATAR_ENGINE_KERNEL_CACHE", str(home / "kernel_cache"))
    return home


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN_DIR
