"""Lip-sync measuring instrument: a known test signal in, the audio/video offset of the rendered mouth out.

Works on plain arrays (frames ``[N, H, W, 3]`` uint8, fps, 16 kHz float32 audio, a mouth box) so offline
renders and streams received live can both be measured. Sign convention: a positive offset means the video
lags the audio.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

SAMPLE_RATE = 16000


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
