"""Weight-free analytic motion (classic mode): audio loudness/spectrum -> jaw, lips, blinks, idle head, emotion.

:class:`ClassicFeatures` is its own small feature stage (16 kHz PCM in, one row per 40 ms frame at 25 fps):

    column 0  loudness in [0, 1]: frame RMS in dBFS mapped linearly, -60 dB -> 0, -10 dB -> 1
    column 1  spectral centroid / 8000 Hz
    column 2  fraction of energy below 800 Hz (rounded vowels)
    column 3  fraction of energy above 3000 Hz (spread lips, fricatives)

Row ``i`` covers exactly audio ``[i * 640, (i + 1) * 640)``, so the jaw is not delayed by any analysis window.
:class:`ClassicMotion` turns rows into :class:`MotionFrame` s. Expression offsets are in units of the avatar's
inter-ocular distance (``face_size``): speech moves the LIP keypoints, blinks and gaze the lids (``EYE``), and
emotions are facial action units (``engine.motion.facs``) on every keypoint but the rigid anchors the classic
renderer fits the head pose to. Live controls: :meth:`ClassicMotion.apply_controls` (``docs/controls.md``).

Stored examples (:mod:`engine.motion.library`, read through a :class:`~engine.motion.library.Watched` loader):
an emotion with a stored example (``engine emotion add``, landmark-mesh offsets) is shown by the example's offsets
on the keypoints its landmarks measured *instead of* its action units there, and by its action units on the rest
(a template landmark fit measures only the mouth, nose and chin: such an example's brows and lids are the action
units'); with the same intensity, interpolation and region mixing (its upper-face keypoints follow
``eyes_emotion``, the others ``mouth_emotion``). Emotions without an example keep their action units. A stored
reference clip (``engine avatar reference``) gives ``head_pose: reference`` (its head-pose trajectory, estimated
from its landmarks by ``solvePnP``) and ``emotion_source: reference`` (its typical expression).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch

from engine.audio.pcm import SAMPLE_RATE
from engine.keypoints import NUM_KP, MotionParams, SourceFace
from engine.motion import facs
from engine.motion.base import MotionFrame
from engine.motion.control_schema import ControlState, ControlValueError
from engine.motion.emotion import EMOTIONS as EMOTION_NAMES
from engine.motion.library import ClassicStored, MeshOffsets, MeshReference, Watched
from engine.motion.smoothing import KalmanConfig, KalmanFilter, OneEuroConfig, OneEuroFilter
from engine.render.classic_mesh import LID_REF_GAP

DIM = 4
DEFAULT_FACE_SIZE = 0.502  # inter-ocular distance of the default avatar (normalised units)

# Emotion offsets per keypoint (dx, dy) in inter-ocular units at intensity 1, built from the emotions' action
# units (engine.motion.facs). Kept as a table for callers that only need the names or the resting offsets.
EMOTIONS: dict[str, dict[int, tuple[float, float]]] = {
    name: {k: (float(dx), float(dy)) for k, (dx, dy) in enumerate(facs.offsets(facs.emotion_vector(name))) if dx or dy}
    for name in EMOTION_NAMES
}


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
    blink_every_s: float = 3.5  # mean interval between blinks at start (the blink_rate control changes it)
    head_motion: float = 1.0  # scale of the idle head sway
    emotion_ramp_frames: int = 10  # ramp of set_emotion (apply_controls ramps over the state's ramp_s)
    gaze_amplitude: float = 0.025  # std of the horizontal gaze targets, inter-ocular units
    gaze_hold_s: tuple[float, float] = (0.8, 2.5)  # fixation durations between saccades
    agc_release_s: float = 1.5  # loudness_lips off: how fast the speech-level follower forgets a loud peak

    def __post_init__(self) -> None:
        if self.fps <= 0 or self.lookahead_frames < 0 or not 0 < self.attack <= 1 or not 0 < self.release <= 1:
            raise ValueError(f"invalid classic motion config: {self}")
        if self.blink_every_s <= 0 or self.gaze_amplitude < 0 or not 0 < self.gaze_hold_s[0] <= self.gaze_hold_s[1]:
            raise ValueError(f"invalid classic motion config: {self}")


# stored-offset regions for region mixing: the upper face (brows, glabella, lids) follows eyes_emotion
UPPER_KEYPOINTS: tuple[int, ...] = (1, 2, 11, 13, 15, 16, 18)
_UPPER_KP = np.zeros((NUM_KP, 1))
_UPPER_KP[list(UPPER_KEYPOINTS)] = 1.0
_UPPER_AU = np.array([name in facs.UPPER_FACE for name in facs.AU_NAMES], dtype=np.float64)
REFERENCE = "<reference>"  # the reference clip's expression, in an emotion slot
MAX_REFERENCE_DEG = 25.0  # a reference trajectory is clamped to what a warp of one photo can show


class _Effective(NamedTuple):
    """What the controls set, as numbers that ramp linearly (a change mid-ramp starts where the ramp is)."""

    aus: np.ndarray  # [n_au] action unit weights (intensity included)
    stored: np.ndarray  # [21, 2] offsets of stored examples / the reference clip (intensity included)
    absolute: float  # 1 when pure_emotion is off: the portrait's own lower-face expression is undone first
    lip_scale: float
    loud_weight: float  # 1: lips follow the loudness, 0: a level-normalised envelope (fixed gain)
    blink: float
    gaze: float
    head: float  # 1: idle sway, 0: fixed head
    reference: float  # 1: the reference clip's head pose


def _blend(a: _Effective, b: _Effective, r: float) -> _Effective:
    def mix(x: Any, y: Any) -> Any:
        return x * (1 - r) + y * r

    return _Effective(*(mix(x, y) for x, y in zip(a, b, strict=True)))


def _smoothstep(x: float) -> float:
    x = min(max(x, 0.0), 1.0)
    return x * x * (3 - 2 * x)


BLINK_CLOSE_S, BLINK_HOLD_S, BLINK_OPEN_S = 0.07, 0.03, 0.14  # a blink: fast close, short hold, slower opening
BLINK_DEPTH = 1.05 * LID_REF_GAP  # upper-lid travel at full closure: a little past the lower lid (clamped there)
MIN_BLINK_GAP_S = 0.35


class ClassicMotion:
    """Analytic :class:`~engine.motion.base.MotionStage` over :class:`ClassicFeatures` rows (``[n, 4]``).

    Deterministic for a seed. Frame indices follow pushed rows; :meth:`interrupt` drops unemitted rows (their
    indices are skipped, the session clock has moved on) and the jaw relaxes smoothly from where it was.
    Live controls: :meth:`apply_controls` with a :class:`~engine.motion.controls.ControlState`; the keys and
    values classic mode honours are :attr:`HONOURED`.
    """

    # control key -> the values classic mode honours (None: every valid value). head_pose / emotion_source
    # "reference" are honoured when the avatar has a stored reference clip (check_controls refuses them otherwise).
    HONOURED: ClassVar[dict[str, tuple[Any, ...] | None]] = {
        "emotion": EMOTION_NAMES,
        "intensity": None,
        "emotion_b": None,
        "mix": None,
        "mouth_emotion": None,
        "eyes_emotion": None,
        "pure_emotion": (True, False),  # see apply_controls
        "emotion_source": None,
        "lip_scale": None,
        "loudness_lips": (True, False),
        "blink": (True, False),
        "blink_rate": None,
        "gaze": (True, False),
        "head_pose": None,
        "smoothing": None,
        "ramp_s": None,
    }

    # what each honoured control does here (the session refuses the others; /health and the CLI list these)
    CONTROLS: ClassVar[Mapping[str, str]] = MappingProxyType(
        {
            "emotion": "the emotion's stored example (engine emotion add) as landmark-mesh offsets, else its facial "
            "action units (brows, lids, cheeks, nose, lips, jaw)",
            "intensity": "scales the action units (0..1.5)",
            "emotion_b": "second emotion: action-unit weights interpolated by mix",
            "mix": "0: emotion only .. 1: emotion_b only",
            "mouth_emotion": "lower-face action units (nose, lips, jaw) from this emotion",
            "eyes_emotion": "upper-face action units (brows, lids, cheek raise) from this emotion",
            "pure_emotion": "true: add to the portrait's own expression; false: undo its smile / parted lips first",
            "emotion_source": "label, or reference: the typical expression of the avatar's stored reference clip",
            "lip_scale": "scales the speech motion of lips and jaw",
            "loudness_lips": "true: the jaw follows loudness; false: a level-normalised envelope",
            "blink": "seeded blinks on or off",
            "blink_rate": "blinks per second (0: none); the pending blink is re-drawn at once",
            "gaze": "seeded horizontal saccades of the eyeballs",
            "head_pose": "diffusion: idle head sway; fixed: still head; reference: the stored reference clip's "
            "head-pose trajectory (solvePnP on its landmarks)",
            "smoothing": "filter of the speech motion (jaw, lip width): none (default), one_euro or kalman",
            "ramp_s": "every change ramps linearly over this many seconds",
        }
    )

    def __init__(
        self,
        config: ClassicMotionConfig | None = None,
        face_size: float = DEFAULT_FACE_SIZE,
        source: SourceFace | None = None,
        stored: Watched[ClassicStored] | None = None,
    ) -> None:
        """``face_size``: the avatar's inter-ocular distance (normalised units); ``source``: its classic source
        face, from which ``pure_emotion = false`` estimates the portrait's own expression (without it, that
        setting changes nothing); ``stored``: the avatar's stored emotion examples and reference clip."""
        self.config = config or ClassicMotionConfig()
        cfg = self.config
        self.lookahead_frames = cfg.lookahead_frames
        self.face_size = float(face_size)
        self._rest = facs.rest_offsets(source.kp_source.numpy()) if source is not None else np.zeros((NUM_KP, 2))
        self._rows = np.zeros((0, DIM), dtype=np.float32)
        self._next = 0  # index of the first buffered row
        self._jaw = 0.0
        self._width = 0.0
        self._peak = 0.0  # speech-level follower (loudness_lips off)
        # separate seeded streams, so a change of one schedule does not shift the others
        self._phases = np.random.default_rng([cfg.seed, 0]).uniform(0, 2 * math.pi, size=6)
        self._blink_rng = np.random.default_rng([cfg.seed, 1])
        self._gaze_rng = np.random.default_rng([cfg.seed, 2])
        self._emotions: dict[str, MeshOffsets] = {}
        self._missing: dict[str, str] = {}
        self._reference: MeshReference | None = None
        self._no_reference = "no reference clip is stored for this avatar (engine avatar reference AVATAR --clip VIDEO)"
        self._stored = stored
        self._pending: ClassicStored | None = None
        # the analytic motion is smooth by construction: no extra filter unless asked for
        self._state = ControlState(blink_rate=min(2.0, 1.0 / cfg.blink_every_s), smoothing="none")
        self._smoother: OneEuroFilter | KalmanFilter | None = None
        self._poll()
        self._install(ramp=False)
        target = self._effective(self._state)
        self._from, self._to, self._ramp_pos, self._ramp_len = target, target, 0, 0
        self._blink_start = -(10**9)
        self._next_blink = self._draw_blink(0)
        self._gaze_from = self._gaze_to = 0.0
        self._gaze_change = 0
        self._next_gaze = self._draw_gaze_hold(0)

    # --- controls ---

    @property
    def state(self) -> ControlState:
        return self._state

    def apply_controls(self, state: ControlState, ramp_frames: int | None = None) -> None:
        """Make ``state`` the live control state (call it on the thread that pushes features).

        Every effective value (action-unit weights, lip gain, blink and gaze weights, head sway) ramps linearly
        from where it is over ``state.ramp_s`` (or ``ramp_frames``). A changed ``blink_rate`` re-draws the
        pending blink from now (rate 0: no more blinks; a blink under way finishes). ``pure_emotion`` (default
        true): classic offsets are displacements from the portrait's own face, which plays the part of neutral, so
        they are already "what the emotion adds"; false makes them absolute: the portrait's own smile and parted
        lips (estimated from its landmarks, see :func:`engine.motion.facs.rest_offsets`) are undone first, so
        "neutral" relaxes a smiling photo. Values outside :attr:`HONOURED` raise
        :class:`~engine.motion.controls.ControlValueError` and keep the previous state.
        """
        self.check_controls(state)
        self._install()
        if state.smoothing != self._state.smoothing:
            self._smoother = _speech_filter(state.smoothing, self.config.fps)
        r = self._ramp_pos / self._ramp_len if self._ramp_len else 1.0
        self._from = _blend(self._from, self._to, r)
        self._to = self._effective(state)
        self._ramp_len = ramp_frames if ramp_frames is not None else round(state.ramp_s * self.config.fps)
        self._ramp_pos = 0
        old_rate, self._state = self._state.blink_rate, state
        if state.blink_rate != old_rate:
            self._next_blink = self._draw_blink(self._next)

    def check_controls(self, state: ControlState) -> None:
        """Raise :class:`~engine.motion.control_schema.ControlValueError` for values outside :attr:`HONOURED`, and
        for ``reference`` without a stored reference clip (the message says why and how to store one)."""
        if not isinstance(state, ControlState):
            raise TypeError(f"classic controls take a ControlState, got {type(state).__name__}")
        for key, allowed in self.HONOURED.items():
            if allowed is not None and getattr(state, key) not in allowed:
                raise ControlValueError(f"{key}: classic mode cannot honour {getattr(state, key)!r}")
        self._poll()
        pending = self._pending
        reference = pending[2] if pending is not None else self._reference
        if reference is None:
            why = (pending[3] if pending is not None else "") or self._no_reference
            for key in ("head_pose", "emotion_source"):
                if getattr(state, key) == "reference":
                    raise ControlValueError(f"{key}: classic mode cannot honour 'reference': {why}")

    def _poll(self) -> None:
        """Look for examples added to or removed from the motion library (on the thread that checks controls); the
        stage's own thread installs them with the next control, never in the middle of a frame."""
        fresh = self._stored.poll() if self._stored is not None else None
        if fresh is not None:
            self._pending = fresh

    def _install(self, ramp: bool = True) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        self._emotions, self._missing, reference, why = pending
        self._no_reference = why or self._no_reference
        if reference is not None or "reference" not in (self._state.head_pose, self._state.emotion_source):
            self._reference = reference
        if ramp:  # a running stage: the current state ramps to the new offsets
            r = self._ramp_pos / self._ramp_len if self._ramp_len else 1.0
            self._from = _blend(self._from, self._to, r)
            self._to = self._effective(self._state)
            self._ramp_len, self._ramp_pos = round(self._state.ramp_s * self.config.fps), 0

    @property
    def stored_emotions(self) -> tuple[str, ...]:
        """The emotions shown by their stored examples (the others by action units)."""
        return tuple(self._emotions)

    def set_emotion(self, name: str, intensity: float = 1.0) -> None:
        """Ramp to ``name`` (one of :data:`EMOTIONS`) at ``intensity`` in [0, 1.5] over the configured frames."""
        if name not in EMOTIONS:
            raise ValueError(f"unknown emotion {name!r}; choose from {sorted(EMOTIONS)}")
        if not 0.0 <= intensity <= 1.5:
            raise ValueError(f"emotion intensity must be in [0, 1.5], got {intensity}")
        state = dataclasses.replace(
            self._state, emotion=name, intensity=float(intensity), emotion_b=None, mouth_emotion=None,
            eyes_emotion=None,
        )  # fmt: skip
        self.apply_controls(state, ramp_frames=self.config.emotion_ramp_frames)

    def _effective(self, s: ControlState) -> _Effective:
        aus, stored = self._emotion_parts(s)
        return _Effective(
            aus=aus,
            stored=stored,
            absolute=float(not s.pure_emotion),
            lip_scale=s.lip_scale,
            loud_weight=float(s.loudness_lips),
            blink=float(s.blink),
            gaze=float(s.gaze),
            head=float(s.head_pose == "diffusion"),
            reference=float(s.head_pose == "reference" and self._reference is not None),
        )

    def _emotion_parts(self, s: ControlState) -> tuple[np.ndarray, np.ndarray]:
        """(AU weights, stored offsets) of a state: interpolation, then region mixing (the upper face from
        ``eyes_emotion``, the lower from ``mouth_emotion``), times intensity. Each emotion contributes through its
        stored example when it has one, else through its action units; with the same weights and regions both ways,
        so a state of action units alone is exactly :func:`engine.motion.facs.mixed_vector`."""
        aus = np.zeros(len(facs.AU_NAMES))
        stored = np.zeros((NUM_KP, 2))
        if s.emotion_source == "reference" and self._reference is not None:
            base = [(REFERENCE, 1.0)]
        elif s.emotion_b is not None:
            base = [(s.emotion, 1.0 - s.mix), (s.emotion_b, s.mix)]
        else:
            base = [(s.emotion, 1.0)]
        upper = [(s.eyes_emotion, 1.0)] if s.eyes_emotion is not None else base
        lower = [(s.mouth_emotion, 1.0)] if s.mouth_emotion is not None else base
        for slots, au_mask, kp_mask in ((upper, _UPPER_AU, _UPPER_KP), (lower, 1.0 - _UPPER_AU, 1.0 - _UPPER_KP)):
            for name, w in slots:
                if name == REFERENCE and self._reference is not None:
                    stored += w * np.asarray(self._reference.emotion, np.float64) * kp_mask
                elif name in self._emotions:
                    example = self._emotions[name]
                    unmeasured = np.ones((NUM_KP, 1))
                    unmeasured[list(example.measured)] = 0.0
                    # the example where it measured the face, the emotion's action units elsewhere
                    region_aus = facs.emotion_vector(name) * au_mask
                    stored += w * (example.offsets * kp_mask + facs.offsets(region_aus) * unmeasured)
                else:
                    aus += w * facs.emotion_vector(name) * au_mask
        return aus * s.intensity, stored * s.intensity

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

    # --- seeded natural motion ---

    def _draw_blink(self, frame: int) -> float:
        """Start frame of the next blink after ``frame`` at the current rate (inf when the rate is 0)."""
        rate = self._state.blink_rate
        if rate <= 0:
            return math.inf
        # gamma(4): fairly regular intervals with the right mean, never closer than MIN_BLINK_GAP_S
        gap_s = max(MIN_BLINK_GAP_S, float(self._blink_rng.gamma(4.0, 1.0 / (4.0 * rate))))
        return frame + max(1, round(gap_s * self.config.fps))

    def _blink(self, index: int) -> float:
        """Lid closure in [0, 1] for frame ``index``: a seeded schedule at the current rate."""
        while index >= self._next_blink:
            self._blink_start = int(self._next_blink)
            self._next_blink = self._draw_blink(self._blink_start)
        t = (index - self._blink_start + 0.5) / self.config.fps
        if t < 0 or t > BLINK_CLOSE_S + BLINK_HOLD_S + BLINK_OPEN_S:
            return 0.0
        if t < BLINK_CLOSE_S:
            return _smoothstep(t / BLINK_CLOSE_S)
        if t < BLINK_CLOSE_S + BLINK_HOLD_S:
            return 1.0
        return 1.0 - _smoothstep((t - BLINK_CLOSE_S - BLINK_HOLD_S) / BLINK_OPEN_S)

    def _draw_gaze_hold(self, frame: int) -> int:
        lo, hi = self.config.gaze_hold_s
        return frame + max(1, round(float(self._gaze_rng.uniform(lo, hi)) * self.config.fps))

    def _gaze(self, index: int) -> float:
        """Horizontal gaze (inter-ocular units) for frame ``index``: fixations joined by 2-frame saccades."""
        amp = self.config.gaze_amplitude
        while index >= self._next_gaze:
            self._gaze_from = self._gaze_at(self._next_gaze)
            self._gaze_to = float(np.clip(self._gaze_rng.normal(0.0, amp), -2 * amp, 2 * amp))
            self._gaze_change = self._next_gaze
            self._next_gaze = self._draw_gaze_hold(self._next_gaze)
        return self._gaze_at(index)

    def _gaze_at(self, index: int) -> float:
        r = min(1.0, max(0.0, (index - self._gaze_change + 1) / 2))
        return self._gaze_from * (1 - r) + self._gaze_to * r

    def _reference_pose(self, index: int) -> np.ndarray:
        """The reference clip's pose offsets ``[6]`` at frame ``index``, played forth and back (no jump at the
        loop), angles clamped to what a warp of one photo can show."""
        assert self._reference is not None
        pose = np.asarray(self._reference.pose, dtype=np.float64)
        n = pose.shape[0]
        i = 0 if n == 1 else index % (2 * (n - 1))
        out = pose[i if i < n else 2 * (n - 1) - i].copy()
        out[:3] = np.clip(out[:3], -MAX_REFERENCE_DEG, MAX_REFERENCE_DEG)
        out[3:5] = np.clip(out[3:5], -0.3, 0.3)
        out[5] = float(np.clip(out[5], -0.3, 0.3))
        return out

    # --- per frame ---

    def _emit(self, count: int) -> list[MotionFrame]:
        frames = []
        for i in range(count):
            ahead = self._rows[i + 1] if i + 1 < len(self._rows) else None
            frames.append(MotionFrame(self._next + i, self._frame(self._next + i, self._rows[i], ahead)))
        self._rows = self._rows[count:]
        self._next += count
        return frames

    def _jaw_target(self, row: np.ndarray, ahead: np.ndarray | None, loud_weight: float) -> float:
        cfg = self.config
        loud = float(row[0])
        if ahead is not None:
            loud = max(loud, cfg.anticipation * float(ahead[0]))
        # level-normalised envelope: the loudness relative to a follower of recent speech peaks, gated at -50 dB
        decay = math.exp(-1.0 / (cfg.agc_release_s * cfg.fps))
        self._peak = max(loud, self._peak * decay)
        gate = 0.2
        normalised = min(1.0, max(0.0, (loud - gate) / max(self._peak - gate, 0.15)))
        return loud_weight * loud + (1.0 - loud_weight) * normalised

    def _frame(self, index: int, row: np.ndarray, ahead: np.ndarray | None) -> MotionParams:
        cfg = self.config
        if self._ramp_len and self._ramp_pos < self._ramp_len:
            self._ramp_pos += 1
        eff = _blend(self._from, self._to, self._ramp_pos / self._ramp_len if self._ramp_len else 1.0)
        target = self._jaw_target(row, ahead, eff.loud_weight)
        rate = cfg.attack if target > self._jaw else cfg.release
        self._jaw += rate * (target - self._jaw)
        voiced = min(1.0, 2.0 * float(row[0]))
        width_target = voiced * float(np.clip(3.0 * (row[3] - row[2]) + 0.5, -1.0, 1.0))
        self._width += 0.5 * (width_target - self._width)
        jaw_now, width_now = self._jaw, self._width
        if self._smoother is not None:  # the smoothing control filters the speech motion
            jaw_now, width_now = (float(v) for v in self._smoother(torch.tensor([self._jaw, self._width])))

        offsets = np.zeros((NUM_KP, 2))
        jaw = cfg.jaw_gain * jaw_now
        offsets[17, 1] += jaw
        offsets[20, 1] += 0.95 * jaw
        offsets[19, 1] += 0.85 * jaw
        offsets[14, 1] -= 0.08 * jaw
        spread = 0.035 * width_now  # > 0 spread (ee), < 0 rounded (oo)
        offsets[6] += (-spread, 0.4 * jaw)
        offsets[12] += (spread, 0.4 * jaw)
        offsets *= eff.lip_scale
        offsets += facs.offsets(eff.aus) + eff.stored + eff.absolute * self._rest
        closure = eff.blink * self._blink(index)
        for upper, lower in ((11, 13), (15, 16)):
            offsets[upper, 1] += closure * BLINK_DEPTH
            offsets[lower, 1] -= closure * 0.01
        gaze = eff.gaze * self._gaze(index)
        offsets[[11, 15], 0] += gaze  # the x of an upper-lid keypoint is the eyeball (see engine.motion.facs)
        exp = torch.zeros(1, NUM_KP, 3)
        exp[0, :, :2] = torch.from_numpy(offsets * self.face_size).float()
        t_s = index / cfg.fps
        ph = self._phases
        amp = cfg.head_motion * eff.head
        yaw = amp * (
            2.5 * math.sin(2 * math.pi * 0.11 * t_s + ph[0]) + 1.0 * math.sin(2 * math.pi * 0.27 * t_s + ph[1])
        )
        pitch = amp * (1.5 * math.sin(2 * math.pi * 0.13 * t_s + ph[2]) + 2.0 * self._jaw)
        roll = amp * (1.5 * math.sin(2 * math.pi * 0.07 * t_s + ph[3]))
        tx = amp * 0.01 * math.sin(2 * math.pi * 0.09 * t_s + ph[4])
        ty = amp * 0.006 * math.sin(2 * math.pi * 0.15 * t_s + ph[5])
        scale = 1.0
        if eff.reference > 0 and self._reference is not None:
            ref = self._reference_pose(index)
            pitch += eff.reference * ref[0]
            yaw += eff.reference * ref[1]
            roll += eff.reference * ref[2]
            tx += eff.reference * ref[3]
            ty += eff.reference * ref[4]
            scale += eff.reference * ref[5]
        return MotionParams(
            scale=torch.full((1, 1), scale),
            pitch=torch.tensor([pitch], dtype=torch.float32),
            yaw=torch.tensor([yaw], dtype=torch.float32),
            roll=torch.tensor([roll], dtype=torch.float32),
            t=torch.tensor([[tx, ty, 0.0]], dtype=torch.float32),
            exp=exp,
        )


def _speech_filter(mode: str, fps: int) -> OneEuroFilter | KalmanFilter | None:
    """The ``smoothing`` control's filter of classic speech motion (one frame of lag at most)."""
    if mode == "one_euro":
        return OneEuroFilter(OneEuroConfig(fps=fps, lag_frames=1.0))
    if mode == "kalman":
        return KalmanFilter(KalmanConfig(lag_frames=1.0))
    return None
