"""``engine bench sync``: the lip-sync offset of each way a user watches the avatar, as one benchmark record.

offline (``engine render`` -> mp4), live (``engine serve --webrtc`` -> an aiortc peer) and browser (the page in
headless Chromium); see :mod:`streaming.measure.live` and :mod:`streaming.measure.browser`.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from streaming.measure.browser import measure_browser
from streaming.measure.info import environment
from streaming.measure.live import measure_live, measure_offline
from streaming.measure.sync import FPS, SyncError

SYNC_MODES = ("offline", "live", "browser")


def run_sync_bench(modes: tuple[str, ...], seconds: float, seed: int, workdir: Path) -> dict[str, Any]:
    """Measure each of ``modes`` (offline, live, browser) -> the benchmark record (device, commit, config).

    A mode that cannot run here (no Chromium) is recorded with its error instead of a number.
    """

    unknown = [m for m in modes if m not in SYNC_MODES]
    if unknown:
        raise ValueError(f"unknown sync mode(s) {unknown}; choose from {list(SYNC_MODES)}")
    env = environment()
    results: dict[str, Any] = {}
    for mode in modes:
        started = time.monotonic()
        try:
            if mode == "offline":
                found = measure_offline(workdir, seconds, seed)
            elif mode == "live":
                found = asyncio.run(measure_live(seconds, seed))
            else:
                found = asyncio.run(measure_browser(seconds, seed, workdir))
        except SyncError as exc:
            results[mode] = {"error": str(exc)}
            continue
        results[mode] = {**found.to_dict(), "wall_s": round(time.monotonic() - started, 1)}
    return {
        "benchmark": "lipsync",
        "device": env["device"],
        "commit": env["commit"],
        "config": {
            "modes": list(modes),
            "signal_seconds": seconds,
            "seed": seed,
            "fps": FPS,
            "avatar": "default",
            "runtime_mode": "classic (offline: engine render's auto mode on this engine home)",
            "sign": "offset_ms > 0: the mouth moves after its sound",
        },
        "results": results,
        "environment": env,
    }
