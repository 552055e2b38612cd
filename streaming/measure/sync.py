"""Lip-sync measuring instrument: a known test signal in, the audio/video offset of the rendered mouth out.

Works on plain arrays (frames ``[N, H, W, 3]`` uint8, fps, 16 kHz float32 audio, a mouth box) so offline
renders and streams received live can both be measured. Sign convention: a positive offset means the video
lags the audio.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import numpy as np

from engine.audio.pcm import SAMPLE_RATE
from engine.avatar.default import SIZE, default_landmarks

FPS = 25
MAX_LAG_FRAMES = 10  # +-400 ms: any real desync is far inside this


class Offset(NamedTuple):
    offset_ms: float  # video minus audio; > 0: the mouth moves late
    offset_frames: float
    correlation: float  # normalised cross-correlation at the peak
    jitter_ms: float  # spread (std) of the per-burst onset delays


def sync_signal(seconds: float = 6.0, seed: int = 0) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Seeded tone / noise bursts (0.2-0.5 s) separated by silences (0.25-0.6 s) -> ``(audio, bursts [(t0, t1)])``."""
    rng = np.random.default_rng(seed)
    audio = np.zeros(round(seconds * SAMPLE_RATE), dtype=np.float32)
    bursts = []
    t = 0.3
    while True:
        length = rng.uniform(0.2, 0.5)
        if t + length > seconds - 0.2:
            break
        i0, i1 = round(t * SAMPLE_RATE), round((t + length) * SAMPLE_RATE)
        n = i1 - i0
        if rng.random() < 0.5:
            f0 = rng.uniform(120, 260)
            k = np.arange(n) / SAMPLE_RATE
            burst = sum(np.sin(2 * np.pi * f0 * h * k) / h for h in range(1, 6))
        else:
            burst = rng.standard_normal(n)
        burst = np.asarray(burst, dtype=np.float64)
        burst *= 0.3 / (np.sqrt((burst**2).mean()) + 1e-9)
        audio[i0:i1] = burst
        bursts.append((i0 / SAMPLE_RATE, i1 / SAMPLE_RATE))
        t += length + rng.uniform(0.25, 0.6)
    return audio, bursts


def audio_envelope(audio: np.ndarray, fps: float, frames: int | None = None) -> np.ndarray:
    """RMS per video frame (frame ``i`` covers ``[i / fps, (i + 1) / fps)``) -> ``[frames]``."""
    audio = np.asarray(audio, dtype=np.float64)
    n = frames if frames is not None else int(np.ceil(len(audio) / SAMPLE_RATE * fps))
    out = np.zeros(n)
    for i in range(n):
        seg = audio[round(i * SAMPLE_RATE / fps) : round((i + 1) * SAMPLE_RATE / fps)]
        out[i] = np.sqrt((seg**2).mean()) if len(seg) else 0.0
    return out


def mouth_box(landmarks: np.ndarray, margin: float = 0.6) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` around the mouth of 68-point landmarks, grown downwards for the opening jaw."""
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (68, 2):
        raise ValueError(f"mouth_box needs 68-point landmarks [68, 2], got shape {lm.shape}")
    x0, y0 = lm[48:60].min(axis=0)
    x1, y1 = lm[48:60].max(axis=0)
    h = max(y1 - y0, 1.0)
    return int(x0), int(y0), int(np.ceil(x1)), int(np.ceil(y1 + margin * h))


def mouth_opening(frames: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Darkness inside ``box`` per frame: mean of ``1 - luma`` -> ``[N]`` (larger = more open)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [N, H, W, 3], got shape {frames.shape}")
    x0, y0, x1, y1 = box
    region = frames[:, y0:y1, x0:x1].astype(np.float64) / 255.0
    if region.size == 0:
        raise ValueError(f"mouth box {box} is empty for frames of shape {frames.shape}")
    luma = region @ np.array([0.299, 0.587, 0.114])
    return np.asarray((1.0 - luma).mean(axis=(1, 2)))


def estimate_offset(opening: np.ndarray, envelope: np.ndarray, fps: float, max_lag_frames: int = 10) -> Offset:
    """Cross-correlate mouth opening with the audio envelope; sub-frame peak by parabolic interpolation."""
    a = _normalise(np.asarray(envelope, dtype=np.float64))
    v = _normalise(np.asarray(opening, dtype=np.float64))
    n = min(len(a), len(v))
    if n < 2 * max_lag_frames + 2:
        raise ValueError(f"need more than {2 * max_lag_frames + 2} frames, got {n}")
    a, v = a[:n], v[:n]
    lags = np.arange(-max_lag_frames, max_lag_frames + 1)
    corr = np.array([_corr_at(a, v, int(lag)) for lag in lags])
    k = int(np.argmax(corr))
    shift = 0.0
    if 0 < k < len(lags) - 1:
        denom = corr[k - 1] - 2 * corr[k] + corr[k + 1]
        shift = 0.5 * (corr[k - 1] - corr[k + 1]) / denom if denom < 0 else 0.0
    frames = float(lags[k] + shift)
    return Offset(1000.0 * frames / fps, frames, float(corr[k]), _jitter(a, v, fps))


def _corr_at(a: np.ndarray, v: np.ndarray, lag: int) -> float:
    """Correlation of ``a[t]`` with ``v[t + lag]`` over the overlap."""
    if lag >= 0:
        x, y = a[: len(a) - lag], v[lag:]
    else:
        x, y = a[-lag:], v[: len(v) + lag]
    return float((x * y).mean())


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / (x.std() + 1e-12)


def _jitter(a: np.ndarray, v: np.ndarray, fps: float) -> float:
    """Std (ms) of the delays between each audio onset and the next mouth onset (half-range crossings)."""
    ta = _onsets(a)
    tv = _onsets(v)
    delays = []
    for t in ta:
        later = tv[tv >= t - 3]
        if len(later):
            delays.append(later[0] - t)
    return float(np.std(delays) * 1000.0 / fps) if len(delays) > 1 else 0.0


def _onsets(x: np.ndarray) -> np.ndarray:
    """Fractional frame positions where ``x`` rises through the middle of its range."""
    mid = 0.5 * (x.min() + x.max())
    above = x >= mid
    idx = np.nonzero(~above[:-1] & above[1:])[0]
    return idx + (mid - x[idx]) / (x[idx + 1] - x[idx] + 1e-12)


# --- measurements on timed streams (received live, decoded from a file, recorded by a browser) -----------


@dataclass
class SyncMeasure:
    """One measurement: offset (ms, > 0 video late), per-burst jitter, peak correlation, and what it saw."""

    mode: str
    offset_ms: float
    offset_frames: float
    jitter_ms: float
    correlation: float
    video_frames: int
    audio_seconds: float
    notes: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("offset_ms", "offset_frames", "jitter_ms", "correlation"):
            out[key] = round(float(out[key]), 3)
        return out


class SyncError(RuntimeError):
    """The measurement could not be made (too few frames, no audio, a peer that never connected)."""


def default_mouth_box(size: int) -> tuple[int, int, int, int]:
    """The default avatar's mouth box scaled to frames of ``size`` x ``size`` pixels."""

    return mouth_box(default_landmarks() * (size / SIZE))


def frame_opening(rgb: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """Mouth darkness of one ``[H, W, 3]`` frame (see :func:`streaming.measure.sync.mouth_opening`)."""
    return float(mouth_opening(rgb[None], box)[0])


def timed_offset(
    video_t: np.ndarray,
    opening: np.ndarray,
    audio: np.ndarray,
    rate: int,
    audio_t0: float,
    fps: float = FPS,
) -> Offset:
    """Offset between mouth openings shown at times ``video_t`` (s) and ``audio`` (mono, ``rate``) starting at
    ``audio_t0`` (s), all on one timeline.

    Frame ``i`` of the grid is the video frame presented at ``i / fps`` and the audio RMS over
    ``[i / fps, (i + 1) / fps)``, the pairing under which an in-sync render measures 0.
    """
    video_t = np.asarray(video_t, np.float64)
    opening = np.asarray(opening, np.float64)
    audio = np.asarray(audio, np.float64)
    if video_t.size < 2 * MAX_LAG_FRAMES + 2 or audio.size < rate:
        raise SyncError(f"too little to measure: {video_t.size} frames, {audio.size / rate:.2f} s of audio")
    start = max(video_t.min(), audio_t0)
    stop = min(video_t.max(), audio_t0 + audio.size / rate)
    first, last = int(np.ceil(start * fps - 1e-6)), int(np.floor(stop * fps + 1e-6)) - 1
    if last - first < 2 * MAX_LAG_FRAMES + 2:
        raise SyncError(f"audio and video overlap for only {max(stop - start, 0.0):.2f} s")
    grid = np.arange(first, last + 1) / fps
    order = np.argsort(video_t)
    env = np.zeros(grid.size)
    for k, t in enumerate(grid):
        seg = audio[max(round((t - audio_t0) * rate), 0) : max(round((t + 1 / fps - audio_t0) * rate), 0)]
        env[k] = np.sqrt(np.mean(seg**2)) if seg.size else 0.0
    # a frame the receiver dropped takes the value of its neighbours rather than a hole in the series
    coarse = estimate_offset(np.interp(grid, video_t[order], opening[order]), env, fps, MAX_LAG_FRAMES)
    # again with the picture moved back by the whole frames found: the per-burst onset jitter pairs each sound
    # onset with the mouth onset just after it, which only holds once the constant part of the offset is gone
    lag = round(coarse.offset_frames)
    aligned = np.interp(grid + lag / fps, video_t[order], opening[order])
    fine = estimate_offset(aligned, env, fps, MAX_LAG_FRAMES) if lag else coarse
    frames = lag + fine.offset_frames
    return Offset(1000.0 * frames / fps, frames, fine.correlation, onset_jitter_ms(env, aligned, fps))


def onset_jitter_ms(envelope: np.ndarray, opening: np.ndarray, fps: float, window: float = 3.0) -> float:
    """Std (ms) of the delays between each sound onset and the nearest mouth onset within ``window`` frames.

    Unlike pairing every onset with the next one, a burst whose loudness or opening stays under the half-range
    threshold (a quiet burst after a codec or the browser's audio processing) is left out instead of being paired
    with the following burst, half a second away.
    """
    ta, tv = _rising(envelope), _rising(opening)
    delays = [tv[np.argmin(np.abs(tv - t))] - t for t in ta if tv.size and np.min(np.abs(tv - t)) <= window]
    return float(np.std(delays) * 1000.0 / fps) if len(delays) > 1 else 0.0


def _rising(x: np.ndarray) -> np.ndarray:
    """Fractional indices where ``x`` rises through the middle of its range."""
    x = np.asarray(x, np.float64)
    mid = 0.5 * (x.min() + x.max())
    idx = np.nonzero((x[:-1] < mid) & (x[1:] >= mid))[0]
    return idx + (mid - x[idx]) / (x[idx + 1] - x[idx] + 1e-12)


def measure(mode: str, video_t: np.ndarray, opening: np.ndarray, audio: np.ndarray, rate: int, audio_t0: float,
            **notes: Any) -> SyncMeasure:  # fmt: skip
    found = timed_offset(video_t, opening, audio, rate, audio_t0)
    return SyncMeasure(
        mode,
        found.offset_ms,
        found.offset_frames,
        found.jitter_ms,
        found.correlation,
        int(np.asarray(video_t).size),
        float(np.asarray(audio).size / rate),
        notes,
    )
