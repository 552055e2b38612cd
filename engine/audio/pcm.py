"""PCM validation, down-mixing and streaming resampling to the engine's 16 kHz mono float32.

Everything downstream (log-mel, HuBERT, loudness) assumes 16 kHz mono float32 in [-1, 1]; transports may hand
in any common rate, int or float samples, mono or interleaved ``[n, channels]``.
"""

from __future__ import annotations

import numpy as np
import soxr

SAMPLE_RATE = 16_000  # the engine's audio clock: every stage works on 16 kHz mono float32
MIN_RATE = 8000
MAX_RATE = 96000
MAX_CHANNELS = 8
MAX_PUSH_SECONDS = 60.0  # one push longer than this is a caller bug (or an attack), not a stream

_INT_SCALE = {np.dtype(np.int16): 32768.0, np.dtype(np.int32): 2147483648.0}
_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_sample_rate(sample_rate: object) -> int:
    """Validate a sample rate (an integer number of Hz in [8000, 96000])."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int | np.integer):
        raise ValueError(f"sample_rate must be an integer number of Hz, got {sample_rate!r}")
    rate = int(sample_rate)
    if not MIN_RATE <= rate <= MAX_RATE:
        raise ValueError(f"sample_rate {rate} Hz is outside the supported range [{MIN_RATE}, {MAX_RATE}]")
    return rate


def to_mono_float(pcm: np.ndarray, sample_rate: int, max_seconds: float | None = MAX_PUSH_SECONDS) -> np.ndarray:
    """Validate ``pcm`` (``[n]`` or ``[n, channels]``; int16/int32/float32/float64) -> mono float32 ``[n]``.

    Integer samples are scaled to [-1, 1); channels are averaged. Chunks longer than ``max_seconds`` (None: no
    limit, for whole files) are rejected. Raises ValueError naming the problem.
    """
    rate = check_sample_rate(sample_rate)
    if not isinstance(pcm, np.ndarray):
        raise ValueError(f"pcm must be a numpy array, got {type(pcm).__name__}")
    if pcm.ndim not in (1, 2):
        raise ValueError(f"pcm must be [n] or [n, channels], got a {pcm.ndim}-d array of shape {pcm.shape}")
    if pcm.ndim == 2 and not 1 <= pcm.shape[1] <= MAX_CHANNELS:
        raise ValueError(f"pcm has {pcm.shape[1]} channels; expected 1..{MAX_CHANNELS} (layout is [n, channels])")
    if max_seconds is not None and pcm.shape[0] > int(max_seconds * rate):
        raise ValueError(
            f"pcm chunk of {pcm.shape[0]} samples at {rate} Hz is longer than {max_seconds:g} s; "
            "push audio in smaller chunks"
        )
    if pcm.dtype in _INT_SCALE:
        mono = pcm.astype(np.float64) / _INT_SCALE[pcm.dtype]
    elif pcm.dtype in _FLOAT_DTYPES:
        if not np.all(np.isfinite(pcm)):
            raise ValueError("pcm contains NaN or infinite samples")
        mono = pcm.astype(np.float64)
    else:
        raise ValueError(f"pcm dtype {pcm.dtype} is not supported; use int16, int32, float32 or float64")
    if mono.ndim == 2:
        mono = mono.mean(axis=1)
    return np.ascontiguousarray(mono, dtype=np.float32)


class StreamingResampler:
    """Any-rate PCM pushes -> 16 kHz mono float32; chunked output is bitwise equal to one-shot output.

    The input rate is fixed by the first push; a push at a different rate ends the current stream (its tail is
    returned first) and starts a new one, so a transport switching devices does not lose audio.
    """

    def __init__(
        self, out_rate: int = SAMPLE_RATE, quality: str = "HQ", max_seconds: float | None = MAX_PUSH_SECONDS
    ) -> None:
        self.out_rate = out_rate
        self.quality = quality
        self.max_seconds = max_seconds
        self._rate: int | None = None
        self._stream: soxr.ResampleStream | None = None

    @property
    def input_rate(self) -> int | None:
        return self._rate

    def push(self, pcm: np.ndarray, sample_rate: int) -> np.ndarray:
        """Validate, down-mix and resample one chunk; returns the 16 kHz samples that are ready (``[m]``)."""
        mono = to_mono_float(pcm, sample_rate, self.max_seconds)
        rate = int(sample_rate)
        head = np.zeros(0, np.float32)
        if self._rate is not None and rate != self._rate:
            head = self.flush()
        if self._rate is None:
            self._rate = rate
            if rate != self.out_rate:
                self._stream = soxr.ResampleStream(rate, self.out_rate, 1, dtype="float32", quality=self.quality)
        out = mono if self._stream is None else self._stream.resample_chunk(mono)
        return np.concatenate([head, out]) if head.size else np.asarray(out, np.float32)

    def flush(self) -> np.ndarray:
        """End of stream: the resampler's pending tail; the next push starts a fresh stream."""
        tail = np.zeros(0, np.float32)
        if self._stream is not None:
            tail = np.asarray(self._stream.resample_chunk(np.zeros(0, np.float32), last=True), np.float32)
        self.reset()
        return tail

    def reset(self) -> None:
        self._rate = None
        self._stream = None


def to_mono_16k(pcm: np.ndarray, sample_rate: int, max_seconds: float | None = MAX_PUSH_SECONDS) -> np.ndarray:
    """One-shot: validate, down-mix and resample ``pcm`` to 16 kHz mono float32 ``[m]``.

    Uses the same streaming resampler as sessions, so a file converted at once equals the same file pushed in
    chunks through :class:`StreamingResampler` (bitwise). Pass ``max_seconds=None`` for whole files.
    """
    rs = StreamingResampler(max_seconds=max_seconds)
    out = rs.push(pcm, sample_rate)
    return np.concatenate([out, rs.flush()])


def resample(audio: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """One-shot resampling of mono float audio ``[n]`` (soxr, high quality) -> float32 ``[m]``."""
    if rate_in == rate_out:
        return np.asarray(audio, np.float32)
    return np.asarray(soxr.resample(np.asarray(audio, np.float32), rate_in, rate_out, quality="HQ"), np.float32)
