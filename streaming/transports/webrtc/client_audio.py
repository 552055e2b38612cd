"""The client's sound devices through sounddevice / PortAudio: the microphone it streams, the speaker it plays the
avatar on, and the list of devices a user picks from (``engine client --list-devices``)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from fractions import Fraction
from typing import Any

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from streaming.transports.webrtc.playout import ClientError, PlayoutClock

FRAME_S = 0.02  # 20 ms audio frames, the WebRTC norm
PORTAUDIO_HINT = (
    "install the client extras: pip install 'avatar-engine[client]' and the PortAudio library (libportaudio2)"
)
LIST_HINT = "'engine client --list-devices' lists them"


def import_sounddevice() -> Any:
    try:
        import sounddevice
    except (ImportError, OSError) as exc:  # OSError: the module is there but PortAudio is not
        raise ClientError(f"sounddevice is unavailable ({exc}); {PORTAUDIO_HINT}") from exc
    return sounddevice


def list_devices() -> str:
    """One line per PortAudio device: index, name, host API, input/output channels, the defaults marked."""
    sd = import_sounddevice()
    devices = sd.query_devices()
    apis = sd.query_hostapis()
    default_in, default_out = sd.default.device
    if not len(devices):
        return "no audio devices found (PortAudio sees none; is a sound server such as PulseAudio running?)"
    lines = []
    for dev in devices:
        marks = ("<" if dev["index"] == default_in else " ") + (">" if dev["index"] == default_out else " ")
        api = apis[dev["hostapi"]]["name"]
        lines.append(
            f"{marks} {dev['index']:3d}  {dev['name']} ({api}): {dev['max_input_channels']} in, "
            f"{dev['max_output_channels']} out, {dev['default_samplerate']:.0f} Hz"
        )
    lines.append("< default input, > default output; pass the index or (part of) the name to --mic-device/--audio-out")
    return "\n".join(lines)


def _find_device(sd: Any, device: str | int | None, kind: str) -> dict[str, Any]:
    """The device ``device`` names (None: the default) that has ``kind`` ("input"/"output") channels."""
    flag = "--mic-device" if kind == "input" else "--audio-out"
    try:
        found = sd.query_devices(device, kind=kind)
    except (ValueError, sd.PortAudioError) as exc:
        available = [d["name"] for d in sd.query_devices() if d[f"max_{kind}_channels"] > 0]
        if device is None:
            what = f"no audio {kind} device" + (" is the default" if available else " exists")
        else:
            what = f"{flag} {device!r}: no {kind} device matches ({exc})"
        listing = f"available {kind}s: {', '.join(available)}" if available else f"PortAudio found no {kind}s"
        hint = "connect one (or start PulseAudio / PipeWire)" if not available else LIST_HINT
        raise ClientError(f"{what}; {listing}; {hint}") from exc
    assert isinstance(found, dict)
    return found


class MicrophoneTrack(MediaStreamTrack):
    """The default (or named) input device through sounddevice, mono 20 ms frames at the device's own rate."""

    kind = "audio"

    def __init__(self, device: str | int | None = None) -> None:
        super().__init__()
        sd = import_sounddevice()
        info = _find_device(sd, device, "input")
        self.device_name = str(info["name"])
        self.rate = int(info["default_samplerate"]) or 48_000
        self._queue: asyncio.Queue[np.ndarray] = asyncio.Queue(maxsize=50)
        self._event_loop = asyncio.get_running_loop()
        self._pos = 0
        try:
            self._stream = sd.InputStream(
                samplerate=self.rate,
                channels=1,
                dtype="int16",
                blocksize=int(self.rate * FRAME_S),
                device=info["index"],
                callback=self._callback,
            )
            self._stream.start()
        except Exception as exc:  # PortAudioError and friends
            raise ClientError(f"cannot open the microphone {self.device_name!r} ({exc}); {LIST_HINT}") from exc

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
        frame.sample_rate = self.rate
        frame.pts = self._pos
        frame.time_base = Fraction(1, self.rate)
        self._pos += block.size
        return frame

    def stop(self) -> None:
        super().stop()
        with contextlib.suppress(Exception):
            self._stream.stop()
            self._stream.close()


class AudioOutSink:
    """``--audio-out DEVICE``: plays the avatar's audio, each sample at the slot its pts gives it.

    Playback runs on the device's clock: sample ``pts`` is played ``PREBUFFER_S`` after the first received
    audio's pts, plus the device latency. Each callback tells ``clock`` when the sample it writes will be heard
    (PortAudio's DAC time), so the pictures can be shown with their sound. Audio that arrives after its slot
    was played is dropped, and the slots are re-anchored so the sound catches up instead of staying silent.
    """

    RATE = 48_000
    PREBUFFER_S = 0.06  # network jitter the sound may absorb before a late packet becomes a gap
    MAX_AHEAD_S = 0.5  # audio buffered further ahead than this means the device runs slow: skip ahead

    def __init__(self, device: str | int | None, clock: PlayoutClock | None = None) -> None:
        sd = import_sounddevice()
        info = _find_device(sd, device, "output")
        self.device_name = str(info["name"])
        self._clock = clock
        self._lock = threading.Lock()
        self._chunks: deque[tuple[int, np.ndarray]] = deque()  # (first sample's pts in samples, [n, 2] int16)
        self._pos: int | None = None  # the next sample to play, in pts samples; None: (re-)anchor on the next data
        self.played = 0  # samples written to the device that carried received audio
        self.device_delay_s = 0.0  # last reported: a sample written now is heard this much later
        self.late_samples = 0
        try:
            self._stream = sd.OutputStream(
                samplerate=self.RATE,
                channels=2,
                dtype="int16",
                device=info["index"],
                callback=self._callback,
                # the picture waits for the sound, so every ms of device buffer is a ms of delay; 30 ms still rides
                # out a busy CPU without underruns (PortAudio's "high" default is ~100 ms through ALSA-pulse)
                latency=0.03,
            )
            self._stream.start()
        except Exception as exc:
            raise ClientError(f"--audio-out {self.device_name!r}: cannot open the device ({exc}); {LIST_HINT}") from exc

    def __call__(self, pcm: np.ndarray, rate: int, pts_s: float) -> None:
        if rate != self.RATE:
            raise ClientError(f"--audio-out: the server sent {rate} Hz audio, expected {self.RATE} Hz (Opus)")
        stereo = pcm if pcm.shape[1] == 2 else np.repeat(pcm[:, :1], 2, axis=1)
        start = round(pts_s * self.RATE)
        with self._lock:
            if self._pos is not None and start + stereo.shape[0] <= self._pos:
                self.late_samples += stereo.shape[0]
                self._pos = None  # the sound fell behind its slots: start again from what arrives now
                self._chunks.clear()
            self._chunks.append((start, stereo.astype(np.int16)))

    def _callback(self, out: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        now = time.monotonic()
        out[:] = 0
        with self._lock:
            if self._pos is None:
                if not self._chunks:
                    return
                self._pos = self._chunks[0][0] - round(self.PREBUFFER_S * self.RATE)
            last_end = self._chunks[-1][0] + self._chunks[-1][1].shape[0] if self._chunks else self._pos
            if last_end - self._pos > (self.MAX_AHEAD_S + self.PREBUFFER_S) * self.RATE:
                self._pos = last_end - round(self.PREBUFFER_S * self.RATE)
            start, end = self._pos, self._pos + frames
            for first, chunk in self._chunks:
                lo, hi = max(start, first), min(end, first + chunk.shape[0])
                if hi > lo:
                    out[lo - start : hi - start] = chunk[lo - first : hi - first]
                    self.played += hi - lo
            while self._chunks and self._chunks[0][0] + self._chunks[0][1].shape[0] <= end:
                self._chunks.popleft()
            self._pos = end
        if self._clock is not None:
            # the DAC time is on PortAudio's stream clock: only its distance from "now" carries over
            delay = max(0.0, float(time_info.outputBufferDacTime - time_info.currentTime))
            if not 0.0 < delay < 2.0:  # a host API that reports no DAC time: fall back on the stream's latency
                delay = float(self._stream.latency)
            self.device_delay_s = delay
            self._clock.update(start / self.RATE, now + delay)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._stream.stop()
            self._stream.close()
