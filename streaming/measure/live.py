"""Runners for the lip-sync instrument (:mod:`streaming.measure.sync`) over real outputs: an mp4 written by
``engine render``, the streams an aiortc peer receives from ``engine serve --webrtc``, and (see
:mod:`streaming.measure.browser`) what headless Chromium plays.

Every runner feeds the same seeded burst signal (:func:`streaming.measure.sync.sync_signal`), reads the mouth opening
(darkness of the default avatar's mouth box) from each received frame and the loudness from the received audio,
puts both on one timeline by their presentation timestamps and cross-correlates them. Positive offset: the
mouth moves after its sound.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.audio.pcm import resample
from engine.media import write_wav
from streaming.factory import open_engine_factory
from streaming.measure import sync as lipsync
from streaming.measure.sync import (
    FPS,
    SyncError,
    SyncMeasure,
    default_mouth_box,
    frame_opening,
    measure,
    timed_offset,
)
from streaming.pipelines import RuntimeConfig
from streaming.transports.webrtc import ServerConfig, create_app
from streaming.transports.webrtc.app import serve_app
from streaming.transports.webrtc.client import ArrayAudioTrack

# --- offline: engine render -> mp4 ----------------------------------------------------------------------------


@dataclass
class DecodedMp4:
    video_t: np.ndarray  # [N] presentation time (s) of each frame
    opening: np.ndarray  # [N] mouth darkness of each frame
    audio: np.ndarray  # [n] mono float
    rate: int
    audio_t0: float  # presentation time of audio[0]


def decode_mp4(path: Path, box: tuple[int, int, int, int] | None = None) -> DecodedMp4:
    """Decode ``path`` with PyAV: per-frame mouth opening with its pts, and the audio placed by its pts."""
    import av

    times: list[float] = []
    opening: list[float] = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            rgb = frame.to_ndarray(format="rgb24")
            box = box or default_mouth_box(rgb.shape[1])
            times.append(_seconds(frame.pts, frame.time_base))
            opening.append(frame_opening(rgb, box))
    with av.open(str(path)) as container:
        rate = container.streams.audio[0].rate
        pieces: list[tuple[float, np.ndarray]] = []
        for aframe in container.decode(container.streams.audio[0]):
            pcm = aframe.to_ndarray()
            mono = pcm.mean(axis=0) if aframe.format.is_planar else pcm.reshape(-1, len(aframe.layout.channels)).mean(1)
            pieces.append((_seconds(aframe.pts, aframe.time_base), mono.astype(np.float64)))
    if not pieces:
        raise SyncError(f"{path} has no audio")
    audio, t0 = _place(pieces, rate)
    return DecodedMp4(np.asarray(times), np.asarray(opening), audio, rate, t0)


def _seconds(pts: int | None, time_base: Any) -> float:
    if pts is None or time_base is None:
        raise SyncError("a decoded frame has no timestamp")
    return float(pts * time_base)


def _place(pieces: list[tuple[float, np.ndarray]], rate: int) -> tuple[np.ndarray, float]:
    """Audio frames ``(pts_s, samples)`` laid on one array by their pts (gaps silent) -> ``(audio, t0)``."""
    t0 = min(t for t, _ in pieces)
    end = max(round((t - t0) * rate) + s.size for t, s in pieces)
    out = np.zeros(end)
    for t, s in pieces:
        i = round((t - t0) * rate)
        out[i : i + s.size] = s
    return out, t0


def render_with_cli(wav: Path, out: Path, fps: int = FPS) -> str:
    """Run the real ``engine render`` command on ``wav`` (a child process, as a user runs it); returns what it
    printed. Raises :class:`SyncError` when it fails."""
    command = [sys.executable, "-m", "streaming.cli", "render", "--audio", str(wav), "--out", str(out)]
    done = subprocess.run([*command, "--fps", str(fps), "--no-progress"], capture_output=True, text=True)
    if done.returncode != 0:
        raise SyncError(f"engine render failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return done.stdout + done.stderr


def measure_offline(workdir: Path, seconds: float = 8.0, seed: int = 0) -> SyncMeasure:
    """Sync signal -> WAV -> ``engine render`` (default avatar, mode auto) -> mp4 -> decoded offset."""
    audio, bursts = lipsync.sync_signal(seconds, seed=seed)
    wav, mp4 = workdir / "sync.wav", workdir / "sync.mp4"
    write_wav(wav, audio, lipsync.SAMPLE_RATE)
    printed = render_with_cli(wav, mp4)
    decoded = decode_mp4(mp4)
    return measure(
        "offline", decoded.video_t, decoded.opening, decoded.audio, decoded.rate, decoded.audio_t0,
        bursts=len(bursts), render_said=[line for line in printed.splitlines() if "mode" in line],
    )  # fmt: skip


# --- live: engine serve --webrtc -> aiortc peer ---------------------------------------------------------------


@contextlib.asynccontextmanager
async def classic_server(mode: str | None = "classic") -> AsyncIterator[str]:
    """The real server (runtime in ``mode``; None: as ``engine serve`` picks it) with the default avatar on
    127.0.0.1, an ephemeral port -> its base URL."""

    factory = await open_engine_factory(RuntimeConfig(mode=mode or "auto"))
    app = create_app(factory, ServerConfig())
    stop = asyncio.Event()
    started: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve_app(app, "127.0.0.1", 0, stop, on_started=started.set_result))
    try:
        waiting: set[asyncio.Future[Any]] = {task, started}
        await asyncio.wait(waiting, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if not started.done():
            if task.done():
                task.result()  # the server failed to start: raise its error
            raise SyncError("the server did not start within 30 s")
        yield started.result().rstrip("/")
    finally:
        stop.set()
        await task  # serve_app closes the runner: every session, the factory and its runtime


class ReceivedStreams:
    """What an aiortc peer got: per video frame (pts s, arrival s, opening), per audio frame (pts s, samples)."""

    def __init__(self) -> None:
        self.video_pts: list[float] = []
        self.video_arrival: list[float] = []
        self.opening: list[float] = []
        self.audio: list[tuple[float, np.ndarray]] = []
        self.audio_arrival: list[float] = []
        self.audio_rate = 48_000
        self.size = 0
        self.picture_lag_ms: float | None = None  # the server's mean age of the pictures it sent (late, repeated)

    async def read_video(self, track: Any) -> None:
        from aiortc.mediastreams import MediaStreamError

        box: tuple[int, int, int, int] | None = None
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                arrival = time.monotonic()
                rgb = frame.to_ndarray(format="rgb24")
                if box is None:
                    self.size = rgb.shape[1]
                    box = default_mouth_box(self.size)
                self.video_pts.append(_seconds(frame.pts, frame.time_base))
                self.video_arrival.append(arrival)
                self.opening.append(frame_opening(rgb, box))

    async def read_audio(self, track: Any) -> None:
        from aiortc.mediastreams import MediaStreamError

        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                arrival = time.monotonic()
                pcm = frame.to_ndarray().reshape(-1, len(frame.layout.channels)).mean(axis=1) / 32768.0
                self.audio_rate = frame.sample_rate
                self.audio.append((_seconds(frame.pts, frame.time_base), pcm))
                self.audio_arrival.append(arrival - pcm.size / frame.sample_rate)


async def receive_live(url: str, seconds: float = 10.0, seed: int = 0, tail_s: float = 1.5) -> ReceivedStreams:
    """Send the sync signal as a 48 kHz microphone to ``url``'s ``/offer`` and record what comes back."""
    import aiohttp
    from aiortc import RTCPeerConnection, RTCSessionDescription

    audio, _ = lipsync.sync_signal(seconds, seed=seed)
    mic = ArrayAudioTrack(resample(audio, lipsync.SAMPLE_RATE, 48_000), 48_000)
    received = ReceivedStreams()
    pc = RTCPeerConnection()
    tasks: list[asyncio.Task[None]] = []

    def on_track(track: Any) -> None:
        reader = received.read_video(track) if track.kind == "video" else received.read_audio(track)
        tasks.append(asyncio.create_task(reader))

    pc.on("track", on_track)
    try:
        pc.addTrack(mic)
        pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        offer = {"sdp": pc.localDescription.sdp, "type": "offer"}
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http,
            http.post(f"{url}/offer", json=offer) as resp,
        ):
            if resp.status != 200:
                raise SyncError(f"the server refused the offer: HTTP {resp.status} {await resp.text()}")
            answer = await resp.json()
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        deadline = time.monotonic() + seconds + tail_s + 10.0
        # the microphone plays in real time from the moment the connection starts pulling it
        while not (mic.finished and received.video_pts) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(tail_s)  # the last burst's frames and sound are still on their way
        received.picture_lag_ms = await server_picture_lag_ms(url)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await pc.close()
        mic.stop()
    return received


async def server_picture_lag_ms(url: str) -> float | None:
    """The server's mean picture lag (``avatar_video_picture_lag_ms`` in ``/metrics``) of its one open session.

    A picture rendered too late for its slot is shown in a later one and a missing one repeats the last: the mouth
    then trails its sound by that many slots, which the server reports. Pictures on time add nothing, so the offset
    a receiver measures, less this lag, is what the timestamps and the pipeline themselves contribute.
    """
    import aiohttp

    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as resp:
        text = await resp.text()
    found = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
             if line.startswith("avatar_video_picture_lag_ms{")]  # fmt: skip
    return found[0] if len(found) == 1 else None


def measure_received(received: ReceivedStreams, mode: str = "live") -> SyncMeasure:
    """Offset from the received tracks' timestamps.

    The receiver numbers each track from its first packet (aiortc maps RTP time to pts from 0), and the server
    starts both tracks at the same output-clock instant (the audio track begins with the 20 ms slot of the first
    video frame's pts, a multiple of 40 ms), so pts 0 of both tracks is one instant. The offset from arrival
    times (which adds aiortc's 4-packet audio jitter-buffer hold, ~60-80 ms) is reported beside it.
    """
    if not received.video_pts or not received.audio:
        raise SyncError(f"received {len(received.video_pts)} video frames and {len(received.audio)} audio frames")
    audio, t0 = _place(received.audio, received.audio_rate)
    result = measure(mode, np.asarray(received.video_pts), np.asarray(received.opening), audio,
                     received.audio_rate, t0, video_size=received.size,
                     picture_lag_ms=received.picture_lag_ms)  # fmt: skip
    # the same by arrival time: each track's pts mapped onto the local clock by its earliest packet
    video_shift = float(np.min(np.asarray(received.video_arrival) - np.asarray(received.video_pts)))
    audio_pts = np.asarray([t for t, _ in received.audio])
    audio_shift = float(np.min(np.asarray(received.audio_arrival) - audio_pts))
    try:
        by_arrival = timed_offset(np.asarray(received.video_pts) + video_shift, np.asarray(received.opening),
                                  audio, received.audio_rate, t0 + audio_shift)  # fmt: skip
        result.notes["arrival_offset_ms"] = round(by_arrival.offset_ms, 1)
    except (SyncError, ValueError) as exc:
        result.notes["arrival_offset_ms"] = f"unavailable: {exc}"
    return result


async def measure_live(seconds: float = 10.0, seed: int = 0) -> SyncMeasure:
    """The real classic server in this process, an aiortc peer on loopback, the offset of what it received."""
    async with classic_server() as url:
        received = await receive_live(url, seconds, seed)
    return measure_received(received)


def shifted(received: ReceivedStreams, frames: int) -> ReceivedStreams:
    """A copy whose video timestamps are ``frames`` frames later (a desync the instrument must find)."""
    out = ReceivedStreams()
    out.__dict__.update(received.__dict__)
    out.video_pts = [t + frames / FPS for t in received.video_pts]
    return out
