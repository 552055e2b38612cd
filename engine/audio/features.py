"""Streaming log-mel features and loudness at the video frame rate (one row per 40 ms at 25 fps).

Row ``i`` describes audio ``[i * 640, (i + 1) * 640)`` (16 kHz, 25 fps): the mean mel power of the four 25 ms
STFT frames (hop 10 ms) centred inside that span, log-compressed, optionally followed by the span's RMS level in
dB. The last STFT frame reaches 120 samples (7.5 ms) past the span: that is the stage's whole lookahead.

Every row is computed from the same fixed-size slice with the same fixed-shape operations whatever the push
sizes were, so streaming output is bitwise equal to the one-shot output (:func:`log_mel_offline`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.audio.pcm import SAMPLE_RATE


@dataclass(frozen=True)
class LogMelConfig:
    sample_rate: int = SAMPLE_RATE
    fps: int = 25
    n_mels: int = 80
    n_fft: int = 512
    win_length: int = 400  # 25 ms
    hop_length: int = 160  # 10 ms: 4 STFT frames per 40 ms video frame
    f_min: float = 20.0
    f_max: float = 7600.0
    log_floor: float = 1e-6  # mel power floor before log (silence maps to log(log_floor))
    loudness: bool = True  # append the frame's RMS level in dB as the last column
    loudness_floor_db: float = -100.0

    def __post_init__(self) -> None:
        if self.sample_rate % self.fps:
            raise ValueError(f"sample_rate {self.sample_rate} is not a multiple of fps {self.fps}")
        if self.samples_per_frame % self.hop_length:
            raise ValueError(f"hop_length {self.hop_length} must divide samples per frame {self.samples_per_frame}")
        if not 0 < self.win_length <= self.n_fft:
            raise ValueError(f"win_length must be in (0, n_fft={self.n_fft}], got {self.win_length}")
        if not 0 <= self.f_min < self.f_max <= self.sample_rate / 2:
            raise ValueError(f"need 0 <= f_min < f_max <= sample_rate/2, got {self.f_min}, {self.f_max}")
        if self.n_mels < 1 or self.log_floor <= 0:
            raise ValueError("n_mels must be >= 1 and log_floor > 0")

    @property
    def samples_per_frame(self) -> int:
        return self.sample_rate // self.fps

    @property
    def stft_per_frame(self) -> int:
        return self.samples_per_frame // self.hop_length

    @property
    def left_context(self) -> int:
        """Samples before the frame start the first STFT window reaches back to."""
        return self.win_length // 2 - self.hop_length // 2

    @property
    def span(self) -> int:
        """Samples one row reads: [frame_start - left_context, frame_start - left_context + span)."""
        return self.hop_length * (self.stft_per_frame - 1) + self.win_length

    @property
    def lookahead_samples(self) -> int:
        """Samples past the frame end the last STFT window needs (120 = 7.5 ms by default)."""
        return self.span - self.left_context - self.samples_per_frame

    @property
    def dim(self) -> int:
        return self.n_mels + (1 if self.loudness else 0)


def hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def mel_to_hz(m: np.ndarray | float) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> np.ndarray:
    """Triangular HTK-scale mel filters, area-normalised (Slaney style) -> ``[n_mels, n_fft // 2 + 1]`` float64."""
    bins_hz = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))  # [n_mels + 2]
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins_hz[None] - lo) / (mid - lo)
    falling = (hi - bins_hz[None]) / (hi - mid)
    tri = np.clip(np.minimum(rising, falling), 0.0, None)
    return tri * (2.0 / (hi - lo))  # equal area per filter so wide high bands do not dominate


class LogMelFeatures:
    """:class:`engine.motion.base.FeatureStage` producing log-mel (+ loudness) rows at ``fps``."""

    def __init__(self, config: LogMelConfig | None = None) -> None:
        self.config = cfg = config or LogMelConfig()
        self.fps = cfg.fps
        self.dim = cfg.dim
        self._window = np.hanning(cfg.win_length + 1)[:-1]  # periodic Hann
        self._fb = mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.f_min, cfg.f_max)
        self.reset()

    @property
    def lookahead_samples(self) -> int:
        return self.config.lookahead_samples

    def reset(self) -> None:
        cfg = self.config
        self._buf = np.zeros(cfg.left_context, np.float64)  # the past before the stream is silence
        self._buf_start = -cfg.left_context  # absolute sample index of _buf[0]
        self._samples = 0
        self._rows = 0

    def silence(self) -> np.ndarray:
        """The row that digital silence produces ``[dim]`` (used to pad the past of motion windows)."""
        cfg = self.config
        row = np.full(cfg.n_mels, math.log(cfg.log_floor), np.float32)
        if cfg.loudness:
            row = np.concatenate([row, np.array([cfg.loudness_floor_db], np.float32)])
        return row

    def push(self, pcm: np.ndarray) -> np.ndarray:
        pcm = _check_mono16k(pcm)
        self._buf = np.concatenate([self._buf, pcm.astype(np.float64)])
        self._samples += pcm.shape[0]
        return self._emit(self._ready_rows(self._samples))

    def flush(self) -> np.ndarray:
        cfg = self.config
        total = math.ceil(self._samples / cfg.samples_per_frame)
        # The future after the end of stream is silence: pad so every remaining row's span is complete.
        need = total * cfg.samples_per_frame + self.lookahead_samples - (self._buf_start + self._buf.shape[0])
        if need > 0:
            self._buf = np.concatenate([self._buf, np.zeros(need)])
        out = self._emit(total)
        self.reset()
        return out

    def _ready_rows(self, available: int) -> int:
        cfg = self.config
        return max(0, (available - self.lookahead_samples) // cfg.samples_per_frame)

    def _emit(self, upto: int) -> np.ndarray:
        cfg = self.config
        rows = [self._row(i) for i in range(self._rows, upto)]
        self._rows = max(self._rows, upto)
        keep_from = self._rows * cfg.samples_per_frame - cfg.left_context
        drop = keep_from - self._buf_start
        if drop > 0:
            self._buf = self._buf[drop:]
            self._buf_start = keep_from
        if not rows:
            return np.zeros((0, self.dim), np.float32)
        return np.stack(rows).astype(np.float32)

    def _row(self, i: int) -> np.ndarray:
        cfg = self.config
        start = i * cfg.samples_per_frame - cfg.left_context - self._buf_start
        seg = self._buf[start : start + cfg.span]  # [span]
        idx = np.arange(cfg.stft_per_frame)[:, None] * cfg.hop_length + np.arange(cfg.win_length)[None]
        frames = seg[idx] * self._window  # [stft_per_frame, win_length]
        power = np.abs(np.fft.rfft(frames, n=cfg.n_fft, axis=1)) ** 2  # [stft_per_frame, n_fft // 2 + 1]
        mel = (power @ self._fb.T).mean(axis=0)  # [n_mels]
        out = np.log(np.maximum(mel, cfg.log_floor))
        if cfg.loudness:
            body = seg[cfg.left_context : cfg.left_context + cfg.samples_per_frame]
            out = np.concatenate([out, [rms_db(body, cfg.loudness_floor_db)]])
        return out


def rms_db(x: np.ndarray, floor_db: float = -100.0) -> float:
    """RMS level of ``x`` in dB relative to full scale (1.0), floored at ``floor_db``."""
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0
    return max(floor_db, 20.0 * math.log10(rms)) if rms > 0 else floor_db


def frame_loudness_db(pcm: np.ndarray, fps: int = 25, floor_db: float = -100.0) -> np.ndarray:
    """Per-video-frame RMS dB of 16 kHz mono audio -> ``[ceil(n / (16000 / fps))]`` float32 (last frame zero-padded)."""
    pcm = _check_mono16k(pcm)
    spf = SAMPLE_RATE // fps
    n = math.ceil(pcm.shape[0] / spf)
    padded = np.zeros(n * spf, np.float64)
    padded[: pcm.shape[0]] = pcm
    return np.array([rms_db(padded[i * spf : (i + 1) * spf], floor_db) for i in range(n)], np.float32)


def log_mel_offline(pcm: np.ndarray, config: LogMelConfig | None = None) -> np.ndarray:
    """Whole-file features ``[ceil(n / 640), dim]`` (the reference for the streaming path)."""
    stage = LogMelFeatures(config)
    return np.concatenate([stage.push(pcm), stage.flush()])


def _check_mono16k(pcm: np.ndarray) -> np.ndarray:
    if not isinstance(pcm, np.ndarray) or pcm.ndim != 1:
        raise ValueError(f"feature stages take 16 kHz mono [n] arrays, got {getattr(pcm, 'shape', type(pcm))}")
    if pcm.dtype not in (np.float32, np.float64):
        raise ValueError(f"feature stages take float32 samples (see engine.audio.to_mono_16k), got {pcm.dtype}")
    if not np.all(np.isfinite(pcm)):
        raise ValueError("pcm contains NaN or infinite samples")
    return pcm


class LoudnessFeatures:
    """:class:`engine.motion.base.FeatureStage` of one column: each frame's RMS level in dB (no lookahead).

    Equal to :class:`LogMelFeatures`' loudness column; used beside feature stages without one (HuBERT).
    """

    dim = 1

    def __init__(self, fps: int = 25, floor_db: float = -100.0) -> None:
        if SAMPLE_RATE % fps:
            raise ValueError(f"fps {fps} must divide {SAMPLE_RATE}")
        self.fps = fps
        self.floor_db = floor_db
        self._spf = SAMPLE_RATE // fps
        self.reset()

    def reset(self) -> None:
        self._buf = np.zeros(0, np.float64)

    def silence(self) -> np.ndarray:
        return np.array([self.floor_db], np.float32)

    def push(self, pcm: np.ndarray) -> np.ndarray:
        self._buf = np.concatenate([self._buf, _check_mono16k(pcm).astype(np.float64)])
        n = self._buf.shape[0] // self._spf
        out = [rms_db(self._buf[i * self._spf : (i + 1) * self._spf], self.floor_db) for i in range(n)]
        self._buf = self._buf[n * self._spf :]
        return np.array(out, np.float32).reshape(n, 1)

    def flush(self) -> np.ndarray:
        out = np.zeros((0, 1), np.float32)
        if self._buf.size:
            body = np.concatenate([self._buf, np.zeros(self._spf - self._buf.shape[0])])
            out = np.array([[rms_db(body, self.floor_db)]], np.float32)
        self.reset()
        return out


class ConcatFeatures:
    """Several feature stages side by side: row i = concatenation of every stage's row i.

    Stages have different lookaheads; rows are released when all stages have produced them.
    """

    def __init__(self, *stages: Any) -> None:
        if not stages:
            raise ValueError("ConcatFeatures needs at least one stage")
        fps = {s.fps for s in stages}
        if len(fps) != 1:
            raise ValueError(f"stages disagree on fps: {sorted(fps)}")
        self.stages = stages
        self.fps = stages[0].fps
        self.dim = sum(int(s.dim) for s in stages)
        self.reset()

    def reset(self) -> None:
        for s in self.stages:
            s.reset()
        self._pending: list[np.ndarray] = [np.zeros((0, int(s.dim)), np.float32) for s in self.stages]

    def silence(self) -> np.ndarray:
        return np.concatenate([s.silence() for s in self.stages])

    def push(self, pcm: np.ndarray) -> np.ndarray:
        return self._collect([s.push(pcm) for s in self.stages])

    def flush(self) -> np.ndarray:
        out = self._collect([s.flush() for s in self.stages])
        if any(p.shape[0] for p in self._pending):
            raise RuntimeError("feature stages flushed different row counts")
        self.reset()
        return out

    def _collect(self, new: list[np.ndarray]) -> np.ndarray:
        self._pending = [np.concatenate([p, n]) for p, n in zip(self._pending, new, strict=True)]
        n = min(p.shape[0] for p in self._pending)
        out = np.concatenate([p[:n] for p in self._pending], axis=1)
        self._pending = [p[n:] for p in self._pending]
        return out.astype(np.float32)
