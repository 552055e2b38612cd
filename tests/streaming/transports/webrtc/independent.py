"""Clients nobody here wrote: Debian's ``simple-whip-client`` (``whip-client``, GStreamer's webrtcbin) and headless
Chromium running ``whep_player.html`` (standard RTCPeerConnection + fetch)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from streaming.measure.browser import DevTools, open_page

PLAYER_HTML = Path(__file__).with_name("whep_player.html")

# Debian bookworm's whip-client is linked with libsoup 2, while libnice (which webrtcbin loads) pulls libsoup 3 in
# through libgupnp-igd; libsoup aborts a process that holds both ("libsoup2 symbols detected ..."). A stand-in
# libgupnp-igd without UPnP port mapping (which a loopback test never needs) keeps libsoup 3 out of the process;
# the whip-client binary and everything else it runs are Debian's own.
IGD_STUB_C = """
#include <stddef.h>
void *gupnp_simple_igd_thread_new(void) { return NULL; }
unsigned long gupnp_simple_igd_get_type(void) { return 0; }
void gupnp_simple_igd_add_port(void *i, const char *p, unsigned e, const char *l, unsigned li, unsigned t,
                               const char *d) {}
void gupnp_simple_igd_remove_port_local(void *i, const char *p, const char *l, unsigned li) {}
"""

OPUS_RTP = "opusenc ! rtpopuspay pt=100 ssrc=1 ! queue ! application/x-rtp,media=audio,encoding-name=OPUS,payload=100"
# a 220 Hz tone, half a second on, half a second off (GStreamer's "ticks" wave: 110 periods every second)
TONE_BURSTS = (
    "audiotestsrc is-live=true wave=ticks freq=220 sine-periods-per-tick=110 tick-interval=1000000000 volume=0.8"
    f" ! audioconvert ! audioresample ! queue ! {OPUS_RTP}"
)
CAMERA = (
    "videotestsrc is-live=true pattern=ball ! video/x-raw,width=320,height=240,framerate=15/1 ! videoconvert"
    " ! queue ! vp8enc deadline=1 ! rtpvp8pay pt=96 ssrc=2 ! queue ! application/x-rtp,media=video,encoding-name=VP8,"
    "payload=96"
)


def wav_pipeline(path: Path) -> str:
    """A WAV file published in real time (``identity sync=true`` paces the file source on the clock)."""
    return (
        f"filesrc location={path} ! wavparse ! audioconvert ! audioresample ! identity sync=true ! queue ! {OPUS_RTP}"
    )


def require(tool: str, why: str) -> str:
    found = shutil.which(tool)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is not installed ({why}); .ci/run installs it")
        pytest.skip(f"{tool} is not installed ({why})")
    return found


def whip_client_env(workdir: Path) -> dict[str, str]:
    """The environment that runs Debian's whip-client (see IGD_STUB_C)."""
    binary = require("whip-client", "apt-get install simple-whip-client")
    env = dict(os.environ)
    linked = subprocess.run(["ldd", binary], capture_output=True, text=True, check=False).stdout
    if "libsoup-2.4" in linked:
        compiler = require("cc", "builds the libgupnp-igd stand-in whip-client needs on Debian bookworm")
        workdir.mkdir(parents=True, exist_ok=True)
        source = workdir / "igd_stub.c"
        source.write_text(IGD_STUB_C)
        out = workdir / "libgupnp-igd-1.0.so.4"
        cmd = [compiler, "-shared", "-fPIC", "-Wl,-soname,libgupnp-igd-1.0.so.4", "-o", str(out), str(source)]
        subprocess.run(cmd, check=True, capture_output=True)
        env["LD_LIBRARY_PATH"] = f"{workdir}:{env['LD_LIBRARY_PATH']}" if env.get("LD_LIBRARY_PATH") else str(workdir)
    env["GST_DEBUG"] = "0"
    return env


class WhipClient:
    """``whip-client`` as a child process; ``stop()`` sends SIGINT, on which it DELETEs its WHIP session."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.log = ""

    @classmethod
    async def start(
        cls, url: str, env: dict[str, str], audio: str, video: str | None = None, token: str | None = None,
        trickle: bool = True,
    ) -> WhipClient:  # fmt: skip
        args = ["whip-client", "-u", url, "-A", audio, "-o", "-l", "4"]
        args += ["-V", video] if video else []
        args += ["-t", token] if token else []
        args += [] if trickle else ["-n"]
        proc = await asyncio.create_subprocess_exec(
            *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        return cls(proc)

    async def stop(self, timeout: float = 15.0) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            out, _ = await asyncio.wait_for(self.proc.communicate(), timeout)
        except asyncio.TimeoutError:
            self.proc.kill()
            out, _ = await self.proc.communicate()
        self.log = out.decode(errors="replace") if out else ""
        assert self.proc.returncode is not None
        return self.proc.returncode


@contextlib.asynccontextmanager
async def player_page(whep_url: str, token: str | None, profile: Path, wav: Path, box: list[float] | None = None
                      ) -> AsyncIterator[DevTools]:  # fmt: skip
    """``whep_player.html`` in headless Chromium, served from its own origin (another port than the server's)."""
    require("chromium", "apt-get install chromium")
    app = web.Application()

    async def page(request: web.Request) -> web.FileResponse:
        return web.FileResponse(PLAYER_HTML)

    app.router.add_get("/player.html", page)
    origin = TestServer(app, host="127.0.0.1", port=0)
    await origin.start_server()
    try:
        query = {"whep": whep_url, "token": token or "", "box": json.dumps(box or [0.3, 0.6, 0.7, 0.8])}
        url = str(origin.make_url("/player.html").with_query(query))
        async with open_page(url, wav, profile) as devtools:
            yield devtools
    finally:
        await origin.close()


async def player_state(page: DevTools) -> dict[str, Any]:
    raw = await page.evaluate("JSON.stringify(window.player || null)")
    return (json.loads(raw) if raw else None) or {}


async def wait_player(page: DevTools, timeout: float = 30.0) -> dict[str, Any]:
    """The player's state once it has its answer (or has failed)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        state = await player_state(page)
        if state.get("state") in ("negotiated", "failed"):
            return state
        await asyncio.sleep(0.1)
    raise AssertionError(f"the WHEP player did not negotiate in {timeout} s: {await player_state(page)}")
