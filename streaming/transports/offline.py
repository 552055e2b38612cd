"""Offline rendering: an audio file through the same session pipeline as live, as fast as it goes, into a video.

The session runs with ``realtime=False``: frames are committed as soon as their audio is complete, no frame is
dropped and nothing waits for the wall clock. The video has exactly ``ceil(duration * fps)`` frames and the
audio track is the input audio, frame-aligned, at the input's own rate and channels. A file is read, rendered
and encoded a second at a time, so memory does not grow with the length of the input.

With ``paste_back`` (the default, like LivePortrait's ``flag_pasteback``) each rendered face crop is blended
back into the avatar's original photo and the video has the photo's size (an odd side gets one replicated
column / row, see :class:`~engine.media.VideoWriter`). When the crop already is the whole photo (the
default avatar) there is nothing to paste into and the frames are written as rendered.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from engine.audio.pcm import SAMPLE_RATE
from engine.avatar.pasteback import PasteBack
from engine.avatar.record import Avatar
from engine.media import AudioFile, VideoWriter
from streaming.runtime import Runtime

PUSH_SECONDS = 1.0  # audio handed to the session per step (keeps memory flat for long files)


@dataclass(frozen=True)
class RenderResult:
    out: Path
    frames: int
    fps: int
    duration_s: float
    untrained: bool
    metrics: dict[str, float]
    size: tuple[int, int] = (0, 0)  # (width, height) of the encoded video
    pasted: bool = False  # the frames were pasted back into the avatar's photo


async def render_to_file(
    runtime: Runtime,
    audio: np.ndarray | AudioFile,
    out: str | Path,
    *,
    avatar: str | Avatar | None = None,
    controls: dict[str, Any] | None = None,
    fps: int | None = None,
    progress: Callable[[int], None] | None = None,
    paste_back: bool = True,
) -> RenderResult:
    """Render ``audio`` with ``avatar`` to ``out`` (H.264 + AAC, written atomically): an :class:`AudioFile`
    (streamed, its audio track kept at its own rate) or float32 mono 16 kHz samples.

    ``progress(n)`` is called with the number of frames written since the last call. ``paste_back``: blend each
    face crop into the avatar's original photo (the video gets the photo's size); False writes the crops.
    """
    source = audio if isinstance(audio, AudioFile) else None
    samples = np.zeros(0, np.float32) if source is not None else np.asarray(audio, np.float32).reshape(-1)
    if source is None and samples.size == 0:
        raise ValueError("the audio is empty")
    cfg = replace(runtime.config.session, realtime=False, fps=fps or runtime.config.session.fps)
    duration_s = source.duration_s if source is not None else samples.size / SAMPLE_RATE
    record = avatar if isinstance(avatar, Avatar) else runtime.load_avatar(avatar)
    session = await runtime.open_session(record, config=cfg, controls=controls)
    try:
        # the mask, warp and photo background are prepared once; each frame then warps only the face region
        paster = PasteBack(record, session.size) if paste_back and not crop_is_photo(record) else None
        canvas = paster.image.copy() if paster is not None else None
        size = (canvas.shape[1], canvas.shape[0]) if canvas is not None else (session.size, session.size)
        rate, channels = (source.rate, source.channels) if source is not None else (SAMPLE_RATE, 1)
        with VideoWriter(out, cfg.fps, size, audio_rate=rate, audio_channels=channels) as writer:

            async def push(chunk: np.ndarray, chunk_rate: int) -> None:
                session.push_audio(chunk, chunk_rate)
                # let the pipeline work between pushes; pushing is cheap, the queues bound the rest
                while session.metrics()["buffered_s"] > 2 * PUSH_SECONDS:
                    await asyncio.sleep(0.005)

            async def feed() -> None:
                if source is not None:
                    for chunk in source:  # the file's own samples go to the video as they are
                        writer.audio(chunk)
                        await push(chunk if chunk.shape[1] > 1 else chunk[:, 0], source.rate)
                else:
                    step = int(PUSH_SECONDS * SAMPLE_RATE)
                    for i in range(0, samples.size, step):
                        await push(samples[i : i + step], SAMPLE_RATE)
                session.end_of_stream()

            async def video() -> None:
                last: np.ndarray | None = None
                n = 0
                while (frame := await session.next_video()) is not None:
                    # offline drops nothing; should a frame ever be missing, hold the previous one
                    while n < frame.frame_index and last is not None:
                        writer.video(last, n)
                        n += 1
                    # the writer copies each frame, so one canvas serves every frame (and holds the last one)
                    rgb = frame.rgb if paster is None else paster(frame.rgb, out=canvas)
                    writer.video(rgb, frame.frame_index)
                    last = rgb
                    n = frame.frame_index + 1
                    if progress is not None:
                        progress(1)
                if last is None:
                    raise RuntimeError("the session produced no video")
                while n < session.metrics()["frames_committed"]:
                    writer.video(last, n)
                    n += 1

            async def sound() -> None:
                while (chunk := await session.next_audio()) is not None:
                    if source is None:  # a file's audio was written as read, at its own rate
                        writer.audio(chunk.samples)

            await run_all(feed(), video(), sound())
            if session.error is not None:
                raise RuntimeError(f"rendering failed: {session.error!r}") from session.error
            frames = writer.frames
            encoded = (writer.width, writer.height)
        metrics = session.metrics()
    finally:
        await runtime.close_session(session)
    return RenderResult(
        Path(out),
        frames,
        cfg.fps,
        duration_s,
        runtime.untrained,
        metrics,
        size=encoded,
        pasted=paster is not None,
    )


def crop_is_photo(avatar: Avatar, tolerance: float = 0.01) -> bool:
    """True when the avatar's crop is exactly its whole photo, scaled without rotation (nothing to paste into).

    ``tolerance``: in photo pixels, for the crop's outer edges against the photo's.
    """
    matrix = np.asarray(avatar.crop_to_image, dtype=np.float64)  # [2, 3]
    if abs(matrix[0, 1]) > 1e-9 or abs(matrix[1, 0]) > 1e-9:
        return False
    side = avatar.crop.shape[0]
    h, w = np.asarray(avatar.image).shape[:2]
    # pixel edges: crop [-0.5, side - 0.5] must land on the photo's [-0.5, w - 0.5] x [-0.5, h - 0.5]
    edges = np.array([[-0.5, -0.5], [side - 0.5, side - 0.5]]) @ matrix[:, :2].T + matrix[:, 2]  # [2, 2]
    return bool(np.allclose(edges, [[-0.5, -0.5], [w - 0.5, h - 0.5]], atol=tolerance))


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
