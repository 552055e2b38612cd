"""The browser page in headless Chromium: microphone (a fake device playing a WAV) in, decoded avatar video out.

Chromium is driven over the DevTools protocol with a plain websocket (no npm, no playwright), through the same
launcher ``engine bench sync --mode browser`` uses; the page writes its getStats() numbers into ``#rtc-stats``.
"""

from __future__ import annotations

import asyncio
import io
import json
import wave
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp.test_utils import TestServer
from PIL import Image

from engine.avatar.default import default_avatar
from streaming.factory import open_engine_factory
from streaming.measure.browser import open_page
from streaming.pipelines import CLASSIC_BANNER, RuntimeConfig
from streaming.testing import FakeFactory, burst_signal
from streaming.transports.webrtc import ServerConfig, create_app

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]
STATS_JS = "(document.getElementById('rtc-stats') || {}).textContent"  # null-safe while the page loads


def write_wav(path: Path, seconds: float) -> None:
    pcm = (burst_signal(seconds) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(48_000)
        wav.writeframes(pcm.tobytes())


async def test_page_receives_decoded_video(tmp_path: Path) -> None:
    wav = tmp_path / "voice.wav"
    write_wav(wav, 20.0)
    factory = FakeFactory(size=128, banner=CLASSIC_BANNER)
    app = create_app(factory, ServerConfig(token="sesame"))
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        url = str(server.make_url("/")) + "?autostart=1&token=sesame"
        async with open_page(url, wav, tmp_path / "profile") as page:
            stats: dict[str, Any] = {}
            for _ in range(300):
                raw = await page.evaluate(STATS_JS)
                stats = json.loads(raw or "{}")
                if stats.get("framesDecoded", 0) >= 100 and stats.get("serverFps"):
                    break
                await asyncio.sleep(0.1)
            first = stats.get("framesDecoded", 0)
            await asyncio.sleep(4.0)
            stats = json.loads(await page.evaluate("document.getElementById('rtc-stats').textContent"))
            shown_fps = (stats["framesDecoded"] - first) / 4.0
            banner = await page.evaluate("document.getElementById('banner').textContent")
            print(f"\nchromium: {stats}, decoded fps {shown_fps:.1f}")
            assert first >= 100, stats
            assert shown_fps >= 0.8 * factory.fps, stats
            assert stats["freezeCount"] <= 2, stats
            assert stats["acks"] >= 1, "the page's first control message was acknowledged"
            assert stats["codec"] in ("video/VP8", "video/H264"), stats
            assert banner == CLASSIC_BANNER
            session = factory.sessions[0]
            assert session.pushed_samples > 16_000, "the fake microphone reached the session"
            # the page's controls reach the session through the data channel
            await page.evaluate(
                "document.getElementById('emotion').value='sad';"
                "document.getElementById('emotion').dispatchEvent(new Event('change'))"
            )
            for _ in range(50):
                if session.control_state.emotion == "sad":
                    break
                await asyncio.sleep(0.1)
            assert session.control_state.emotion == "sad"
            assert np.isfinite(stats["latencyMs"])
            # one widget per control of /health's schema: the session's honoured ones enabled, the rest disabled
            info = factory.describe()
            widgets = await page.evaluate(
                "Array.from(document.querySelectorAll('#controls .control')).map(r => {"
                "const el = r.querySelector('input, select'); return [el.id, el.disabled]; })"
            )
            assert dict(widgets) == {k: k not in info["controls"] for k in info["control_schema"]}, widgets
            # a control the server refuses shows the server's reason beside it (forced on: the session refuses it)
            await page.evaluate(
                "const b = document.getElementById('blink_rate'); b.disabled = false; b.value = '1.5';"
                "b.dispatchEvent(new Event('change'))"
            )
            why = ""
            for _ in range(50):
                why = await page.evaluate("document.getElementById('blink_rate-why').textContent")
                if why:
                    break
                await asyncio.sleep(0.1)
            assert "blink_rate: not supported by this session" in why, why
    finally:
        await server.close()


@pytest.mark.slow
async def test_page_with_the_real_classic_runtime(tmp_path: Path) -> None:

    wav = tmp_path / "voice.wav"
    write_wav(wav, 20.0)
    factory = await open_engine_factory(RuntimeConfig(mode="classic"))
    server = TestServer(create_app(factory, ServerConfig()), host="127.0.0.1", port=0)
    await server.start_server()
    try:
        async with open_page(str(server.make_url("/")) + "?autostart=1", wav, tmp_path / "profile") as page:
            stats: dict[str, Any] = {}
            for _ in range(300):
                stats = json.loads(
                    await page.evaluate("(document.getElementById('rtc-stats') || {}).textContent") or "{}"
                )
                if stats.get("framesDecoded", 0) >= 25:
                    break
                await asyncio.sleep(0.1)
            first = stats.get("framesDecoded", 0)
            await asyncio.sleep(6.0)
            stats = json.loads(await page.evaluate("document.getElementById('rtc-stats').textContent"))
            shown_fps = (stats["framesDecoded"] - first) / 6.0
            size = await page.evaluate(
                "[document.getElementById('avatar').videoWidth, document.getElementById('avatar').videoHeight]"
            )
            banner = await page.evaluate("document.getElementById('banner').textContent")
            print(f"\nchromium + classic runtime: {stats}, decoded fps {shown_fps:.1f}, video {size}")
            assert first >= 25 and shown_fps >= 15.0, stats
            assert size == [512, 512]
            assert banner == CLASSIC_BANNER
    finally:
        await server.close()


async def test_page_shows_the_avatar_before_start(tmp_path: Path) -> None:
    """Before Start the video box shows the served avatar at rest (not a black box), behind the token like the
    stream; the page has an icon (no 404 in the console)."""
    wav = tmp_path / "voice.wav"
    write_wav(wav, 2.0)
    factory = await open_engine_factory(RuntimeConfig(mode="classic"))  # as `engine serve --webrtc` builds it
    server = TestServer(create_app(factory, ServerConfig(token="sesame")), host="127.0.0.1", port=0)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(server.make_url("/avatar.png")) as resp:
                assert resp.status == 401, "the avatar's photo is behind the token, like its video"
            async with http.get(server.make_url("/avatar.png?token=sesame")) as resp:
                assert resp.status == 200 and resp.content_type == "image/png"
                served = np.asarray(Image.open(io.BytesIO(await resp.read())).convert("RGB"))
            async with http.get(server.make_url("/favicon.ico")) as resp:
                assert resp.status == 200 and resp.content_type == "image/svg+xml"
        assert np.array_equal(served, default_avatar().crop), "the preview is the avatar the sessions animate"
        async with open_page(str(server.make_url("/")) + "?token=sesame", wav, tmp_path / "profile") as page:
            loaded = None
            for _ in range(100):
                loaded = await page.evaluate(
                    "(() => { const v = document.getElementById('avatar'); if (!v || !v.poster) return null;"
                    " return new Promise((done) => { const i = new Image();"
                    " i.onload = () => done([i.naturalWidth, i.naturalHeight, v.poster]); i.onerror = () => done(null);"
                    " i.src = v.poster; }); })()"
                )
                if loaded:
                    break
                await asyncio.sleep(0.1)
            assert loaded is not None, "the page's video box has no loadable poster"
            assert loaded[:2] == [512, 512] and "/avatar.png?token=sesame" in loaded[2]
            (tmp_path / "page.png").write_bytes(await page.screenshot())
            shot = np.asarray(Image.open(tmp_path / "page.png").convert("L"), np.float32)
            assert shot.std() > 20.0, "the page shows a picture, not a blank or black box"
    finally:
        await server.close()
