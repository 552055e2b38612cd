"""Runners for the lip-sync instrument (:mod:`engine.lipsync`) over real outputs: an mp4 written by
``engine render``, the streams an aiortc peer receives from ``engine serve --webrtc``, and (see
:mod:`engine.lipsync_browser`) what headless Chromium plays.

Every runner feeds the same seeded burst signal (:func:`engine.lipsync.sync_signal`), reads the mouth opening
(darkness of the default avatar's mouth box) from each received frame and the loudness from the received audio,
puts both on one timeline by their presentation timestamps and cross-correlates them. Positive offset: the
mouth moves after its sound.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
import wave
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine import lipsync

FPS = 25
MAX_LAG_FRAMES = 10  # +-400 ms: any real desync is far inside this


@dataclass
class SyncMeasure:
    """One measurement: offset (ms, > 0 video late), per-burst jitter, peak correlation, and what it saw."""

    mode: str
    offset_ms: float
    offset_frames: float
    jitter_ms: float
    correlation: float
    video_frames: int
    audio_seconds: float
    notes: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("offset_ms", "offset_frames", "jitter_ms", "correlation"):
            out[key] = round(float(out[key]), 3)
        return out


class SyncError(RuntimeError):
    """The measurement could not be made (too few frames, no audio, a peer that never connected)."""


def default_mouth_box(size: int) -> tuple[int, int, int, int]:
    """The default avatar's mouth box scaled to frames of ``size`` x ``size`` pixels."""
    from engine.avatar.default import SIZE, default_landmarks

    return lipsync.mouth_box(default_landmarks() * (size / SIZE))


def write_wav(path: Path, audio: np.ndarray, rate: int) -> None:
    """Mono 16-bit PCM WAV of float audio in [-1, 1]."""
    pcm = (np.clip(np.asarray(audio, np.float64), -1.0, 1.0) * 32767.0).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.tobytes())


def resample(audio: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    import soxr

    return np.asarray(soxr.resample(np.asarray(audio, np.float32), rate_in, rate_out), np.float32)


def frame_opening(rgb: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """Mouth darkness of one ``[H, W, 3]`` frame (see :func:`engine.lipsync.mouth_opening`)."""
    return float(lipsync.mouth_opening(rgb[None], box)[0])


def timed_offset(
    video_t: np.ndarray,
    opening: np.ndarray,
    audio: np.ndarray,
    rate: int,
    audio_t0: float,
    fps: float = FPS,
) -> lipsync.Offset:
    """Offset between mouth openings shown at times ``video_t`` (s) and ``audio`` (mono, ``rate``) starting at
    ``audio_t0`` (s), all on one timeline.

    Frame ``i`` of the grid is the video frame presented at ``i / fps`` and the audio RMS over
    ``[i / fps, (i + 1) / fps)``, the pairing under which an in-sync render measures 0.
    """
    video_t = np.asarray(video_t, np.float64)
    opening = np.asarray(opening, np.float64)
    audio = np.asarray(audio, np.float64)
    if video_t.size < 2 * MAX_LAG_FRAMES + 2 or audio.size < rate:
        raise SyncError(f"too little to measure: {video_t.size} frames, {audio.size / rate:.2f} s of audio")
    start = max(video_t.min(), audio_t0)
    stop = min(video_t.max(), audio_t0 + audio.size / rate)
    first, last = int(np.ceil(start * fps - 1e-6)), int(np.floor(stop * fps + 1e-6)) - 1
    if last - first < 2 * MAX_LAG_FRAMES + 2:
        raise SyncError(f"audio and video overlap for only {max(stop - start, 0.0):.2f} s")
    grid = np.arange(first, last + 1) / fps
    order = np.argsort(video_t)
    env = np.zeros(grid.size)
    for k, t in enumerate(grid):
        seg = audio[max(round((t - audio_t0) * rate), 0) : max(round((t + 1 / fps - audio_t0) * rate), 0)]
        env[k] = np.sqrt(np.mean(seg**2)) if seg.size else 0.0
    # a frame the receiver dropped takes the value of its neighbours rather than a hole in the series
    coarse = lipsync.estimate_offset(np.interp(grid, video_t[order], opening[order]), env, fps, MAX_LAG_FRAMES)
    # again with the picture moved back by the whole frames found: the per-burst onset jitter pairs each sound
    # onset with the mouth onset just after it, which only holds once the constant part of the offset is gone
    lag = round(coarse.offset_frames)
    aligned = np.interp(grid + lag / fps, video_t[order], opening[order])
    fine = lipsync.estimate_offset(aligned, env, fps, MAX_LAG_FRAMES) if lag else coarse
    frames = lag + fine.offset_frames
    return lipsync.Offset(1000.0 * frames / fps, frames, fine.correlation, onset_jitter_ms(env, aligned, fps))


def onset_jitter_ms(envelope: np.ndarray, opening: np.ndarray, fps: float, window: float = 3.0) -> float:
    """Std (ms) of the delays between each sound onset and the nearest mouth onset within ``window`` frames.

    Unlike pairing every onset with the next one, a burst whose loudness or opening stays under the half-range
    threshold (a quiet burst after a codec or the browser's audio processing) is left out instead of being paired
    with the following burst, half a second away.
    """
    ta, tv = _rising(envelope), _rising(opening)
    delays = [tv[np.argmin(np.abs(tv - t))] - t for t in ta if tv.size and np.min(np.abs(tv - t)) <= window]
    return float(np.std(delays) * 1000.0 / fps) if len(delays) > 1 else 0.0


def _rising(x: np.ndarray) -> np.ndarray:
    """Fractional indices where ``x`` rises through the middle of its range."""
    x = np.asarray(x, np.float64)
    mid = 0.5 * (x.min() + x.max())
    idx = np.nonzero((x[:-1] < mid) & (x[1:] >= mid))[0]
    return idx + (mid - x[idx]) / (x[idx + 1] - x[idx] + 1e-12)


def measure(mode: str, video_t: np.ndarray, opening: np.ndarray, audio: np.ndarray, rate: int, audio_t0: float,
            **notes: Any) -> SyncMeasure:  # fmt: skip
    found = timed_offset(video_t, opening, audio, rate, audio_t0)
    return SyncMeasure(
        mode,
        found.offset_ms,
        found.offset_frames,
        found.jitter_ms,
        found.correlation,
        int(np.asarray(video_t).size),
        float(np.asarray(audio).size / rate),
        notes,
    )


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
    """Run the real ``engine render`` command on ``wav`` (in this process); returns what it printed."""
    from engine.cli.render import render

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        render.main(
            ["--audio", str(wav), "--out", str(out), "--fps", str(fps), "--no-progress"],
            prog_name="engine render",
            standalone_mode=False,
        )
    return printed.getvalue()


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
    from streaming.server import ServerConfig, create_app
    from streaming.server.app import serve_app
    from streaming.server.engine_factory import open_engine_factory

    factory = await open_engine_factory(mode=mode)
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

    from streaming.client import ArrayAudioTrack

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
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await pc.close()
        mic.stop()
    return received


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
                     received.audio_rate, t0, video_size=received.size)  # fmt: skip
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


# --- the benchmark: engine bench sync -------------------------------------------------------------------------

SYNC_MODES = ("offline", "live", "browser")


def run_sync_bench(modes: tuple[str, ...], seconds: float, seed: int, workdir: Path) -> dict[str, Any]:
    """Measure each of ``modes`` (offline, live, browser) -> the benchmark record (device, commit, config).

    A mode that cannot run here (no Chromium) is recorded with its error instead of a number.
    """
    from engine.benchinfo import environment

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
                from engine.lipsync_browser import measure_browser

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
