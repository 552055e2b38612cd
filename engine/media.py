"""Reading audio files and writing talking-head videos (PyAV), in bounded memory and without partial files.

:class:`AudioFile` streams any audio file in chunks at its own rate and channel count (PCM WAV through the
standard library's ``wave`` module, everything else through PyAV), so a one-hour input costs a chunk of memory,
not an hour. :class:`VideoWriter` encodes H.264 video and AAC audio (at the audio's own rate and channels) into a
temporary file next to the destination and renames it only when everything was written: a failure, a full disk
or an interrupt never leaves a half-written video under the requested name, and the finished file gets the
permissions the user's umask gives new files.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import wave
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import av
import numpy as np

from engine.audio.pcm import SAMPLE_RATE, to_mono_16k

AAC_FRAME = 1024  # samples per AAC frame
CHUNK_S = 1.0  # audio handed out per read
CONTAINERS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska"}  # H.264 + AAC in each


class MediaError(ValueError):
    """An input file the engine cannot read, or an output it cannot write; the message says which and why."""


def _pcm_from_wav_bytes(raw: bytes, width: int, channels: int, path: Path) -> np.ndarray:
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
    return pcm.reshape(-1, channels)


class AudioFile:
    """An audio file read in chunks: ``rate``, ``channels``, ``duration_s`` (an estimate for compressed formats)
    and iteration over float32 ``[n, channels]`` chunks in [-1, 1]. Opening checks the file; problems raise
    :class:`MediaError` naming the file and what is wrong."""

    def __init__(self, path: str | Path) -> None:
        self.path = path = Path(path)
        if not path.is_file():
            raise MediaError(f"{path}: audio file not found")
        if not os.access(path, os.R_OK):
            raise MediaError(f"{path}: audio file is not readable (permissions)")
        if path.stat().st_size == 0:
            raise MediaError(f"{path}: the file is empty (0 bytes)")
        self._wav: tuple[int, int, int, int] | None = None  # channels, width, rate, frames
        try:
            with wave.open(str(path), "rb") as w:
                self._wav = (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes())
        except (wave.Error, EOFError):
            self._wav = None  # not PCM WAV (float WAV, mp3, flac, ogg, m4a, ...): PyAV reads it
        except OSError as exc:
            raise MediaError(f"{path}: cannot read audio ({exc.strerror or exc})") from exc
        if self._wav is not None:
            self.channels, _, self.rate, frames = self._wav
            self.duration_s = frames / self.rate if self.rate else 0.0
        else:
            self.channels, self.rate, self.duration_s = self._probe()
        if self.duration_s <= 0 and self._wav is not None:
            raise MediaError(f"{path}: the audio is empty")

    def _probe(self) -> tuple[int, int, float]:
        try:
            with av.open(str(self.path)) as container:
                if not container.streams.audio:
                    raise MediaError(f"{self.path}: the file has no audio stream")
                stream = container.streams.audio[0]
                duration = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else 0.0
                if not duration and container.duration:
                    duration = container.duration / av.time_base
                return max(1, min(2, stream.channels or 1)), int(stream.rate or SAMPLE_RATE), duration
        except av.FFmpegError as exc:
            raise MediaError(
                f"{self.path}: cannot decode audio: not a format this engine reads ({exc.strerror or exc})"
            ) from exc

    def __iter__(self) -> Iterator[np.ndarray]:
        if self._wav is not None:
            yield from self._wav_chunks()
        else:
            yield from self._av_chunks()

    def _wav_chunks(self) -> Iterator[np.ndarray]:
        assert self._wav is not None
        channels, width, rate, _ = self._wav
        step = max(1, int(CHUNK_S * rate))
        with wave.open(str(self.path), "rb") as w:
            while raw := w.readframes(step):
                yield _pcm_from_wav_bytes(raw, width, channels, self.path)

    def _av_chunks(self) -> Iterator[np.ndarray]:
        layout = "stereo" if self.channels == 2 else "mono"
        try:
            with av.open(str(self.path)) as container:
                stream = container.streams.audio[0]
                resampler = av.AudioResampler(format="flt", layout=layout, rate=self.rate)
                for frame in container.decode(stream):
                    for out in resampler.resample(frame):
                        yield out.to_ndarray().reshape(-1, self.channels)
                for out in resampler.resample(None):
                    yield out.to_ndarray().reshape(-1, self.channels)
        except av.FFmpegError as exc:
            raise MediaError(f"{self.path}: cannot decode audio ({exc.strerror or exc})") from exc


def load_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Any audio file -> ``(float32 [n, channels] in [-1, 1], its sample rate)``, as recorded (no resampling).
    Raises :class:`MediaError` naming the problem."""
    source = AudioFile(path)
    parts = list(source)
    if not parts or sum(p.shape[0] for p in parts) == 0:
        raise MediaError(f"{path}: the audio is empty")
    return np.concatenate(parts), source.rate


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
    """Fail early (before any rendering) when ``out`` cannot be written or has a container we do not write."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise MediaError(f"{out}: is a directory; give a file name such as {out / 'out.mp4'}")
    if out.suffix.lower() not in CONTAINERS:
        raise MediaError(
            f"{out}: cannot write {out.suffix or 'a file without an extension'}; "
            f"the video is written as {', '.join(CONTAINERS)} (H.264 + AAC)"
        )
    if not parent.is_dir():
        raise MediaError(f"{out}: output directory {parent} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".write-test-", delete=True):
            pass
    except OSError as exc:
        raise MediaError(f"{out}: output directory {parent} is not writable ({exc.strerror or exc})") from exc
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class VideoWriter:
    """``with VideoWriter(out, fps, size) as w: w.video(rgb); w.audio(samples)`` -> ``out`` only on success.

    ``size``: the frames' side (square) or ``(width, height)``. H.264 in yuv420p needs even sides: an odd side
    is padded by one pixel on the right / bottom, repeating the last column / row (nothing is cropped away).
    ``audio_rate`` / ``audio_channels``: the audio track's, as the input had them (default 16 kHz mono).
    The container follows ``out``'s extension (:data:`CONTAINERS`).
    """

    def __init__(
        self,
        out: str | Path,
        fps: int,
        size: int | tuple[int, int],
        *,
        audio_rate: int = SAMPLE_RATE,
        audio_channels: int = 1,
        crf: int = 18,
        preset: str = "veryfast",
    ) -> None:
        self.out = check_writable(out)
        self.fps = fps
        width, height = (size, size) if isinstance(size, int) else size
        if width <= 0 or height <= 0:
            raise ValueError(f"video size must be positive, got {width}x{height}")
        if audio_channels not in (1, 2):
            raise ValueError(f"audio_channels must be 1 or 2, got {audio_channels}")
        self.frame_width, self.frame_height = width, height  # what video() accepts
        self.width, self.height = width + width % 2, height + height % 2  # what is encoded
        self.audio_rate, self.audio_channels = int(audio_rate), audio_channels
        self._crf = crf
        self._preset = preset
        self._tmp: Path | None = None
        self._container: av.container.OutputContainer | None = None
        self._pending_audio = np.zeros((0, audio_channels), np.float32)
        self._audio_pts = 0
        self.frames = 0
        self.samples = 0

    def __enter__(self) -> VideoWriter:
        fmt = CONTAINERS[self.out.suffix.lower()]
        fd, name = tempfile.mkstemp(dir=self.out.parent, prefix=f".{self.out.stem}-", suffix=f"{self.out.suffix}.part")
        os.close(fd)
        self._tmp = Path(name)
        try:
            container = av.open(name, mode="w", format=fmt)
            v = container.add_stream("libx264", rate=self.fps)
            v.width = self.width
            v.height = self.height
            v.pix_fmt = "yuv420p"
            v.codec_context.time_base = Fraction(1, self.fps)
            v.options = {"crf": str(self._crf), "preset": self._preset}
            layout = "stereo" if self.audio_channels == 2 else "mono"
            a = container.add_stream("aac", rate=self.audio_rate, layout=layout)
            a.codec_context.time_base = Fraction(1, self.audio_rate)
        except Exception:
            self._discard()
            raise
        self._container, self._vstream, self._astream = container, v, a
        return self

    def _write_error(self, exc: OSError) -> MediaError:
        if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            return MediaError(f"{self.out}: the video does not fit on the disk ({exc.strerror})")
        return MediaError(f"{self.out}: cannot write the video ({exc.strerror or exc})")

    def _mux(self, packets: list[av.Packet]) -> None:
        assert self._container is not None
        try:
            for packet in packets:
                self._container.mux(packet)
        except OSError as exc:
            raise self._write_error(exc) from exc

    def video(self, rgb: np.ndarray, index: int | None = None) -> None:
        """Append a ``[height, width, 3]`` uint8 frame (pts = ``index``, default: the next one)."""
        if rgb.shape[:2] != (self.height, self.width):
            if rgb.shape[:2] != (self.frame_height, self.frame_width):
                raise ValueError(
                    f"expected a [{self.frame_height}, {self.frame_width}, 3] frame, got {list(rgb.shape)}"
                )
            rgb = np.pad(rgb, ((0, self.height - rgb.shape[0]), (0, self.width - rgb.shape[1]), (0, 0)), mode="edge")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        frame.pts = self.frames if index is None else index
        frame.time_base = Fraction(1, self.fps)
        self._mux(self._vstream.encode(frame))
        self.frames += 1

    def audio(self, samples: np.ndarray) -> None:
        """Append float samples at ``audio_rate``: ``[n]`` (mono) or ``[n, audio_channels]``."""
        x = np.asarray(samples, np.float32).reshape(len(samples), -1)
        if x.shape[1] != self.audio_channels:
            x = x.mean(axis=1, keepdims=True) if self.audio_channels == 1 else np.repeat(x[:, :1], 2, axis=1)
        self._pending_audio = np.concatenate([self._pending_audio, x])
        self.samples += x.shape[0]
        while self._pending_audio.shape[0] >= AAC_FRAME:
            self._encode_audio(self._pending_audio[:AAC_FRAME])
            self._pending_audio = self._pending_audio[AAC_FRAME:]

    def _encode_audio(self, chunk: np.ndarray) -> None:
        layout = "stereo" if self.audio_channels == 2 else "mono"
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk.T), format="fltp", layout=layout)
        frame.sample_rate = self.audio_rate
        frame.pts = self._audio_pts
        frame.time_base = Fraction(1, self.audio_rate)
        self._audio_pts += chunk.shape[0]
        self._mux(self._astream.encode(frame))

    def _finish(self) -> None:
        assert self._container is not None and self._tmp is not None
        if self._pending_audio.shape[0]:
            self._encode_audio(self._pending_audio)
            self._pending_audio = self._pending_audio[:0]
        self._mux(self._vstream.encode(None))
        self._mux(self._astream.encode(None))
        try:
            self._container.close()
        except OSError as exc:
            raise self._write_error(exc) from exc
        self._container = None
        # mkstemp made the temporary file private (0600); the video gets what any new file of the user gets
        os.chmod(self._tmp, 0o666 & ~_umask())
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
