"""Helpers of the server tests: a served app on a real port, WHIP/WHEP offers built by aiortc, frame counting."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from streaming.pipelines import CLASSIC_BANNER
from streaming.testing import FakeFactory
from streaming.transports.webrtc import ServerConfig, create_app
from streaming.transports.webrtc.app import SERVER_KEY
from streaming.transports.webrtc.server import AvatarServer

SDP = "application/sdp"
NO_STUN = RTCConfiguration(iceServers=[])  # the tests' own peers stay on this machine too (host candidates only)


@dataclass
class Served:
    factory: FakeFactory
    app: web.Application
    url: str

    @property
    def server(self) -> AvatarServer:
        return self.app[SERVER_KEY]

    @property
    def peers(self) -> dict:
        return self.server.peers


async def serve(config: ServerConfig, factory: FakeFactory | None = None) -> tuple[TestServer, Served]:
    factory = factory or FakeFactory(banner=CLASSIC_BANNER)
    app = create_app(factory, config)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    return server, Served(factory, app, str(server.make_url("")).rstrip("/"))


async def wait_for(predicate: Callable[[], bool], timeout: float) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def publisher(
    audio: MediaStreamTrack | None = None, video: bool = True, audio_line: bool = True
) -> RTCPeerConnection:
    """A WHIP publisher as RFC 9725 wants it: audio (and video) ``sendonly``; the offer is its local description."""
    pc = RTCPeerConnection(NO_STUN)
    if audio_line:
        pc.addTransceiver(audio if audio is not None else "audio", direction="sendonly")
    if video:
        pc.addTransceiver("video", direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    return pc


async def player(audio: bool = True) -> RTCPeerConnection:
    """A WHEP player: video (and audio) ``recvonly``."""
    pc = RTCPeerConnection(NO_STUN)
    pc.addTransceiver("video", direction="recvonly")
    if audio:
        pc.addTransceiver("audio", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    return pc


def directions(sdp: str) -> dict[str, str]:
    """m-line kind -> its direction attribute in ``sdp``."""
    out: dict[str, str] = {}
    kind = None
    for line in sdp.splitlines():
        if line.startswith("m="):
            kind = line[2:].split()[0]
        elif kind and line[2:] in ("sendrecv", "sendonly", "recvonly", "inactive"):
            out[kind] = line[2:]
    return out


async def apply_answer(pc: RTCPeerConnection, answer: str) -> None:
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))


@dataclass
class Watch:
    """Reads a received video track: frame count and the red level of each frame (the FakeSession shows red
    while the audio it echoes is loud)."""

    frames: int = 0
    red: list[float] = field(default_factory=list)
    task: asyncio.Task | None = None

    def start(self, track: MediaStreamTrack) -> None:
        self.task = asyncio.ensure_future(self._run(track))

    async def _run(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                rgb = frame.to_ndarray(format="rgb24")
                self.frames += 1
                self.red.append(float(np.mean(rgb[..., 0])))

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, MediaStreamError):
                await self.task


def watch_video(pc: RTCPeerConnection) -> Watch:
    watch = Watch()

    @pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        if track.kind == "video":
            watch.start(track)

    return watch
