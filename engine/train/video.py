"""Decoding a talking-face video into 25 fps RGB frames and 16 kHz mono audio (PyAV), one frame at a time.

Frame ``i`` of the output is the decoded picture shown at time ``i / fps`` (the latest frame whose timestamp is
not later than the middle of the output frame's interval), so a 30 fps or variable-rate video lands on the same
25 fps grid as the audio features (row ``i`` covers audio ``[i / fps, (i + 1) / fps)``). Large pictures are
scaled down so the longer side is at most ``max_side`` pixels: face tracking needs no more, and memory stays flat.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import cv2
import numpy as np

from engine.media import MediaError, read_audio

VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v", ".flv")


class VideoError(MediaError):
    """A video the engine cannot use (unreadable, no video or audio stream, too short); the message says why."""


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    width: int  # after scaling down
    height: int
    source_fps: float
    duration_s: float
    scale: float  # output pixels per source pixel (<= 1)


def probe(path: str | Path, max_side: int = 720) -> VideoInfo:
    """Open ``path`` and describe its first video stream (raises :class:`VideoError`)."""
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"{path}: video file not found")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: the file has no video stream")
            stream = container.streams.video[0]
            width, height = int(stream.codec_context.width), int(stream.codec_context.height)
            rate = float(stream.average_rate or stream.guessed_rate or 25)
            duration = float(container.duration / av.time_base) if container.duration else 0.0
    except av.FFmpegError as exc:
        raise VideoError(f"{path}: cannot read the video ({exc})") from exc
    if width <= 0 or height <= 0:
        raise VideoError(f"{path}: the video stream has no picture size")
    scale = min(1.0, max_side / max(width, height))
    return VideoInfo(path, round(width * scale), round(height * scale), rate, duration, scale)


def iter_frames(path: str | Path, fps: int = 25, max_side: int = 720) -> Iterator[np.ndarray]:
    """Yield ``[H, W, 3]`` uint8 RGB frames on the ``fps`` grid (see the module docstring)."""
    info = probe(path, max_side)
    size = (info.width, info.height)
    index = 0
    last: np.ndarray | None = None
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                if frame.pts is None or frame.time is None:
                    continue
                rgb = np.asarray(frame.to_ndarray(format="rgb24"), np.uint8)
                if info.scale < 1.0:
                    rgb = np.asarray(cv2.resize(rgb, size, interpolation=cv2.INTER_AREA), np.uint8)
                # every grid frame whose middle lies before this picture's time shows the previous picture
                while last is not None and (index + 0.5) / fps < float(frame.time):
                    yield last
                    index += 1
                last = rgb
            if last is not None:
                end = max(info.duration_s, (index + 1) / fps)
                while index < max(1, round(end * fps)):
                    yield last
                    index += 1
    except av.FFmpegError as exc:
        raise VideoError(f"{path}: the video is damaged ({exc})") from exc
    if last is None:
        raise VideoError(f"{path}: no picture could be decoded")


def read_video_audio(path: str | Path) -> np.ndarray:
    """The video's sound as float32 mono 16 kHz ``[n]`` (raises :class:`VideoError` when there is none)."""
    try:
        audio = read_audio(path)
    except MediaError as exc:
        raise VideoError(str(exc)) from exc
    if audio.size < 1600:
        raise VideoError(f"{path}: the audio is shorter than 0.1 s")
    return audio
