"""Offline rendering: an audio file through the same session pipeline as live, as fast as it goes, into an mp4.

The session runs with ``realtime=False``: frames are committed as soon as their audio is complete, no frame is
dropped and nothing waits for the wall clock. The video has exactly ``ceil(duration * fps)`` frames and the
audio track is the input audio, frame-aligned.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from engine.avatar.record import Avatar
from streaming.clock import frame_count
from streaming.frames import SAMPLE_RATE
from streaming.runtime import Runtime
from streaming.video_io import Mp4Writer

PUSH_SECONDS = 1.0  # audio handed to the session per step (keeps memory flat for long files)


@dataclass(frozen=True)
class RenderResult:
    out: Path
    frames: int
    fps: int
    duration_s: float
    untrained: bool
    metrics: dict[str, float]


async def render_to_file(
    runtime: Runtime,
    audio: np.ndarray,
    out: str | Path,
    *,
    avatar: str | Avatar | None = None,
    controls: dict[str, Any] | None = None,
    fps: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> RenderResult:
    """Render ``audio`` (float32 mono 16 kHz) with ``avatar`` to ``out`` (H.264 + AAC mp4, written atomically).

    ``progress(n)`` is called with the number of frames written since the last call.
    """
    audio = np.asarray(audio, np.float32).reshape(-1)
    if audio.size == 0:
        raise ValueError("the audio is empty")
    cfg = replace(runtime.config.session, realtime=False, fps=fps or runtime.config.session.fps)
    total = frame_count(audio.size, cfg.fps)
    session = await runtime.open_session(avatar, config=cfg, controls=controls)
    try:
        with Mp4Writer(out, cfg.fps, session.size) as writer:

            async def feed() -> None:
                step = int(PUSH_SECONDS * SAMPLE_RATE)
                for i in range(0, audio.size, step):
                    session.push_audio(audio[i : i + step], SAMPLE_RATE)
                    # let the pipeline work between pushes; pushing is cheap, the queues bound the rest
                    while session.metrics()["buffered_s"] > 2 * PUSH_SECONDS:
                        await asyncio.sleep(0.005)
                session.end_of_stream()

            async def video() -> None:
                last: np.ndarray | None = None
                n = 0
                while (frame := await session.next_video()) is not None:
                    # offline drops nothing; should a frame ever be missing, hold the previous one
                    while n < frame.frame_index and last is not None:
                        writer.video(last, n)
                        n += 1
                    writer.video(frame.rgb, frame.frame_index)
                    last = frame.rgb
                    n = frame.frame_index + 1
                    if progress is not None:
                        progress(1)
                if last is None:
                    raise RuntimeError("the session produced no video")
                while n < total:
                    writer.video(last, n)
                    n += 1

            async def sound() -> None:
                while (chunk := await session.next_audio()) is not None:
                    writer.audio(chunk.samples)

            await run_all(feed(), video(), sound())
            if session.error is not None:
                raise RuntimeError(f"rendering failed: {session.error!r}") from session.error
            frames = writer.frames
        metrics = session.metrics()
    finally:
        await runtime.close_session(session)
    return RenderResult(Path(out), frames, cfg.fps, audio.size / SAMPLE_RATE, runtime.untrained, metrics)


async def run_all(*coros: Any) -> None:
    """Run ``coros`` together; the first failure cancels the others (nothing is left running) and is raised."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            exc = t.exception()
            if exc is not None:
                raise exc
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
