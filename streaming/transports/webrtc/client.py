"""Python client: stream a microphone or a WAV file to an avatar server and receive the talking face.

The client is an aiortc peer that speaks the server's ``/offer`` JSON signalling. What it receives can be shown
in a window, sent to a virtual camera (OBS Virtual Camera / v4l2loopback), played on an audio device, recorded,
and measured: received fps and the offset between picture and sound as they arrive (``ClientReport``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import wave
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
from aiohttp import ClientSession, ClientTimeout
from aiortc import RTCDataChannel, RTCPeerConnection, RTCRtpReceiver, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

logger = logging.getLogger(__name__)

FRAME_S = 0.02  # 20 ms audio frames, the WebRTC norm
AIORTC_AUDIO_HOLD_S = 0.08  # aiortc's audio jitter buffer waits for 4 packets before it plays any
PORTAUDIO_HINT = (
    "install the client extras: pip install 'avatar-engine[client]' and the PortAudio library (libportaudio2)"
)


class ClientError(RuntimeError):
    """The client cannot run as asked (server refused, missing optional dependency, bad input file)."""


# --- audio sources ------------------------------------------------------------------------------------------


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """PCM16 WAV -> (float32 ``[n, channels]``, rate). Raises ClientError naming what is wrong."""
    try:
        with wave.open(str(path), "rb") as wav:
            if wav.getsampwidth() != 2:
                raise ClientError(f"{path}: only 16-bit PCM WAV is supported (got {8 * wav.getsampwidth()}-bit)")
            rate, channels = wav.getframerate(), wav.getnchannels()
            data = wav.readframes(wav.getnframes())
    except (OSError, EOFError, wave.Error) as exc:
        raise ClientError(f"cannot read WAV {path}: {exc}") from exc
    pcm = np.frombuffer(data, "<i2").reshape(-1, channels).astype(np.float32) / 32768.0
    return pcm, rate


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


class MicrophoneTrack(MediaStreamTrack):
    """The default (or named) input device through sounddevice, 48 kHz mono 20 ms frames."""

    kind = "audio"
    RATE = 48_000

    def __init__(self, device: str | int | None = None) -> None:
        super().__init__()
        sd = import_sounddevice()
        self._queue: asyncio.Queue[np.ndarray] = asyncio.Queue(maxsize=50)
        self._event_loop = asyncio.get_running_loop()
        self._pos = 0
        try:
            self._stream = sd.InputStream(
                samplerate=self.RATE,
                channels=1,
                dtype="int16",
                blocksize=int(self.RATE * FRAME_S),
                device=device,
                callback=self._callback,
            )
            self._stream.start()
        except Exception as exc:  # PortAudioError and friends
            raise ClientError(f"cannot open the microphone ({exc}); {PORTAUDIO_HINT}") from exc

    def _callback(self, data: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        block = data[:, 0].copy()
        self._event_loop.call_soon_threadsafe(self._offer, block)

    def _offer(self, block: np.ndarray) -> None:
        if self._queue.full():  # never let latency build up: drop the oldest block
            self._queue.get_nowait()
        self._queue.put_nowait(block)

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        block = await self._queue.get()
        frame = av.AudioFrame.from_ndarray(block[None, :], format="s16", layout="mono")
        frame.sample_rate = self.RATE
        frame.pts = self._pos
        frame.time_base = Fraction(1, self.RATE)
        self._pos += block.size
        return frame

    def stop(self) -> None:
        super().stop()
        with contextlib.suppress(Exception):
            self._stream.stop()
            self._stream.close()


def import_sounddevice() -> Any:
    try:
        import sounddevice
    except (ImportError, OSError) as exc:  # OSError: the module is there but PortAudio is not
        raise ClientError(f"sounddevice is unavailable ({exc}); {PORTAUDIO_HINT}") from exc
    return sounddevice


# --- measurements -------------------------------------------------------------------------------------------


@dataclass
class ClientReport:
    video_frames: int = 0
    first_video_s: float | None = None  # after the answer arrived
    video_fps: float = 0.0  # frames received per second, first to last
    video_size: tuple[int, int] | None = None
    audio_seconds: float = 0.0
    av_offset_ms: float | None = None  # > 0: the picture arrives later than the sound that belongs to it
    av_correlation: float | None = None  # peak normalised correlation behind av_offset_ms (low = unreliable)
    controls_acked: int = 0
    controls_failed: int = 0
    server: dict[str, Any] = field(default_factory=dict)
    last_stats: dict[str, Any] = field(default_factory=dict)

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


# --- the client ---------------------------------------------------------------------------------------------

VideoSink = Callable[[np.ndarray], None]
AudioSink = Callable[[np.ndarray, int], None]


class AvatarClient:
    """One connection to ``url`` (the server root). Use ``async with``, or ``connect()`` / ``close()``."""

    def __init__(
        self,
        url: str,
        audio: MediaStreamTrack | None,
        token: str | None = None,
        video_sinks: list[VideoSink] | None = None,
        audio_sinks: list[AudioSink] | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.audio = audio
        self.video_sinks = list(video_sinks or [])
        self.audio_sinks = list(audio_sinks or [])
        self.report = ClientReport()
        self.session_id: str | None = None
        self.pc = RTCPeerConnection()
        self.channel: RTCDataChannel = self.pc.createDataChannel("control")
        self._replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._t_answer = 0.0
        self._video_t: list[float] = []
        self._video_act: list[float] = []
        self._audio_t: list[float] = []
        self._audio_env: list[float] = []
        self._channel_open = asyncio.Event()
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
        try:
            data = json.loads(message)
        except ValueError:
            logger.warning("server sent a non-JSON message")
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
                small = rgb[::8, ::8].astype(np.float32)
                self._video_t.append(now)
                self._video_act.append(0.0 if prev is None else float(np.abs(small - prev).mean()))
                prev = small
                if self.report.first_video_s is None:
                    self.report.first_video_s = now - self._t_answer
                self.report.video_frames += 1
                self.report.video_size = (rgb.shape[1], rgb.shape[0])
                self._feed(self.video_sinks, rgb)

    async def _read_audio(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                now = time.monotonic()
                if not isinstance(frame, av.AudioFrame):
                    continue
                pcm = frame.to_ndarray().reshape(-1, len(frame.layout.channels))  # s16 packed from Opus
                self.report.audio_seconds += pcm.shape[0] / frame.sample_rate
                self._audio_t.append(now)
                self._audio_env.append(float(np.sqrt(np.mean((pcm.astype(np.float32) / 32768.0) ** 2))))
                self._feed(self.audio_sinks, pcm, frame.sample_rate)

    def _feed(self, sinks: list[Any], *args: Any) -> None:
        for sink in sinks:
            try:
                sink(*args)
            except Exception as exc:  # a broken sink ends the run with its reason instead of dying silently
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
        found = estimate_av_offset(vt, np.asarray(self._video_act), np.asarray(self._audio_t), env)
        if found is not None:
            self.report.av_offset_ms = round(found[0] * 1000.0, 1)
            self.report.av_correlation = round(found[1], 3)
        return self.report

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.pc.close()
        if self.audio is not None:
            self.audio.stop()


# --- sinks: window, virtual camera, audio device, recording -----------------------------------------------


class WindowSink:
    """``--show``: an OpenCV window (needs an OpenCV build with a GUI)."""

    TITLE = "avatar"

    def __init__(self) -> None:
        import cv2

        self._cv2 = cv2
        try:
            cv2.namedWindow(self.TITLE, cv2.WINDOW_AUTOSIZE)
        except cv2.error as exc:
            raise ClientError(
                "--show needs OpenCV with a GUI (pip install opencv-python instead of opencv-python-headless) "
                "and a display; use --record OUT_DIR or --virtual-camera instead"
            ) from exc

    def __call__(self, rgb: np.ndarray) -> None:
        self._cv2.imshow(self.TITLE, rgb[..., ::-1])
        self._cv2.waitKey(1)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._cv2.destroyWindow(self.TITLE)


VIRTUAL_CAMERA_HINT = (
    "install pyvirtualcam (pip install 'avatar-engine[client]') and a virtual camera device: OBS Virtual Camera "
    "on Windows/macOS (install OBS and start its virtual camera once), v4l2loopback on Linux "
    "(sudo apt-get install v4l2loopback-dkms && sudo modprobe v4l2loopback devices=1 exclusive_caps=1)"
)


class VirtualCameraSink:
    """``--virtual-camera``: frames go to a pyvirtualcam device of the stream's size."""

    def __init__(self, width: int, height: int, fps: float) -> None:
        try:
            import pyvirtualcam
        except ImportError as exc:
            raise ClientError(f"--virtual-camera: pyvirtualcam is not installed; {VIRTUAL_CAMERA_HINT}") from exc
        self._fps = fps
        try:
            self._camera = pyvirtualcam.Camera(width=width, height=height, fps=fps)
        except Exception as exc:  # no backend / device: pyvirtualcam raises RuntimeError
            raise ClientError(f"--virtual-camera: no virtual camera ({exc}); {VIRTUAL_CAMERA_HINT}") from exc
        logger.info("virtual camera: %s", self._camera.device)

    def __call__(self, rgb: np.ndarray) -> None:
        self._camera.send(rgb)

    @property
    def frame_delay_s(self) -> float:
        """The camera shows a frame one period after it is sent; the audio is held back by as much."""
        return 1.0 / self._fps

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._camera.close()


class AudioOutSink:
    """``--audio-out DEVICE``: plays the returned audio, held back by ``delay_s`` to match the picture."""

    RATE = 48_000

    def __init__(self, device: str | int | None, delay_s: float) -> None:
        sd = import_sounddevice()
        self._lock = threading.Lock()
        self._buffer = np.zeros((int(delay_s * self.RATE), 2), np.int16)  # the delay is pre-queued silence
        try:
            self._stream = sd.OutputStream(
                samplerate=self.RATE, channels=2, dtype="int16", device=device, callback=self._callback
            )
            self._stream.start()
        except Exception as exc:
            raise ClientError(f"--audio-out {device!r}: cannot open the device ({exc}); {PORTAUDIO_HINT}") from exc

    def __call__(self, pcm: np.ndarray, rate: int) -> None:
        if rate != self.RATE:
            logger.warning("unexpected output rate %d Hz", rate)
            return
        stereo = pcm if pcm.shape[1] == 2 else np.repeat(pcm[:, :1], 2, axis=1)
        with self._lock:
            self._buffer = np.concatenate([self._buffer, stereo.astype(np.int16)])[-self.RATE * 2 :]

    def _callback(self, out: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        with self._lock:
            n = min(frames, self._buffer.shape[0])
            out[:n] = self._buffer[:n]
            out[n:] = 0
            self._buffer = self._buffer[n:]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._stream.stop()
            self._stream.close()


class Recorder:
    """``--record OUT_DIR``: ``video.mp4`` (frames in arrival order at the stream's fps) and ``audio.wav``."""

    def __init__(self, out_dir: Path, fps: int) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir = out_dir
        self._fps = fps
        self._container: Any = None
        self._stream: Any = None
        self._wav: wave.Wave_write | None = None

    def video(self, rgb: np.ndarray) -> None:
        if self._container is None:
            self._container = av.open(str(self.out_dir / "video.mp4"), "w")
            codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
            self._stream = self._container.add_stream(codec, rate=self._fps)
            self._stream.width, self._stream.height = rgb.shape[1], rgb.shape[0]
            self._stream.pix_fmt = "yuv420p"
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def audio(self, pcm: np.ndarray, rate: int) -> None:
        if self._wav is None:
            self._wav = wave.open(str(self.out_dir / "audio.wav"), "wb")  # noqa: SIM115 - written frame by frame
            self._wav.setnchannels(pcm.shape[1])
            self._wav.setsampwidth(2)
            self._wav.setframerate(rate)
        self._wav.writeframes(pcm.astype("<i2").tobytes())

    def close(self, report: ClientReport) -> None:
        if self._container is not None:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
            self._container.close()
        if self._wav is not None:
            self._wav.close()
        (self.out_dir / "report.json").write_text(report.to_json())


@dataclass(frozen=True)
class ClientOptions:
    url: str
    token: str | None = None
    wav: Path | None = None  # None: the microphone
    mic_device: str | int | None = None
    show: bool = False
    virtual_camera: bool = False
    audio_out: str | int | None = None
    audio_delay_ms: float | None = None  # None: what the camera adds beyond aiortc's own audio hold (see below)
    duration_s: float | None = None  # None: the WAV's length plus one second, or until interrupted (mic)
    record_dir: Path | None = None
    fps_hint: int = 25


async def run_client(options: ClientOptions, stop: asyncio.Event | None = None) -> ClientReport:
    """Connect, stream, and return what was measured. Every sink is closed on the way out."""
    closers: list[Callable[[], None]] = []
    if options.wav is not None:
        samples, rate = read_wav(options.wav)
        source: MediaStreamTrack = ArrayAudioTrack(samples, rate)
        duration = options.duration_s if options.duration_s is not None else samples.shape[0] / rate + 1.0
    else:
        source = MicrophoneTrack(options.mic_device)
        duration = options.duration_s if options.duration_s is not None else float("inf")
    video_sinks: list[VideoSink] = []
    audio_sinks: list[AudioSink] = []
    recorder = Recorder(options.record_dir, options.fps_hint) if options.record_dir else None
    try:
        if options.show:
            window = WindowSink()
            video_sinks.append(window)
            closers.append(window.close)
        if recorder is not None:
            video_sinks.append(recorder.video)
            audio_sinks.append(recorder.audio)
        client = AvatarClient(options.url, source, options.token, video_sinks, audio_sinks)
        try:
            info = await client.connect()
            if info.get("banner"):
                logger.warning("server: %s", info["banner"])
            fps = int(info.get("fps", options.fps_hint))
            camera_delay = 0.0
            if options.virtual_camera:
                size = int(info.get("size", 512))
                camera = VirtualCameraSink(size, size, fps)
                closers.append(camera.close)
                client.video_sinks.append(camera)
                camera_delay = camera.frame_delay_s
            if options.audio_out is not None:
                # aiortc already holds received audio AIORTC_AUDIO_HOLD_S before playing it (measured: the sound
                # arrives ~70-80 ms after its picture); only a slower camera path needs more
                auto = max(0.0, camera_delay - AIORTC_AUDIO_HOLD_S)
                delay = options.audio_delay_ms / 1000.0 if options.audio_delay_ms is not None else auto
                player = AudioOutSink(options.audio_out, delay)
                closers.append(player.close)
                client.audio_sinks.append(player)
            await _wait_any([stop or asyncio.Event(), client.failed], duration)
            if client.error is not None:
                raise ClientError(f"output failed: {client.error}") from client.error
            report = client.finish_report()
        finally:
            await client.close()
    finally:
        source.stop()
        for close in reversed(closers):
            close()
    if recorder is not None:
        recorder.close(report)
    return report


async def _wait_any(events: list[asyncio.Event], timeout_s: float) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        timeout = None if timeout_s == float("inf") else timeout_s
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
