"""Weight-free analytic motion (classic mode): audio loudness/spectrum -> jaw, lips, blinks, idle head, emotion.

:class:`ClassicFeatures` is its own small feature stage (16 kHz PCM in, one row per 40 ms frame at 25 fps):

    column 0  loudness in [0, 1]: frame RMS in dBFS mapped linearly, -60 dB -> 0, -10 dB -> 1
    column 1  spectral centroid / 8000 Hz
    column 2  fraction of energy below 800 Hz (rounded vowels)
    column 3  fraction of energy above 3000 Hz (spread lips, fricatives)

Row ``i`` covers exactly audio ``[i * 640, (i + 1) * 640)``, so the jaw is not delayed by any analysis window.
:class:`ClassicMotion` turns rows into :class:`MotionFrame` s. Expression offsets are in units of the avatar's
inter-ocular distance (``face_size``) and touch only LIP (speech), EYE (blinks) and EMOTION (controls).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar

import numpy as np
import torch

from engine.audio.pcm import SAMPLE_RATE
from engine.keypoints import NUM_KP, MotionParams
from engine.motion.base import MotionFrame
from engine.motion.control_schema import ControlState

DIM = 4
DEFAULT_FACE_SIZE = 0.502  # inter-ocular distance of the default avatar (normalised units)

# Emotion offsets per keypoint (dx, dy) in inter-ocular units, at intensity 1. Keys are EMOTION keypoints only.
EMOTIONS: dict[str, dict[int, tuple[float, float]]] = {
    "neutral": {},
    "happy": {6: (-0.07, -0.07), 12: (0.07, -0.07), 13: (0.0, -0.025), 16: (0.0, -0.025), 14: (0.0, -0.01),
              17: (0.0, 0.02), 1: (0.0, -0.02), 2: (0.0, -0.02)},
    "sad": {6: (0.01, 0.05), 12: (-0.01, 0.05), 18: (0.0, -0.06), 1: (0.02, 0.0), 2: (-0.02, 0.0),
            17: (0.0, -0.015)},
    "angry": {1: (0.03, 0.06), 2: (-0.03, 0.06), 18: (0.0, 0.07), 13: (0.0, -0.02), 16: (0.0, -0.02),
              6: (0.02, 0.0), 12: (-0.02, 0.0), 14: (0.0, 0.01), 17: (0.0, -0.01)},
    "surprised": {1: (0.0, -0.1), 2: (0.0, -0.1), 18: (0.0, -0.07), 17: (0.0, 0.12), 19: (0.0, 0.1),
                  20: (0.0, 0.11), 6: (0.025, 0.03), 12: (-0.025, 0.03)},
    "disgusted": {14: (0.0, -0.04), 6: (0.0, 0.02), 12: (0.0, 0.02), 18: (0.0, 0.05), 1: (0.01, 0.04),
                  2: (-0.01, 0.04), 13: (0.0, -0.02), 16: (0.0, -0.02)},
    # fear: brows raised and drawn together, lower lids dropped (eyes widen), lips stretched sideways
    "fear": {1: (0.015, -0.07), 2: (-0.015, -0.07), 18: (0.0, -0.05), 13: (0.0, 0.015), 16: (0.0, 0.015),
             6: (-0.035, 0.02), 12: (0.035, 0.02), 17: (0.0, 0.03)},
    # contempt: the one-sided smirk (one mouth corner up and out), the other side and the brows stay
    "contempt": {12: (0.04, -0.05), 14: (0.01, -0.01), 17: (0.005, 0.0)},
}  # fmt: skip


class ClassicFeatures:
    """Streaming per-frame loudness and spectral cues from 16 kHz mono float32 PCM (see module docstring)."""

    dim = DIM

    def __init__(self, fps: int = 25) -> None:
        if SAMPLE_RATE % fps:
            raise ValueError(f"fps must divide {SAMPLE_RATE}, got {fps}")
        self.fps = fps
        self.hop = SAMPLE_RATE // fps
        n = 1 << (self.hop - 1).bit_length()
        self._nfft = n
        self._window = np.hanning(self.hop).astype(np.float32)
        freqs = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
        self._freqs = freqs.astype(np.float32)
        self._low = freqs < 800
        self._high = freqs > 3000
        self._buf = np.zeros(0, dtype=np.float32)

    def reset(self) -> None:
        self._buf = np.zeros(0, dtype=np.float32)

    def push(self, pcm: np.ndarray) -> np.ndarray:
        pcm = np.asarray(pcm, dtype=np.float32)
        if pcm.ndim != 1:
            raise ValueError(f"pcm must be mono [samples], got shape {pcm.shape}")
        self._buf = np.concatenate([self._buf, pcm])
        n = len(self._buf) // self.hop
        frames = self._buf[: n * self.hop].reshape(n, self.hop)
        self._buf = self._buf[n * self.hop :]
        return self._rows(frames)

    def flush(self) -> np.ndarray:
        if len(self._buf) == 0:
            return np.zeros((0, DIM), dtype=np.float32)
        frame = np.zeros((1, self.hop), dtype=np.float32)
        frame[0, : len(self._buf)] = self._buf
        self._buf = np.zeros(0, dtype=np.float32)
        return self._rows(frame)

    def _rows(self, frames: np.ndarray) -> np.ndarray:
        if len(frames) == 0:
            return np.zeros((0, DIM), dtype=np.float32)
        rms = np.sqrt((frames.astype(np.float64) ** 2).mean(axis=1))
        loud = np.clip((20 * np.log10(rms + 1e-9) + 60.0) / 50.0, 0.0, 1.0)
        power = np.abs(np.fft.rfft(frames * self._window, n=self._nfft, axis=1)) ** 2
        total = power.sum(axis=1) + 1e-12
        centroid = (power * self._freqs).sum(axis=1) / total
        low = power[:, self._low].sum(axis=1) / total
        high = power[:, self._high].sum(axis=1) / total
        return np.stack([loud, centroid / 8000.0, low, high], axis=1).astype(np.float32)


@dataclass(frozen=True)
class ClassicMotionConfig:
    fps: int = 25
    lookahead_frames: int = 1  # rows past frame i used to open the mouth ahead of a sound onset (only i + 1 is read)
    seed: int = 0
    jaw_gain: float = 0.20  # full jaw drop (lower lip travel) in inter-ocular units
    attack: float = 0.75  # one-pole smoothing towards a louder target (per frame)
    release: float = 0.45  # ... towards a quieter one
    anticipation: float = 0.5  # share of the next frame's loudness shown one frame early
    blink_every_s: float = 3.5  # mean interval between blinks
    head_motion: float = 1.0  # scale of the idle head sway
    emotion_ramp_frames: int = 10

    def __post_init__(self) -> None:
        if self.fps <= 0 or self.lookahead_frames < 0 or not 0 < self.attack <= 1 or not 0 < self.release <= 1:
            raise ValueError(f"invalid classic motion config: {self}")


class ClassicMotion:
    """Analytic :class:`~engine.motion.base.MotionStage` over :class:`ClassicFeatures` rows (``[n, 4]``).

    Deterministic for a seed. Frame indices follow pushed rows; :meth:`interrupt` drops unemitted rows (their
    indices are skipped, the session clock has moved on) and the jaw relaxes smoothly from where it was.
    """

    CONTROLS: ClassVar[Mapping[str, str]] = MappingProxyType(
        {
            "emotion": "expression offsets of the emotion on brows, lids and mouth",
            "intensity": "scales the emotion's offsets",
        }
    )

    def __init__(self, config: ClassicMotionConfig | None = None, face_size: float = DEFAULT_FACE_SIZE) -> None:
        self.config = config or ClassicMotionConfig()
        self.lookahead_frames = self.config.lookahead_frames
        self.face_size = float(face_size)
        self._rows = np.zeros((0, DIM), dtype=np.float32)
        self._next = 0  # index of the first buffered row
        self._jaw = 0.0
        self._width = 0.0
        self._rng = np.random.default_rng(self.config.seed)
        self._next_blink = self._blink_gap()
        phases = self._rng.uniform(0, 2 * math.pi, size=6)
        self._phases = phases
        self._emotion = np.zeros((NUM_KP, 2))
        self._emotion_target = np.zeros((NUM_KP, 2))
        self._emotion_step = np.zeros((NUM_KP, 2))

    # --- controls ---

    def set_emotion(self, name: str, intensity: float = 1.0) -> None:
        """Ramp to ``name`` (one of :data:`EMOTIONS`) at ``intensity`` in [0, 1.5] over the configured frames."""
        if name not in EMOTIONS:
            raise ValueError(f"unknown emotion {name!r}; choose from {sorted(EMOTIONS)}")
        if not 0.0 <= intensity <= 1.5:
            raise ValueError(f"emotion intensity must be in [0, 1.5], got {intensity}")
        target = np.zeros((NUM_KP, 2))
        for k, (dx, dy) in EMOTIONS[name].items():
            target[k] = (dx * intensity, dy * intensity)
        self._emotion_target = target
        self._emotion_step = np.abs(target - self._emotion) / max(1, self.config.emotion_ramp_frames)

    def check_controls(self, state: ControlState) -> None:
        """Every value of the honoured keys is within reach (the schema's ranges are this stage's)."""

    def apply_controls(self, state: ControlState) -> None:
        self.set_emotion(state.emotion, state.intensity)

    # --- stage protocol ---

    def push(self, features: np.ndarray) -> list[MotionFrame]:
        feats = np.asarray(features, dtype=np.float32)
        if feats.ndim != 2 or feats.shape[1] != DIM:
            raise ValueError(f"classic motion expects ClassicFeatures rows [n, {DIM}], got shape {feats.shape}")
        self._rows = np.concatenate([self._rows, feats])
        ready = max(0, len(self._rows) - self.lookahead_frames)
        return self._emit(ready)

    def flush(self) -> list[MotionFrame]:
        return self._emit(len(self._rows))

    def interrupt(self) -> None:
        """Drop the rows not yet emitted; the next frames start from a closed mouth (the session eases the frames
        already in flight to rest, so there is no jump)."""
        self._next += len(self._rows)
        self._rows = np.zeros((0, DIM), dtype=np.float32)
        self._jaw = 0.0
        self._width = 0.0

    # --- internals ---

    def _blink_gap(self) -> int:
        return max(8, round(self._rng.gamma(4.0, self.config.blink_every_s / 4.0) * self.config.fps))

    def _emit(self, count: int) -> list[MotionFrame]:
        frames = []
        for i in range(count):
            ahead = self._rows[i + 1] if i + 1 < len(self._rows) else None
            frames.append(MotionFrame(self._next + i, self._frame(self._next + i, self._rows[i], ahead)))
        self._rows = self._rows[count:]
        self._next += count
        return frames

    def _frame(self, index: int, row: np.ndarray, ahead: np.ndarray | None) -> MotionParams:
        cfg = self.config
        target = float(row[0])
        if ahead is not None:
            target = max(target, cfg.anticipation * float(ahead[0]))
        rate = cfg.attack if target > self._jaw else cfg.release
        self._jaw += rate * (target - self._jaw)
        voiced = min(1.0, 2.0 * float(row[0]))
        width_target = voiced * float(np.clip(3.0 * (row[3] - row[2]) + 0.5, -1.0, 1.0))
        self._width += 0.5 * (width_target - self._width)
        self._emotion += np.clip(self._emotion_target - self._emotion, -self._emotion_step, self._emotion_step)

        offsets = np.zeros((NUM_KP, 2))
        jaw = cfg.jaw_gain * self._jaw
        offsets[17, 1] += jaw
        offsets[20, 1] += 0.95 * jaw
        offsets[19, 1] += 0.85 * jaw
        offsets[14, 1] -= 0.08 * jaw
        spread = 0.05 * self._width  # > 0 spread (ee), < 0 rounded (oo)
        offsets[6] += (-spread, 0.4 * jaw)
        offsets[12] += (spread, 0.4 * jaw)
        offsets += self._emotion
        closure = self._blink(index)
        for upper, lower in ((11, 13), (15, 16)):
            offsets[upper, 1] += closure * 0.12  # most of the lid gap of a typical open eye
            offsets[lower, 1] -= closure * 0.005
        exp = torch.zeros(1, NUM_KP, 3)
        exp[0, :, :2] = torch.from_numpy(offsets * self.face_size).float()
        t_s = index / cfg.fps
        ph = self._phases
        amp = cfg.head_motion
        yaw = amp * (
            2.5 * math.sin(2 * math.pi * 0.11 * t_s + ph[0]) + 1.0 * math.sin(2 * math.pi * 0.27 * t_s + ph[1])
        )
        pitch = amp * (1.5 * math.sin(2 * math.pi * 0.13 * t_s + ph[2])) + 2.0 * self._jaw
        roll = amp * (1.5 * math.sin(2 * math.pi * 0.07 * t_s + ph[3]))
        tx = amp * 0.01 * math.sin(2 * math.pi * 0.09 * t_s + ph[4])
        ty = amp * 0.006 * math.sin(2 * math.pi * 0.15 * t_s + ph[5])
        return MotionParams(
            scale=torch.ones(1, 1),
            pitch=torch.tensor([pitch], dtype=torch.float32),
            yaw=torch.tensor([yaw], dtype=torch.float32),
            roll=torch.tensor([roll], dtype=torch.float32),
            t=torch.tensor([[tx, ty, 0.0]], dtype=torch.float32),
            exp=exp,
        )

    def _blink(self, index: int) -> float:
        """Lid closure in [0, 1] for frame ``index``; blink starts are drawn from the seeded generator."""
        profile = (0.5, 1.0, 1.0, 0.6, 0.25)
        while index >= self._next_blink + len(profile):
            self._next_blink += self._blink_gap()
        k = index - self._next_blink
        return profile[k] if 0 <= k < len(profile) else 0.0
