"""Shared by the agent-framework tests: a live session and a runtime on the shipped cheap stages (8-pixel pattern
renderer, RMS features, mouth motion), real time, so adapters run against the real session in milliseconds."""

from __future__ import annotations

import contextlib
import gc
import io
import shutil
import subprocess
import time
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from engine.audio.pcm import SAMPLE_RATE
from engine.avatar.record import Avatar
from engine.render.base import PreparedAvatar
from streaming.batching import BatchConfig, BatchRenderer
from streaming.clock import MonotonicClock
from streaming.pipelines import Pipeline, RuntimeConfig
from streaming.runtime import Runtime
from streaming.session import Session, SessionConfig
from streaming.testing import MouthMotion, PatternRenderer, RmsFeatures, tiny_avatar

FPS = 25


@contextlib.contextmanager
def quiet_gc() -> Iterator[None]:
    """For real-time tests: what the imports allocated (torch, pipecat, livekit: millions of objects) is moved out
    of the collector's reach, so a full collection cannot stop the event loop for most of a second mid-test
    (0.72 s was measured on a loaded machine)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def pattern_session(**cfg: object) -> Session:
    """A real live session on the pattern renderer (call inside a running loop; close it)."""
    renderer = PatternRenderer(size=8)
    worker = BatchRenderer(renderer, MonotonicClock(), BatchConfig(threaded=False))
    return Session(
        features=RmsFeatures(FPS),
        motion=MouthMotion(lookahead_frames=2),
        renderer=renderer,
        prepared=renderer.prepare(tiny_avatar()),
        worker=worker,
        config=SessionConfig(**{"offload": False, **cfg}),
    )


def _stages(prepared: PreparedAvatar) -> tuple[RmsFeatures, MouthMotion]:
    return RmsFeatures(FPS), MouthMotion(lookahead_frames=2)


def pattern_runtime() -> Runtime:
    """A runtime whose sessions run the pattern stages (its ``renderer.size`` is 8)."""
    renderer = PatternRenderer(size=8)
    pipeline = Pipeline(
        RuntimeConfig(mode="classic", batch=BatchConfig(threaded=False)),
        "pattern",
        "mouth",
        renderer,
        _stages,
        MappingProxyType(dict(MouthMotion.CONTROLS)),
        False,
    )
    return Runtime(pipeline)


def avatar() -> Avatar:
    return tiny_avatar()


def voice(seconds: float, rate: int = 24_000, seed: int = 0) -> np.ndarray:
    """Int16 "speech": noise under a 3 Hz syllable envelope, never exactly zero (so every sample is speech)."""
    rng = np.random.default_rng(seed)
    n = round(seconds * rate)
    t = np.arange(n) / rate
    env = 0.55 + 0.45 * np.sin(2 * np.pi * 3.0 * t)
    x = 0.4 * env * rng.standard_normal(n)
    pcm = (np.clip(x, -1, 1) * 32000).astype(np.int16)
    pcm[pcm == 0] = 1
    return pcm


@dataclass
class Stamped:
    t: float
    item: object


def now() -> float:
    return time.monotonic()


def samples_16k(n: int, rate: int) -> int:
    return n * SAMPLE_RATE // rate


def espeak(text: str) -> tuple[np.ndarray, int]:
    """Real speech from Debian's espeak-ng (int16 mono, its own rate); :func:`voice` stands in without it."""
    if shutil.which("espeak-ng") is None:
        return voice(3.0, 22_050), 22_050
    wav = subprocess.run(["espeak-ng", "--stdout", text], check=True, capture_output=True).stdout
    with wave.open(io.BytesIO(wav)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), np.int16).copy(), w.getframerate()
