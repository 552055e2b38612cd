"""examples/pipecat_avatar.py as a user runs it, opened in headless Chromium (Debian's chromium, launched the way
the project's lip-sync instrument does): the page gets the avatar's video over pipecat's SmallWebRTC transport,
hears the speech it asked for, and the speech stops when it interrupts."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import io
import json
import os
import shutil
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

pytest.importorskip("pipecat")

from aiohttp.test_utils import TestServer
from PIL import Image

from streaming.measure.browser import DevTools, open_page
from streaming.pipelines import RuntimeConfig
from streaming.runtime import Runtime
from tests.streaming.transports.agent_doubles import quiet_gc

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture(autouse=True)
def _no_gc_pauses() -> Iterator[None]:
    with quiet_gc():
        yield


EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "pipecat_avatar.py"
SNAPSHOT_JS = """(() => { const v = document.getElementById('avatar'); const c = document.createElement('canvas');
c.width = v.videoWidth; c.height = v.videoHeight; c.getContext('2d').drawImage(v, 0, 0);
return c.toDataURL('image/png'); })()"""


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pipecat_avatar_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def silent_wav(path: Path) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(48_000)
        w.writeframes(bytes(48_000 * 2))
    return path


async def stats(page: DevTools) -> dict[str, Any]:
    raw = await page.evaluate("(document.getElementById('stats') || {}).textContent")  # null while loading
    try:
        return dict(json.loads(raw))
    except (TypeError, ValueError):
        return {}


async def snapshot(page: DevTools) -> np.ndarray:
    url = await page.evaluate(SNAPSHOT_JS)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="the example speaks with Debian's espeak-ng")
async def test_example_in_headless_chromium(tmp_path: Path) -> None:
    example = load_example()
    runtime = Runtime.create(RuntimeConfig(mode="classic"))
    server = TestServer(example.create_app(runtime), host="127.0.0.1", port=0)
    await server.start_server()
    shots: list[np.ndarray] = []
    try:
        async with open_page(str(server.make_url("/")), silent_wav(tmp_path / "mic.wav"), tmp_path / "profile") as page:
            state: dict[str, Any] = {}
            for _ in range(300):
                state = await stats(page)
                if state.get("framesDecoded", 0) >= 25:
                    break
                await asyncio.sleep(0.1)
            assert state.get("framesDecoded", 0) >= 25, f"no video reached the page: {state}"
            t0, first = time.monotonic(), state["framesDecoded"]
            shots.append(await snapshot(page))
            quiet = (await stats(page))["audioEnergy"]

            await page.evaluate("send({say: 'Hello, I am the open avatar, speaking from a pipecat pipeline.'})")
            for _ in range(100):
                if (await stats(page))["audioEnergy"] > quiet + 1e-3:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.6)
            shots.append(await snapshot(page))
            speaking = (await stats(page))["audioEnergy"]
            assert speaking > quiet + 1e-3, "the page hears the speech"

            await page.evaluate("send({interrupt: true})")
            await asyncio.sleep(0.6)  # the WebRTC jitter buffer still plays what it holds
            held = (await stats(page))["audioEnergy"]
            await asyncio.sleep(1.0)
            after = await stats(page)
            shots.append(await snapshot(page))
            fps = (after["framesDecoded"] - first) / (time.monotonic() - t0)
            print(
                f"\nchromium + pipecat example: {after}, decoded fps {fps:.1f}, energy {quiet:.4f} -> "
                f"{speaking:.4f} -> {held:.4f} -> {after['audioEnergy']:.4f}"
            )
            assert after["audioEnergy"] - held < 0.2 * (speaking - quiet), "the speech stopped on interrupt"
            assert fps >= 15.0, after
            assert shots[0].shape == (512, 512, 3)
    finally:
        await server.close()
        await runtime.aclose()
        if shots:
            sheet = Image.fromarray(np.concatenate(shots, axis=1))
            out = Path(os.environ.get("AGENTS_SHEET", tmp_path / "pipecat_example_sheet.png"))
            sheet.save(out)
            print(f"contact sheet (idle, speaking, interrupted): {out}")
