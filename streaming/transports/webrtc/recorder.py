"""``engine client --record DIR``: what was received as one ``DIR/session.mp4`` (H.264 + AAC), picture and sound
placed by their timestamps, plus ``report.json``.

Both tracks are numbered from their first packet and start at the same instant on the server (see
:mod:`streaming.transports.webrtc.playout`), so frame ``pts`` and audio ``pts`` share one timeline starting at 0:
a frame goes to index ``round(pts * fps)``, the audio is resampled to the writer's 16 kHz mono and a gap in it
(lost packets) is filled with silence, so neither track drifts from the other.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import cv2
import numpy as np
import soxr

from engine.audio.pcm import SAMPLE_RATE
from engine.media import MediaError, VideoWriter, check_writable
from streaming.transports.webrtc.playout import ClientError


class SessionRecorder:
    """Writes ``session.mp4`` into ``out_dir`` as frames and audio arrive; ``close()`` finishes it."""

    NAME = "session.mp4"

    def __init__(self, out_dir: Path, fps: int) -> None:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.path = check_writable(out_dir / self.NAME)
        except (OSError, MediaError) as exc:
            raise ClientError(f"--record {out_dir}: cannot write there ({exc})") from exc
        self.out_dir = out_dir
        self.fps = fps
        self.frames = 0
        self._writer: VideoWriter | None = None
        self._size: tuple[int, int] | None = None  # (width, height) of the first frame: the file's
        self._last_index = -1
        self._resampler: soxr.ResampleStream | None = None
        self._rate = 0
        self._next_sample: int | None = None  # the next input sample (at the received rate) the file expects
        self._pending: list[np.ndarray] = []  # 16 kHz audio received before the first frame opened the file

    def video(self, rgb: np.ndarray, pts_s: float) -> None:
        index = round(pts_s * self.fps)
        if index <= self._last_index:  # a frame for a slot already written (a repeated timestamp)
            return
        if self._writer is None:
            self._size = (rgb.shape[1], rgb.shape[0])
            writer = VideoWriter(self.path, self.fps, self._size)
            writer.__enter__()
            self._writer = writer
            for chunk in self._pending:
                writer.audio(chunk)
            self._pending.clear()
        assert self._size is not None
        if (rgb.shape[1], rgb.shape[0]) != self._size:
            rgb = cv2.resize(rgb, self._size, interpolation=cv2.INTER_AREA)
        self._writer.video(np.ascontiguousarray(rgb), index=index)
        self._last_index = index
        self.frames += 1

    def audio(self, pcm: np.ndarray, rate: int, pts_s: float) -> None:
        mono = pcm.astype(np.float32).mean(axis=1) / (32768.0 if pcm.dtype == np.int16 else 1.0)
        start = round(pts_s * rate)
        if self._resampler is None:
            self._resampler = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32")
            self._rate = rate
            self._next_sample = 0  # the file's audio starts at pts 0, with the picture: silence up to here
        if rate != self._rate:
            raise ClientError(f"--record: the audio rate changed from {self._rate} to {rate} Hz mid-stream")
        assert self._next_sample is not None
        gap = start - self._next_sample
        if gap > 0:
            mono = np.concatenate([np.zeros(gap, np.float32), mono])
        elif gap < 0:
            mono = mono[-gap:]  # overlaps what was written already
        self._next_sample += mono.size
        self._put(self._resampler.resample_chunk(mono))

    def _put(self, samples: np.ndarray) -> None:
        if not samples.size:
            return
        if self._writer is None:
            self._pending.append(samples)
        else:
            self._writer.audio(samples)

    def close(self) -> Path:
        """Finish the file; without a single frame nothing is written and the reason is raised."""
        if self._writer is None:
            raise ClientError(f"--record {self.out_dir}: no video was received, so no {self.NAME} was written")
        if self._resampler is not None:
            self._put(self._resampler.resample_chunk(np.zeros(0, np.float32), last=True))
        writer, self._writer = self._writer, None
        writer.__exit__(None, None, None)
        return self.path

    def abort(self) -> None:
        """Discard a partial file (the run failed)."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            with contextlib.suppress(Exception):
                writer.__exit__(RuntimeError, RuntimeError("aborted"), None)
