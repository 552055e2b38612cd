"""Python client: stream a microphone or an audio file to an avatar server and receive the talking face.

The client is an aiortc peer that speaks the server's ``/offer`` JSON signalling. What it receives can be shown
in a window, sent to a virtual camera (OBS Virtual Camera / v4l2loopback), played on an audio device, recorded,
and measured: received fps and the offset between picture and sound as they arrive (``ClientReport``).

Picture and sound stay together by their timestamps: when the sound is played, the window and the virtual camera
show each frame when the audio device plays its pts (:mod:`streaming.transports.webrtc.playout`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import av
import numpy as np
from aiohttp import ClientError as HttpClientError
from aiohttp import ClientSession, ClientTimeout
from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from engine.media import MediaError, load_audio
from streaming.transports.webrtc.client_audio import (
    FRAME_S,
    PORTAUDIO_HINT,
    AudioOutSink,
    MicrophoneTrack,
    import_sounddevice,
    list_devices,
)
from streaming.transports.webrtc.playout import ClientError, PlayoutClock
from streaming.transports.webrtc.recorder import SessionRecorder
from streaming.transports.webrtc.virtual_camera import VIRTUAL_CAMERA_HINT, VirtualCameraSink
from streaming.transports.webrtc.window import WindowSink
from streaming.wire import WireError, parse_json_object

__all__ = [
    "PORTAUDIO_HINT",
    "VIRTUAL_CAMERA_HINT",
    "ArrayAudioTrack",
    "AudioOutSink",
    "AvatarClient",
    "ClientError",
    "ClientOptions",
    "ClientReport",
    "MicrophoneTrack",
    "VirtualCameraSink",
    "WindowSink",
    "estimate_av_offset",
    "import_sounddevice",
    "list_devices",
    "read_audio_file",
    "run_client",
]

logger = logging.getLogger(__name__)

AIORTC_AUDIO_HOLD_S = 0.08  # aiortc's audio jitter buffer waits for 4 packets before it plays any
# The A/V offset estimate is reported as reliable only with this much evidence behind it.
MIN_AV_CORRELATION = 0.3
MIN_AV_ONSETS = 5
MIN_AV_FPS = 15.0
HALVES_AGREE_S = 0.08
ICE_SCHEMES = ("stun", "stuns", "turn", "turns")
MAX_REPLY_BYTES = 256 * 1024  # a reply echoes the control state; stats messages are a few KiB


# --- audio sources ------------------------------------------------------------------------------------------


def read_audio_file(path: Path) -> tuple[np.ndarray, int]:
    """Any audio file the engine reads (WAV, mp3, flac, ...) -> (float32 ``[n, channels]``, rate).

    Raises ClientError naming the file and the problem."""
    try:
        return load_audio(path)
    except MediaError as exc:
        raise ClientError(str(exc)) from exc


class ArrayAudioTrack(MediaStreamTrack):
    """A numpy signal played as a live microphone: 20 ms frames in real time, then silence."""

    kind = "audio"

    def __init__(self, samples: np.ndarray, sample_rate: int) -> None:
        super().__init__()
        pcm = samples if samples.ndim == 2 else samples[:, None]
        self._pcm = (np.clip(pcm, -1.0, 1.0) * 32767.0).astype(np.int16)  # [n, channels]
        self._rate = sample_rate
        self._block = int(sample_rate * FRAME_S)
        self._layout = "mono" if self._pcm.shape[1] == 1 else "stereo"
        self._pos = 0
        self._t0: float | None = None

    @property
    def finished(self) -> bool:
        return self._pos >= self._pcm.shape[0]

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._t0 is None:
            self._t0 = time.monotonic()
        delay = self._t0 + self._pos / self._rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        block = np.zeros((self._block, self._pcm.shape[1]), np.int16)
        chunk = self._pcm[self._pos : self._pos + self._block]
        block[: len(chunk)] = chunk
        frame = av.AudioFrame.from_ndarray(block.reshape(1, -1), format="s16", layout=self._layout)
        frame.sample_rate = self._rate
        frame.pts = self._pos
        frame.time_base = Fraction(1, self._rate)
        self._pos += self._block
        return frame


# --- measurements -------------------------------------------------------------------------------------------


@dataclass
class ClientReport:
    video_frames: int = 0
    first_video_s: float | None = None  # after the answer arrived
    video_fps: float = 0.0  # frames received per second, first to last
    video_size: tuple[int, int] | None = None
    audio_seconds: float = 0.0
    av_offset_ms: float | None = None  # > 0: the picture arrives later than the sound that belongs to it
    av_correlation: float | None = None  # peak normalised correlation behind av_offset_ms
    av_onsets: int = 0  # sound onsets (speech starting after a pause) the estimate could line up
    av_sync: str = "unmeasured"  # "reliable", or "unreliable: <why>" (then av_offset_ms means little)
    controls_acked: int = 0
    controls_failed: int = 0
    controls: list[dict[str, Any]] = field(default_factory=list)  # each --control: what was sent, the reply
    server: dict[str, Any] = field(default_factory=dict)
    last_stats: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)  # what each output did (window, camera, speaker)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)


def estimate_av_offset(
    video_t: np.ndarray, video_act: np.ndarray, audio_t: np.ndarray, audio_env: np.ndarray, max_lag_s: float = 0.5
) -> tuple[float, float] | None:
    """Lag (s) that best aligns picture activity with changes of loudness, and the correlation at that lag.

    Both series are sampled by arrival time; they are put on a 10 ms grid and cross-correlated. Video activity
    is frame-to-frame change; audio activity is the change of the loudness envelope, so a mouth that opens when
    speech starts (or a test pattern that flips when sound starts) lines up with it.
    """
    if video_t.size < 10 or audio_t.size < 10:
        return None
    step = 0.01
    start, stop = max(video_t[0], audio_t[0]), min(video_t[-1], audio_t[-1])
    if stop - start < 4 * max_lag_s:
        return None
    grid = np.arange(start, stop, step)
    v = np.interp(grid, video_t, video_act)
    env = np.interp(grid, audio_t, audio_env)
    a = np.abs(np.diff(env, prepend=env[0]))
    a = np.convolve(a, np.ones(4) / 4, mode="same")  # one 40 ms video frame's worth of smoothing
    v = (v - v.mean()) / (v.std() + 1e-9)
    a = (a - a.mean()) / (a.std() + 1e-9)
    lags = np.arange(-int(max_lag_s / step), int(max_lag_s / step) + 1)
    corr = np.array([np.mean(v[max(k, 0) : v.size + min(k, 0)] * a[max(-k, 0) : a.size + min(-k, 0)]) for k in lags])
    best = int(np.argmax(corr))
    return float(lags[best] * step), float(corr[best])


def count_onsets(audio_t: np.ndarray, audio_env: np.ndarray, min_gap_s: float = 0.15) -> int:
    """Sound onsets: the loudness rising through the middle of its range, at least ``min_gap_s`` apart."""
    if audio_t.size < 3:
        return 0
    grid = np.arange(audio_t[0], audio_t[-1], 0.01)
    env = np.interp(grid, audio_t, audio_env)
    lo, hi = np.percentile(env, 10), np.percentile(env, 90)
    if hi - lo < 1e-4:  # silence, or a steady tone: nothing to line up
        return 0
    above = env >= 0.5 * (lo + hi)
    rising = grid[1:][above[1:] & ~above[:-1]]
    count, last = 0, -np.inf
    for t in rising:
        if t - last >= min_gap_s:
            count += 1
        last = t
    return count


def judge_av_offset(
    offset_s: float,
    correlation: float,
    onsets: int,
    video_fps: float = 25.0,
    halves: Sequence[float | None] = (),
    max_lag_s: float = 0.5,
) -> str:
    """The verdict on an offset estimate: "reliable", or "unreliable: <why>".

    Reliable needs a clear correlation peak (MIN_AV_CORRELATION), enough sound onsets to line up
    (MIN_AV_ONSETS), pictures often enough to see them (MIN_AV_FPS), a peak inside the search range, and the
    two halves of the run agreeing within HALVES_AGREE_S."""
    reasons = []
    if correlation < MIN_AV_CORRELATION:
        reasons.append(f"correlation {correlation:.2f} < {MIN_AV_CORRELATION}")
    if onsets < MIN_AV_ONSETS:
        reasons.append(f"{onsets} sound onsets < {MIN_AV_ONSETS}")
    if video_fps < MIN_AV_FPS:
        reasons.append(f"{video_fps:.1f} fps received < {MIN_AV_FPS}")
    if abs(offset_s) >= max_lag_s - 0.02:
        reasons.append(f"the peak is at the edge of the +-{max_lag_s * 1000:.0f} ms search")
    known = [h for h in halves if h is not None]
    if len(known) == 2 and abs(known[0] - known[1]) > HALVES_AGREE_S:
        reasons.append(f"the halves of the run disagree ({known[0] * 1000:+.0f} vs {known[1] * 1000:+.0f} ms)")
    return "reliable" if not reasons else "unreliable: " + ", ".join(reasons)


# --- the client ---------------------------------------------------------------------------------------------

VideoSink = Callable[[np.ndarray], None]
AudioSink = Callable[[np.ndarray, int], None]
TimedVideoSink = Callable[[np.ndarray, float], None]  # (rgb [H, W, 3], pts s)
TimedAudioSink = Callable[[np.ndarray, int, float], None]  # (pcm [n, channels] int16, rate, pts s)


def check_url(url: str) -> str:
    """The server root without a trailing slash; a URL that is not http(s)://host[:port] is refused in one line."""
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a port that is not a number
    except ValueError as exc:
        raise ClientError(f"--url {url!r}: not a valid URL ({exc})") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ClientError(f"--url {url!r}: expected http://HOST[:PORT] or https://HOST[:PORT]")
    if port == 0:
        raise ClientError(f"--url {url!r}: port 0 is not a server's port")
    return url.rstrip("/")


def ice_servers(urls: Sequence[str], username: str | None = None, credential: str | None = None) -> list[RTCIceServer]:
    """``--ice-server`` URLs -> RTCIceServer list; TURN servers get the username and credential."""
    servers = []
    for url in urls:
        scheme = url.split(":", 1)[0].lower()
        if scheme not in ICE_SCHEMES or ":" not in url or not url.split(":", 1)[1]:
            raise ClientError(f"--ice-server {url!r}: expected stun:HOST[:PORT] or turn:HOST[:PORT][?transport=udp]")
        if scheme.startswith("turn"):
            if not username or not credential:
                raise ClientError(f"--ice-server {url!r}: a TURN server needs --ice-username and --ice-credential")
            servers.append(RTCIceServer(urls=url, username=username, credential=credential))
        else:
            servers.append(RTCIceServer(urls=url))
    return servers


class AvatarClient:
    """One connection to ``url`` (the server root). Use ``async with``, or ``connect()`` / ``close()``.

    ``ice`` are the STUN / TURN servers to gather candidates with; none by default, so nothing outside the
    two peers is contacted (aiortc on its own would ask a public STUN server)."""

    def __init__(
        self,
        url: str,
        audio: MediaStreamTrack | None,
        token: str | None = None,
        video_sinks: list[VideoSink] | None = None,
        audio_sinks: list[AudioSink] | None = None,
        ice: Sequence[RTCIceServer] = (),
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.audio = audio
        self.video_sinks = list(video_sinks or [])
        self.audio_sinks = list(audio_sinks or [])
        self.timed_video_sinks: list[TimedVideoSink] = []
        self.timed_audio_sinks: list[TimedAudioSink] = []
        self.report = ClientReport()
        self.session_id: str | None = None
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=list(ice)))
        self.channel: RTCDataChannel = self.pc.createDataChannel("control")
        self._replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._t_answer = 0.0
        self._video_t: list[float] = []
        self._video_act: list[float] = []
        self._audio_t: list[float] = []
        self._video_pts: list[float] = []
        self._audio_pts: list[float] = []
        self._audio_env: list[float] = []
        self.video_timeline: list[tuple[float, float]] = []  # (pts s, arrival monotonic s) per received frame
        self._channel_open = asyncio.Event()
        self.first_video = asyncio.Event()
        self.failed = asyncio.Event()  # a sink raised: see ``error``
        self.error: Exception | None = None
        self.channel.on("open", self._channel_open.set)
        self.channel.on("message", self._on_message)
        self.pc.on("track", self._on_track)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def __aenter__(self) -> AvatarClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self, timeout_s: float = 20.0, video_codec: str | None = None) -> dict[str, Any]:
        """Offer, post to ``/offer``, apply the answer; ``video_codec`` ("VP8", "H264") restricts the offer."""
        if self.audio is not None:
            self.pc.addTrack(self.audio)
        else:
            self.pc.addTransceiver("audio", direction="recvonly")
        video = self.pc.addTransceiver("video", direction="recvonly")
        if video_codec is not None:
            wanted = {f"video/{video_codec}".lower(), "video/rtx"}
            capabilities = RTCRtpReceiver.getCapabilities("video")
            offered = capabilities.codecs if capabilities is not None else []
            codecs = [c for c in offered if c.mimeType.lower() in wanted]
            if len(codecs) < 2:
                raise ClientError(f"unknown video codec {video_codec!r}")
            video.setCodecPreferences(codecs)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        offer = {"sdp": self.pc.localDescription.sdp, "type": "offer"}
        async with (
            ClientSession(timeout=ClientTimeout(total=timeout_s)) as http,
            http.post(f"{self.url}/offer", json=offer, headers=self.headers()) as resp,
        ):
            if resp.status != 200:
                detail = (await resp.text()).strip()
                retry = resp.headers.get("Retry-After")
                hint = f" (retry after {retry} s)" if retry else ""
                raise ClientError(f"server refused the offer: HTTP {resp.status} {detail}{hint}")
            answer = await resp.json()
        self._t_answer = time.monotonic()
        self.session_id = answer["session"]
        self.report.server = {k: v for k, v in answer.items() if k not in ("sdp", "type")}
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
        return self.report.server

    async def control(self, timeout_s: float = 5.0, **values: Any) -> dict[str, Any]:
        """Send a control message over the data channel; returns the server's ack or error reply."""
        await asyncio.wait_for(self._channel_open.wait(), timeout_s)
        self.channel.send(json.dumps(values))
        while True:
            reply = await asyncio.wait_for(self._replies.get(), timeout_s)
            if reply.get("type") in ("ack", "error"):
                return reply

    def _on_message(self, message: str | bytes) -> None:
        try:  # the server's replies pass the same strict parsing as what it reads from clients
            data = parse_json_object(message, "server data-channel message", MAX_REPLY_BYTES)
        except WireError as exc:
            logger.warning("ignored: %s", exc)
            return
        if data.get("type") == "stats":
            self.report.last_stats = data
            return
        if data.get("type") == "ack":
            self.report.controls_acked += 1
        elif data.get("type") == "error":
            self.report.controls_failed += 1
        self._replies.put_nowait(data)

    def _on_track(self, track: MediaStreamTrack) -> None:
        reader = self._read_video(track) if track.kind == "video" else self._read_audio(track)
        self._tasks.append(asyncio.create_task(reader, name=f"client-{track.kind}"))

    async def _read_video(self, track: MediaStreamTrack) -> None:
        prev: np.ndarray | None = None
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                now = time.monotonic()
                if not isinstance(frame, av.VideoFrame):
                    continue
                rgb = frame.to_ndarray(format="rgb24")
                pts_s = _seconds(frame.pts, frame.time_base)
                small = rgb[::8, ::8].astype(np.float32)
                self._video_t.append(now)
                self._video_pts.append(pts_s)
                self._video_act.append(0.0 if prev is None else float(np.abs(small - prev).mean()))
                self.video_timeline.append((pts_s, now))
                prev = small
                if self.report.first_video_s is None:
                    self.report.first_video_s = now - self._t_answer
                self.report.video_frames += 1
                self.report.video_size = (rgb.shape[1], rgb.shape[0])
                self.first_video.set()
                self._feed(self.video_sinks, rgb)
                self._feed(self.timed_video_sinks, rgb, pts_s)

    async def _read_audio(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                now = time.monotonic()
                if not isinstance(frame, av.AudioFrame):
                    continue
                pcm = frame.to_ndarray().reshape(-1, len(frame.layout.channels))  # s16 packed from Opus
                self.report.audio_seconds += pcm.shape[0] / frame.sample_rate
                pts_s = _seconds(frame.pts, frame.time_base)
                self._audio_t.append(now)
                self._audio_pts.append(pts_s)
                self._audio_env.append(float(np.sqrt(np.mean((pcm.astype(np.float32) / 32768.0) ** 2))))
                self._feed(self.audio_sinks, pcm, frame.sample_rate)
                self._feed(self.timed_audio_sinks, pcm, frame.sample_rate, pts_s)

    def _feed(self, sinks: list[Any], *args: Any) -> None:
        for sink in sinks:
            try:
                sink(*args)
            except Exception as exc:  # a broken sink ends the run with its reason instead of dying silently
                self.fail(exc)

    def fail(self, exc: Exception) -> None:
        """An output broke: the run ends with this reason (the first one wins)."""
        if self.error is None:
            self.error = exc
        self.failed.set()

    def finish_report(self) -> ClientReport:
        vt = np.asarray(self._video_t)
        if vt.size >= 2 and vt[-1] > vt[0]:
            self.report.video_fps = float((vt.size - 1) / (vt[-1] - vt[0]))
        # audio frames arrive in 20 ms packets: smooth to 40 ms loudness so both series have similar detail
        env = np.asarray(self._audio_env)
        if env.size >= 2:
            env = np.convolve(env, np.ones(2) / 2, mode="same")
        # each track on the local clock by its timestamps, placed by its least delayed packet: what arrives in
        # bursts (a slow renderer, the jitter buffer) is put back where it belongs
        video_t = _unjittered(np.asarray(self._video_pts), vt)
        audio_t = _unjittered(np.asarray(self._audio_pts), np.asarray(self._audio_t))
        act = np.asarray(self._video_act)
        found = estimate_av_offset(video_t, act, audio_t, env)
        if found is None:
            self.report.av_sync = "unmeasured: too little audio and video"
            return self.report
        self.report.av_offset_ms = round(found[0] * 1000.0, 1)
        self.report.av_correlation = round(found[1], 3)
        self.report.av_onsets = count_onsets(audio_t, env)
        # the same estimate on each half of the run: a real offset does not move, a chance peak does
        halves = []
        for part in (video_t < np.median(video_t), video_t >= np.median(video_t)):
            a_part = (audio_t >= video_t[part][0]) & (audio_t <= video_t[part][-1])
            half = estimate_av_offset(video_t[part], act[part], audio_t[a_part], env[a_part])
            halves.append(None if half is None else half[0])
        self.report.av_sync = judge_av_offset(found[0], found[1], self.report.av_onsets, self.report.video_fps, halves)
        return self.report

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.pc.close()
        if self.audio is not None:
            self.audio.stop()


def _unjittered(pts: np.ndarray, arrival: np.ndarray) -> np.ndarray:
    """Arrival times without the network's and the sender's jitter: ``pts`` shifted by the smallest delay seen."""
    if pts.size == 0 or pts.size != arrival.size:
        return arrival
    return pts + float(np.min(arrival - pts))


def _seconds(pts: int | None, time_base: Fraction | None) -> float:
    return float(pts * time_base) if pts is not None and time_base is not None else 0.0


# --- a run of ``engine client`` -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientOptions:
    url: str
    token: str | None = None
    audio_file: Path | None = None  # None: the microphone
    mic_device: str | int | None = None
    show: bool = False
    virtual_camera: bool = False
    camera_device: str | None = None  # pyvirtualcam device (e.g. /dev/video4); None: the first one found
    audio_out: str | int | None = None
    audio_delay_ms: float | None = None  # sound after its picture; None: 0 (window), one camera frame (camera)
    duration_s: float | None = None  # None: the file's length plus one second, or until interrupted (mic)
    record_dir: Path | None = None
    video_timeout_s: float = 5.0  # no video frame within this after the answer: the run fails
    ice_servers: tuple[str, ...] = ()  # STUN/TURN URLs; none: host candidates only, nothing else contacted
    ice_username: str | None = None
    ice_credential: str | None = None
    fps_hint: int = 25
    timeline_out: Path | None = None  # write when each frame arrived and was shown (JSON) here
    controls: tuple[dict[str, Any], ...] = ()  # control messages sent over the data channel once it is open
    on_control_reply: Callable[[dict[str, Any], dict[str, Any]], None] | None = None  # (sent, reply) of each

    def __post_init__(self) -> None:
        if not self.video_timeout_s > 0:
            raise ClientError(f"--video-timeout must be > 0 s, got {self.video_timeout_s}")


class _Controls:
    """What the window's keys do: interrupt, cycle the emotion, quit."""

    def __init__(self, client: AvatarClient, stop: asyncio.Event, emotions: Sequence[str]) -> None:
        self._client = client
        self._stop = stop
        self._emotions = list(emotions) or ["neutral"]
        self.emotion = "neutral" if "neutral" in self._emotions else self._emotions[0]
        self._pending: set[asyncio.Task[None]] = set()

    def __call__(self, action: str) -> None:
        if action == "quit":
            self._stop.set()
        elif action == "interrupt":
            self._send({"interrupt": True})
        elif action == "emotion":
            index = (self._emotions.index(self.emotion) + 1) % len(self._emotions)
            self._send({"emotion": self._emotions[index]})

    def _send(self, values: dict[str, Any]) -> None:
        task = asyncio.create_task(self._control(values))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _control(self, values: dict[str, Any]) -> None:
        try:
            reply = await self._client.control(**values)
        except (asyncio.TimeoutError, ConnectionError) as exc:
            logger.warning("control %s: no answer (%s)", values, exc)
            return
        if reply.get("type") == "ack":
            self.emotion = str(reply.get("state", {}).get("emotion", self.emotion))
            logger.info("control %s: ok", values)
        else:
            logger.warning("control %s refused: %s", values, reply.get("message") or reply)


def _status(client: AvatarClient, window: WindowSink, controls: _Controls | None) -> str:
    """The window title's latency: the server's (audio in -> frame sent) plus the time frames wait here."""
    server_ms = client.report.last_stats.get("latency_ms")
    parts = []
    if isinstance(server_ms, int | float):
        parts.append(f"latency {server_ms + window.hold_ms():.0f} ms")
    else:
        parts.append(f"hold {window.hold_ms():.0f} ms")
    if controls is not None:
        parts.append(controls.emotion)
    return " | ".join(parts)


async def run_client(options: ClientOptions, stop: asyncio.Event | None = None) -> ClientReport:
    """Connect, stream, and return what was measured. Every output is closed on the way out."""
    url = check_url(options.url)
    ice = ice_servers(options.ice_servers, options.ice_username, options.ice_credential)
    stop = stop or asyncio.Event()
    closers: list[Callable[[], None]] = []
    runners: list[asyncio.Task[None]] = []
    if options.audio_file is not None:
        samples, rate = read_audio_file(options.audio_file)
        source: MediaStreamTrack = ArrayAudioTrack(samples, rate)
        duration = options.duration_s if options.duration_s is not None else samples.shape[0] / rate + 1.0
    else:
        source = MicrophoneTrack(options.mic_device)
        duration = options.duration_s if options.duration_s is not None else float("inf")
    clock = PlayoutClock() if options.audio_out is not None else None
    delay_s = (options.audio_delay_ms or 0.0) / 1000.0
    recorder = SessionRecorder(options.record_dir, options.fps_hint) if options.record_dir else None
    client = AvatarClient(url, source, options.token, ice=ice)
    window: WindowSink | None = None
    camera: VirtualCameraSink | None = None
    player: AudioOutSink | None = None
    report: ClientReport | None = None
    try:
        if options.show:
            window = WindowSink(clock=clock, lead_s=delay_s)
            closers.append(window.close)
            client.timed_video_sinks.append(window)
        if recorder is not None:
            client.timed_video_sinks.append(recorder.video)
            client.timed_audio_sinks.append(recorder.audio)
        try:
            try:
                info = await client.connect()
            except (OSError, HttpClientError, asyncio.TimeoutError) as exc:  # refused, DNS failure, no answer
                raise ClientError(f"cannot reach {url}: {exc or type(exc).__name__}") from exc
            if info.get("banner"):
                logger.warning("server: %s", info["banner"])
            if options.controls:
                runners.append(_watched(client, _send_controls(client, options), "client-controls"))
            fps = int(info.get("fps", options.fps_hint))
            if window is not None:
                controls = _Controls(client, stop, info.get("emotions") or [])
                shown = window
                window.bind(controls, lambda: _status(client, shown, controls))
                runners.append(_watched(client, window.run(stop), "client-window"))
            if options.virtual_camera:
                size = int(info.get("size", 512))
                camera = VirtualCameraSink(size, size, fps, clock, options.camera_device, on_error=client.fail)
                if options.audio_delay_ms is not None:
                    camera.queue.lead_s = delay_s
                closers.append(camera.close)
                client.timed_video_sinks.append(camera)
                runners.append(_watched(client, camera.run(stop), "client-camera"))
            if options.audio_out is not None:
                player = AudioOutSink(options.audio_out, clock)
                closers.append(player.close)
                client.timed_audio_sinks.append(player)
            started = time.monotonic()
            await _wait_any([stop, client.failed, client.first_video], options.video_timeout_s)
            if not client.first_video.is_set() and not stop.is_set() and client.error is None:
                raise ClientError(
                    f"no video from {url} within {options.video_timeout_s:g} s: the server accepted the call but "
                    "sent no frame (see its log; --video-timeout waits longer)"
                )
            await _wait_any([stop, client.failed], duration - (time.monotonic() - started))
            if client.error is not None:
                raise ClientError(f"output failed: {client.error}") from client.error
            report = client.finish_report()
        finally:
            for runner in runners:
                runner.cancel()
            await asyncio.gather(*runners, return_exceptions=True)
            await client.close()
    finally:
        source.stop()
        for close in reversed(closers):
            close()
        if report is None and recorder is not None:
            recorder.abort()
    report.outputs = _outputs(client, window, camera, player, recorder)
    if options.timeline_out is not None:
        _write_timeline(options.timeline_out, client, window, camera)
    if recorder is not None:
        (recorder.out_dir / "report.json").write_text(report.to_json())
        recorder.close()
    if report.av_sync.startswith("unreliable"):
        logger.warning("A/V offset estimate %+.0f ms is %s", report.av_offset_ms or 0.0, report.av_sync)
    return report


async def _send_controls(client: AvatarClient, options: ClientOptions) -> None:
    """Send each ``--control`` message in order once the data channel is open; every reply goes to the report
    (and to ``on_control_reply``), a refusal with the server's reason."""
    for values in options.controls:
        try:
            reply = await client.control(**values)
        except (asyncio.TimeoutError, ConnectionError) as exc:
            reply = {"type": "error", "message": f"no answer from the server ({exc or type(exc).__name__})"}
        entry = {"sent": dict(values), "reply": reply.get("type"), "message": reply.get("message")}
        client.report.controls.append({k: v for k, v in entry.items() if v is not None})
        if options.on_control_reply is not None:
            options.on_control_reply(dict(values), reply)
        elif reply.get("type") != "ack":
            logger.warning("control %s refused: %s", values, reply.get("message") or reply)


def _watched(client: AvatarClient, run: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    """An output's own loop (window, camera) as a task whose failure ends the run with its reason."""

    def done(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            client.fail(exc if isinstance(exc, Exception) else RuntimeError(str(exc)))

    task = asyncio.create_task(run, name=name)
    task.add_done_callback(done)
    return task


def _outputs(
    client: AvatarClient,
    window: WindowSink | None,
    camera: VirtualCameraSink | None,
    player: AudioOutSink | None,
    recorder: SessionRecorder | None,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if window is not None:
        out["window"] = {"driver": window.driver, "shown": len(window.shown), "fps": round(window.fps(), 2),
                         "hold_ms": round(window.hold_ms(), 1), "skipped": window.queue.skipped}  # fmt: skip
    if camera is not None:
        out["virtual_camera"] = {"device": camera.device, "sent": len(camera.sent), "fps": camera.fps}
    if player is not None:
        out["audio_out"] = {"device": player.device_name, "played_s": round(player.played / player.RATE, 2),
                            "late_s": round(player.late_samples / player.RATE, 3),
                            "device_delay_ms": round(player.device_delay_s * 1000.0, 1)}  # fmt: skip
    if recorder is not None:
        out["record"] = {"path": str(recorder.path), "frames": recorder.frames}
    return out


def _write_timeline(
    path: Path, client: AvatarClient, window: WindowSink | None, camera: VirtualCameraSink | None
) -> None:
    """When each frame arrived and when it was shown / sent, on this machine's monotonic clock (seconds)."""
    data: dict[str, Any] = {"received": [{"pts": p, "arrival": a} for p, a in client.video_timeline]}
    if window is not None:
        data["shown"] = [{"pts": s.pts_s, "at": s.at} for s in window.shown]
    if camera is not None:
        data["camera"] = [{"pts": s.pts_s, "at": s.at} for s in camera.sent]
    path.write_text(json.dumps(data))


async def _wait_any(events: list[asyncio.Event], timeout_s: float) -> None:
    if timeout_s <= 0:
        return
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        timeout = None if timeout_s == float("inf") else timeout_s
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
