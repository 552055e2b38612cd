"""Reading audio files and writing H.264 + AAC mp4 files (PyAV), without leaving partial files behind.

WAV PCM is read with the standard library's ``wave`` module; every other format (and float WAV) through PyAV.
The writer encodes into a temporary file next to the destination and renames it only when everything was
written, so a failure never leaves a half-written video under the requested name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import wave
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import av
import numpy as np

from engine.audio.pcm import SAMPLE_RATE, to_mono_16k

AAC_FRAME = 1024  # samples per AAC frame


class MediaError(ValueError):
    """An input file the engine cannot read, or an output it cannot write; the message says which and why."""


def _read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as w:
        channels, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
        raw = w.readframes(n)
    if width == 1:
        pcm = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        pcm = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v >= 1 << 23, v - (1 << 24), v)
        pcm = v.astype(np.float32) / float(1 << 23)
    elif width == 4:
        pcm = np.frombuffer(raw, "<i4").astype(np.float32) / 2147483648.0
    else:
        raise MediaError(f"{path}: unsupported WAV sample width {width} bytes")
    return pcm.reshape(-1, channels), rate


def _read_av(path: Path) -> tuple[np.ndarray, int]:
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise MediaError(f"{path}: the file has no audio stream")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            parts: list[np.ndarray] = []
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    parts.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                parts.append(out.to_ndarray().reshape(-1))
    except av.FFmpegError as exc:
        raise MediaError(f"{path}: cannot decode audio ({exc})") from exc
    pcm = np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
    return pcm, SAMPLE_RATE


def load_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Any audio file -> ``(float32 [n, channels] in [-1, 1], its sample rate)``, as recorded (no resampling
    for PCM WAV). Raises :class:`MediaError` naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: audio file not found")
    if not os.access(path, os.R_OK):
        raise MediaError(f"{path}: audio file is not readable (permissions)")
    try:
        pcm, rate = _read_wav(path)
    except (wave.Error, EOFError):
        pcm, rate = _read_av(path)  # not PCM WAV (float WAV, mp3, flac, ogg, m4a, ...)
    except OSError as exc:
        raise MediaError(f"{path}: cannot read audio ({exc})") from exc
    if pcm.shape[0] == 0:
        raise MediaError(f"{path}: the audio is empty")
    return pcm.reshape(pcm.shape[0], -1), rate


def read_audio(path: str | Path) -> np.ndarray:
    """Any audio file -> float32 mono 16 kHz ``[n]`` (the engine's clock). Raises :class:`MediaError`."""
    pcm, rate = load_audio(path)
    try:
        return to_mono_16k(pcm, rate, max_seconds=None)
    except ValueError as exc:
        raise MediaError(f"{path}: {exc}") from exc


def write_wav(path: str | Path, audio: np.ndarray, rate: int) -> None:
    """16-bit PCM WAV of float audio in [-1, 1], ``[n]`` (mono) or ``[n, channels]``."""
    pcm = np.asarray(audio, np.float64)
    pcm = pcm.reshape(pcm.shape[0], -1)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(pcm.shape[1])
        out.setsampwidth(2)
        out.setframerate(int(rate))
        out.writeframes((np.clip(pcm, -1.0, 1.0) * 32767.0).astype("<i2").tobytes())


def check_writable(out: str | Path) -> Path:
    """Fail early (before any rendering) when ``out`` cannot be written."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise MediaError(f"{out}: is a directory; give a file name such as {out / 'out.mp4'}")
    if not parent.is_dir():
        raise MediaError(f"{out}: output directory {parent} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".write-test-", delete=True):
            pass
    except OSError as exc:
        raise MediaError(f"{out}: output directory {parent} is not writable ({exc.strerror or exc})") from exc
    return out


class Mp4Writer:
    """``with Mp4Writer(out, fps, size) as w: w.video(rgb); w.audio(samples)`` -> ``out`` only on success.

    ``size``: the frames' side (square) or ``(width, height)``. H.264 in yuv420p needs even sides: an odd side
    is padded by one pixel on the right / bottom, repeating the last column / row (nothing is cropped away).
    """

    def __init__(
        self, out: str | Path, fps: int, size: int | tuple[int, int], *, crf: int = 18, preset: str = "veryfast"
    ) -> None:
        self.out = check_writable(out)
        self.fps = fps
        width, height = (size, size) if isinstance(size, int) else size
        if width <= 0 or height <= 0:
            raise ValueError(f"video size must be positive, got {width}x{height}")
        self.frame_width, self.frame_height = width, height  # what video() accepts
        self.width, self.height = width + width % 2, height + height % 2  # what is encoded
        self._crf = crf
        self._preset = preset
        self._tmp: Path | None = None
        self._container: av.container.OutputContainer | None = None
        self._pending_audio = np.zeros(0, np.float32)
        self._audio_pts = 0
        self.frames = 0
        self.samples = 0

    def __enter__(self) -> Mp4Writer:
        fd, name = tempfile.mkstemp(dir=self.out.parent, prefix=f".{self.out.stem}-", suffix=".mp4.part")
        os.close(fd)
        self._tmp = Path(name)
        try:
            container = av.open(name, mode="w", format="mp4")
            v = container.add_stream("libx264", rate=self.fps)
            v.width = self.width
            v.height = self.height
            v.pix_fmt = "yuv420p"
            v.codec_context.time_base = Fraction(1, self.fps)
            v.options = {"crf": str(self._crf), "preset": self._preset}
            a = container.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
            a.codec_context.time_base = Fraction(1, SAMPLE_RATE)
        except Exception:
            self._discard()
            raise
        self._container, self._vstream, self._astream = container, v, a
        return self

    def video(self, rgb: np.ndarray, index: int | None = None) -> None:
        """Append a ``[height, width, 3]`` uint8 frame (pts = ``index``, default: the next one)."""
        assert self._container is not None
        if rgb.shape[:2] != (self.height, self.width):
            if rgb.shape[:2] != (self.frame_height, self.frame_width):
                raise ValueError(
                    f"expected a [{self.frame_height}, {self.frame_width}, 3] frame, got {list(rgb.shape)}"
                )
            rgb = np.pad(rgb, ((0, self.height - rgb.shape[0]), (0, self.width - rgb.shape[1]), (0, 0)), mode="edge")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        frame.pts = self.frames if index is None else index
        frame.time_base = Fraction(1, self.fps)
        for packet in self._vstream.encode(frame):
            self._container.mux(packet)
        self.frames += 1

    def audio(self, samples: np.ndarray) -> None:
        """Append float32 mono 16 kHz samples."""
        self._pending_audio = np.concatenate([self._pending_audio, samples.astype(np.float32)])
        self.samples += samples.size
        while self._pending_audio.size >= AAC_FRAME:
            self._encode_audio(self._pending_audio[:AAC_FRAME])
            self._pending_audio = self._pending_audio[AAC_FRAME:]

    def _encode_audio(self, chunk: np.ndarray) -> None:
        assert self._container is not None
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="fltp", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = self._audio_pts
        frame.time_base = Fraction(1, SAMPLE_RATE)
        self._audio_pts += chunk.size
        for packet in self._astream.encode(frame):
            self._container.mux(packet)

    def _finish(self) -> None:
        assert self._container is not None and self._tmp is not None
        if self._pending_audio.size:
            self._encode_audio(self._pending_audio)
            self._pending_audio = np.zeros(0, np.float32)
        for packet in self._vstream.encode(None):
            self._container.mux(packet)
        for packet in self._astream.encode(None):
            self._container.mux(packet)
        self._container.close()
        self._container = None
        os.replace(self._tmp, self.out)
        self._tmp = None

    def _discard(self) -> None:
        if self._container is not None:
            with contextlib.suppress(Exception):
                self._container.close()
            self._container = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self._discard()
            return
        try:
            self._finish()
        except BaseException:
            self._discard()
            raise
