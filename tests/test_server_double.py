"""A deterministic LiveSession test double for the transport tests, and checks that it honours the protocol.

Video frames are solid colours: green encodes ``frame_index % 16`` and red is full when the output audio of
that frame is loud, so a receiver can count frames and see whether picture and sound line up. Output audio is
the input echoed on the output clock ``DELAY_S`` later (what the real session does after its pipeline).
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import numpy as np
import pytest
import soxr

from streaming.api import ControlError, LiveSession
from streaming.frames import SAMPLE_RATE, OutputAudio, VideoFrame

DELAY_S = 0.2
EMOTIONS = {"neutral", "happy", "sad", "angry", "surprised"}
POSE_MODES = {"still", "natural"}
LOUD_RMS = 0.05


class FakeSession:
    def __init__(self, session_id: str, fps: int = 25, size: int = 64, untrained: bool = False) -> None:
        self.id = session_id
        self.fps = fps
        self.size = size
        self.untrained = untrained
        self.closed = False
        self.pushed_samples = 0
        self.interrupts = 0
        self.state: dict[str, Any] = {"emotion": "neutral", "intensity": 0.5, "lip_scale": 1.0, "pose_mode": "natural"}
        self._t0 = time.monotonic()
        self._input = np.zeros(0, np.float32)  # input audio on the output clock, before the delay
        self._input_start: int | None = None
        self._frame = 0
        self._audio_pos = 0
        self._ended = False

    # -- input ----------------------------------------------------------------------------------------------
    def push_audio(self, pcm: np.ndarray, sample_rate: int) -> None:
        if pcm.ndim not in (1, 2) or pcm.dtype not in (np.int16, np.float32) or sample_rate <= 0:
            raise ValueError(f"bad audio: shape {pcm.shape}, dtype {pcm.dtype}, rate {sample_rate}")
        x = pcm.astype(np.float32) / (32768.0 if pcm.dtype == np.int16 else 1.0)
        if x.ndim == 2:
            x = x.mean(axis=1)
        if sample_rate != SAMPLE_RATE:
            x = soxr.resample(x, sample_rate, SAMPLE_RATE).astype(np.float32)
        if self._input_start is None:
            self._input_start = int((time.monotonic() - self._t0) * SAMPLE_RATE)
        self._input = np.concatenate([self._input, x])
        self.pushed_samples += x.size

    def control(self, message: dict[str, Any]) -> dict[str, Any]:
        for key, value in message.items():
            if key == "emotion":
                if value not in EMOTIONS:
                    raise ControlError(f"unknown emotion {value!r}")
            elif key in ("intensity", "lip_scale"):
                hi = 1.0 if key == "intensity" else 3.0
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= hi:
                    raise ControlError(f"{key} must be a number in [0, {hi}], got {value!r}")
            elif key == "pose_mode":
                if value not in POSE_MODES:
                    raise ControlError(f"unknown pose_mode {value!r}")
            else:
                raise ControlError(f"unknown control key {key!r}")
        self.state.update(message)
        return dict(self.state)

    def interrupt(self) -> None:
        self.interrupts += 1
        self._input = np.zeros(0, np.float32)
        self._input_start = None

    def end_of_stream(self) -> None:
        self._ended = True

    # -- output ---------------------------------------------------------------------------------------------
    def _output(self, start: int, n: int) -> np.ndarray:
        out = np.zeros(n, np.float32)
        if self._input_start is None:
            return out
        lo = start - int(DELAY_S * SAMPLE_RATE) - self._input_start
        a, b = max(lo, 0), min(lo + n, self._input.size)
        if b > a:
            out[a - lo : b - lo] = self._input[a:b]
        return out

    async def _wait(self, pts: float) -> None:
        delay = self._t0 + pts - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    async def next_video(self) -> VideoFrame | None:
        if self.closed or self._ended:
            return None
        n = self._frame
        self._frame += 1
        await self._wait(n / self.fps)  # real time, like the real session: it never runs ahead
        per_frame = SAMPLE_RATE // self.fps
        audio = self._output(n * per_frame, per_frame)
        loud = float(np.sqrt(np.mean(audio**2))) > LOUD_RMS
        rgb = np.empty((self.size, self.size, 3), np.uint8)
        rgb[..., 0] = 255 if loud else 0
        rgb[..., 1] = (n % 16) * 16 + 8
        rgb[..., 2] = 128
        return VideoFrame(frame_index=n, fps=self.fps, rgb=rgb, created=time.monotonic())

    async def next_audio(self) -> OutputAudio | None:
        if self.closed or self._ended:
            return None
        block = SAMPLE_RATE // 50
        start = self._audio_pos
        self._audio_pos += block
        await self._wait((start + block) / SAMPLE_RATE - DELAY_S / 2)
        return OutputAudio(samples=self._output(start, block), start=start)

    def metrics(self) -> dict[str, float]:
        return {"latency_ms": DELAY_S * 1000.0, "frames": float(self._frame)}

    async def close(self) -> None:
        self.closed = True


class FakeFactory:
    """SessionFactory double: counts sessions, remembers them so tests can see they were closed."""

    def __init__(self, mode: str = "classic", untrained: bool = False, fps: int = 25, size: int = 64) -> None:
        self.mode = mode
        self.untrained = untrained
        self.fps = fps
        self.size = size
        self.sessions: list[FakeSession] = []
        self.closed = False

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "untrained": self.untrained, "avatar": "test", "fps": self.fps, "size": self.size}

    async def open_session(self) -> LiveSession:
        session = FakeSession(f"s{len(self.sessions)}", fps=self.fps, size=self.size, untrained=self.untrained)
        self.sessions.append(session)
        return session

    async def close(self) -> None:
        self.closed = True


def burst_signal(seconds: float, rate: int = 48_000) -> np.ndarray:
    """Irregular bursts of a 220 Hz tone (float32 mono): loud/quiet edges make A/V offsets measurable."""
    t = np.arange(int(seconds * rate)) / rate
    gate = np.zeros_like(t)
    pos, k = 0.3, 0
    while pos < seconds:
        on = 0.25 + 0.1 * (k % 3)
        gate[(t >= pos) & (t < pos + on)] = 1.0
        pos += on + 0.3 + 0.15 * ((k * 7) % 4)
        k += 1
    return (0.5 * gate * np.sin(2 * math.pi * 220 * t)).astype(np.float32)


# --- the double itself ------------------------------------------------------------------------------------


async def test_double_echoes_audio_after_delay() -> None:
    session = FakeSession("x", fps=50)
    session.push_audio(np.full(1600, 0.5, np.float32), SAMPLE_RATE)
    chunks = [await session.next_audio() for _ in range(20)]  # 400 ms
    audio = np.concatenate([c.samples for c in chunks if c is not None])
    nonzero = np.flatnonzero(audio)
    assert nonzero.size == 1600
    assert abs(nonzero[0] - (session._input_start or 0) - DELAY_S * SAMPLE_RATE) <= 1
    await session.close()
    assert await session.next_video() is None


def test_double_rejects_bad_controls() -> None:
    session = FakeSession("x")
    assert session.control({"emotion": "happy"})["emotion"] == "happy"
    for bad in ({"emotion": "bored"}, {"intensity": 2.0}, {"intensity": float("nan")}, {"volume": 1}):
        with pytest.raises(ControlError):
            session.control(bad)
