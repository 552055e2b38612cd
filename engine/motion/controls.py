"""Live motion controls: validated frozen state, applied per frame with smooth ramps (no pops).

Controls and the keypoints they may move (``engine.keypoints`` region sets):

* emotion x intensity, interpolation between two emotions (EDTalk), region mixing and pure-emotion subtraction
  ``P(e) - P(neutral)`` (PC-Talk), or the emotion of a reference clip -> ``EMOTION`` keypoints;
* lip scale and loudness-scaled lips -> ``LIP``;  blinks and gaze (seeded) -> ``EYE``;
* head pose mode ``diffusion | reference | fixed`` -> pose only (every keypoint moves rigidly, expression kept).

Every change ramps the *effective* values (offsets, gains, pose weights) linearly over ``ramp_s``; a change
arriving mid-ramp starts from where the ramp is. The vocabulary and its validation are
:mod:`engine.motion.control_schema` (one schema for every motion generator).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from engine.keypoints import EMOTION, EYE, LIP, NUM_KP, MotionParams, SourceFace
from engine.motion.control_schema import HEAD_POSE_MODES, ControlState, ControlValueError
from engine.motion.emotion import (
    EmotionBank,
    ReferenceMotion,
    emotion_weights_label,
    region_mask,
)

MOUTH: tuple[int, ...] = tuple(k for k in EMOTION if k in LIP)
EYES_BROWS: tuple[int, ...] = tuple(k for k in EMOTION if k not in LIP)
GAZE_KEYPOINTS = (11, 15)  # the eye-ball keypoints Ditto's gaze fix moves (exp dims 33/34 and 45/46)


@dataclass(frozen=True)
class ControllerConfig:
    fps: int = 25
    seed: int = 0
    loud_floor_db: float = -60.0  # at or below: lips rest (gain 0)
    loud_ref_db: float = -20.0  # typical speech level: gain 1
    loud_max_gain: float = 1.5
    loud_smoothing: float = 0.5  # one-pole weight of the new loudness gain per frame
    blink_frames: int = 6  # 240 ms close-open
    blink_depth: float = 0.02  # eyelid offset (canonical units) at full closure
    gaze_amplitude: float = 0.004  # exp units, std of the gaze targets
    gaze_hold_s: tuple[float, float] = (0.8, 2.5)
    gaze_move_frames: int = 3


class _Effective(NamedTuple):
    emotion_offset: Tensor  # [21, 3]
    lip_scale: float
    loud_weight: float
    blink: float
    gaze: float
    pose_weights: Tensor  # [3]: diffusion, reference, fixed


def _blend(a: _Effective, b: _Effective, r: float) -> _Effective:
    return _Effective(
        a.emotion_offset * (1 - r) + b.emotion_offset * r,
        a.lip_scale * (1 - r) + b.lip_scale * r,
        a.loud_weight * (1 - r) + b.loud_weight * r,
        a.blink * (1 - r) + b.blink * r,
        a.gaze * (1 - r) + b.gaze * r,
        a.pose_weights * (1 - r) + b.pose_weights * r,
    )


def default_blink_vector() -> Tensor:
    """Eyelid closure direction ``[21, 3]``: -y on the EYE keypoints (approximate without the eye MLP)."""
    v = torch.zeros(NUM_KP, 3)
    v[list(EYE), 1] = -1.0
    return v


class MotionControls:
    """Per-frame application of a :class:`ControlState` to motion params relative to ``source``."""

    def __init__(
        self,
        source: SourceFace,
        bank: EmotionBank | None = None,
        config: ControllerConfig | None = None,
        state: ControlState | None = None,
        blink_vector: Tensor | None = None,
    ) -> None:
        self.source = source
        self.bank = bank or EmotionBank({})
        self.config = config or ControllerConfig()
        self._state = state or ControlState()
        self._reference: ReferenceMotion | None = None
        self._blink_vector = (blink_vector if blink_vector is not None else default_blink_vector()) * region_mask(EYE)
        target = self._effective(self._state)
        self._from, self._to, self._ramp_pos, self._ramp_len = target, target, 0, 0
        self.reset()

    @property
    def state(self) -> ControlState:
        return self._state

    @property
    def reference(self) -> ReferenceMotion | None:
        return self._reference

    def reset(self) -> None:
        """Restart the seeded blink / gaze schedules and the loudness follower."""
        cfg = self.config
        self._rng = np.random.default_rng(cfg.seed)
        self._next_blink = self._draw_blink_gap(0)
        self._blink_start = -(10**9)
        self._gaze_from = np.zeros(2)
        self._gaze_to = np.zeros(2)
        self._gaze_change = 0
        self._next_gaze = self._draw_gaze_hold(0)
        self._loud_gain = 1.0

    def set_reference(self, reference: ReferenceMotion | None) -> None:
        """Reference clip for ``head_pose = "reference"`` and ``emotion_source = "reference"``."""
        if reference is None and (self._state.head_pose == "reference" or self._state.emotion_source == "reference"):
            raise ControlValueError("the current state uses the reference clip; switch away from it first")
        self._reference = reference
        self._retarget(self._state)

    def update(self, message: Mapping[str, Any]) -> ControlState:
        """Validate and apply a control message (ramped from now); returns the new state."""
        new = self._state.apply(message)
        if self._reference is None and (new.head_pose == "reference" or new.emotion_source == "reference"):
            raise ControlValueError("no reference clip is set for this avatar (head_pose / emotion_source)")
        self._state = new
        self._retarget(new)
        return new

    def emotion_label(self) -> np.ndarray:
        """Ditto's 8-d emotion condition for the current state: the interpolation weights as a label blend, then
        blended with neutral by ``intensity`` (linearly extrapolated past 1, as far as the schema allows)."""
        s = self._state
        weights = {s.emotion: 1.0 - s.mix}
        if s.emotion_b is not None:
            weights[s.emotion_b] = weights.get(s.emotion_b, 0.0) + s.mix
        else:
            weights[s.emotion] = 1.0
        label = emotion_weights_label(weights)
        neutral = emotion_weights_label({"neutral": 1.0})
        return (neutral + s.intensity * (label - neutral)).astype(np.float32)

    def _retarget(self, state: ControlState) -> None:
        r = self._ramp_pos / self._ramp_len if self._ramp_len else 1.0
        self._from = _blend(self._from, self._to, r)  # a change mid-ramp starts where the ramp is
        self._to = self._effective(state)
        self._ramp_len = round(state.ramp_s * self.config.fps)
        self._ramp_pos = 0

    def _base_offset(self, name: str, pure: bool) -> Tensor:
        p = self.bank.get(name)
        return p - self.bank.get("neutral") if pure else p

    def _effective(self, s: ControlState) -> _Effective:
        if s.emotion_source == "reference" and self._reference is not None:
            emo = self._reference.emotion_offset.clone()
        else:
            emo = self._base_offset(s.emotion, s.pure_emotion)
            if s.emotion_b is not None:
                emo = emo * (1 - s.mix) + self._base_offset(s.emotion_b, s.pure_emotion) * s.mix
        if s.mouth_emotion is not None:
            m = region_mask(MOUTH)
            emo = emo * (1 - m) + self._base_offset(s.mouth_emotion, s.pure_emotion) * m
        if s.eyes_emotion is not None:
            m = region_mask(EYES_BROWS)
            emo = emo * (1 - m) + self._base_offset(s.eyes_emotion, s.pure_emotion) * m
        pose = torch.tensor([float(s.head_pose == mode) for mode in HEAD_POSE_MODES])
        return _Effective(
            emotion_offset=emo * s.intensity * region_mask(EMOTION),
            lip_scale=s.lip_scale,
            loud_weight=float(s.loudness_lips),
            blink=float(s.blink),
            gaze=float(s.gaze),
            pose_weights=pose,
        )

    # --- seeded natural motion ---

    def _draw_blink_gap(self, frame: int) -> int:
        rate = max(self._state.blink_rate, 1e-3)
        gap_s = 0.8 + self._rng.exponential(1.0 / rate)  # never two blinks closer than 0.8 s
        return frame + max(1, round(gap_s * self.config.fps))

    def _draw_gaze_hold(self, frame: int) -> int:
        lo, hi = self.config.gaze_hold_s
        return frame + max(1, round(self._rng.uniform(lo, hi) * self.config.fps))

    def _blink_amount(self, frame: int) -> float:
        n = self.config.blink_frames
        if frame >= self._next_blink:
            self._blink_start = frame
            self._next_blink = self._draw_blink_gap(frame)
        i = frame - self._blink_start
        return math.sin(math.pi * (i + 0.5) / n) if 0 <= i < n else 0.0

    def _gaze_offset(self, frame: int) -> np.ndarray:
        cfg = self.config
        if frame >= self._next_gaze:
            self._gaze_from = self._gaze_now(frame)
            self._gaze_to = np.clip(self._rng.normal(0.0, cfg.gaze_amplitude, 2), -3 * cfg.gaze_amplitude, None)
            self._gaze_to = np.clip(self._gaze_to, None, 3 * cfg.gaze_amplitude)
            self._gaze_change = frame
            self._next_gaze = self._draw_gaze_hold(frame)
        return self._gaze_now(frame)

    def _gaze_now(self, frame: int) -> np.ndarray:
        r = min(1.0, (frame - self._gaze_change + 1) / self.config.gaze_move_frames)
        return self._gaze_from * (1 - r) + self._gaze_to * r

    def _loudness_gain(self, loudness_db: float | None) -> float:
        cfg = self.config
        if loudness_db is None or not math.isfinite(loudness_db):
            target = 1.0
        else:
            target = (loudness_db - cfg.loud_floor_db) / (cfg.loud_ref_db - cfg.loud_floor_db)
            target = min(max(target, 0.0), cfg.loud_max_gain)
        self._loud_gain += cfg.loud_smoothing * (target - self._loud_gain)
        return self._loud_gain

    # --- per frame ---

    def apply(self, params: MotionParams, frame_index: int, loudness_db: float | None = None) -> MotionParams:
        """Batch-1 ``params`` (already relative to the source) -> controlled params for ``frame_index``."""
        if self._ramp_len and self._ramp_pos < self._ramp_len:
            self._ramp_pos += 1
        r = self._ramp_pos / self._ramp_len if self._ramp_len else 1.0
        eff = _blend(self._from, self._to, r)
        src = self.source.params
        exp = params.exp.clone()  # [1, 21, 3]

        loud = self._loudness_gain(loudness_db)
        gain = eff.lip_scale * ((1 - eff.loud_weight) + eff.loud_weight * loud)
        lip = list(LIP)
        exp[:, lip] = src.exp[:, lip] + (exp[:, lip] - src.exp[:, lip]) * gain

        exp = exp + eff.emotion_offset.to(exp)[None]
        blink = self._blink_amount(frame_index)
        if eff.blink > 0 and blink > 0:
            exp = exp + (eff.blink * blink * self.config.blink_depth) * self._blink_vector.to(exp)[None]
        gaze = self._gaze_offset(frame_index) * eff.gaze
        if eff.gaze > 0:
            for k in GAZE_KEYPOINTS:
                exp[:, k, 0] += float(gaze[0])
                exp[:, k, 1] += float(gaze[1])

        pitch, yaw, roll, t = params.pitch, params.yaw, params.roll, params.t
        w_d, w_r, w_f = (float(w) for w in eff.pose_weights)
        if w_d < 1.0:
            ref = self._reference_pose(frame_index)
            poses = []
            for i, name in enumerate(("pitch", "yaw", "roll")):
                driven, fixed = getattr(params, name), getattr(src, name)
                poses.append(w_d * driven + w_f * fixed + w_r * (fixed + ref[i]))
            pitch, yaw, roll = poses
            t = w_d * params.t + w_f * src.t + w_r * (src.t + ref[3:6].to(src.t)[None])
        return MotionParams(scale=params.scale, pitch=pitch, yaw=yaw, roll=roll, t=t, exp=exp)

    def _reference_pose(self, frame: int) -> Tensor:
        """Reference clip pose offsets at ``frame`` ``[7]``, looped back and forth (Ditto's mirror index)."""
        if self._reference is None:
            return torch.zeros(7)
        pose = self._reference.pose
        n = pose.shape[0]
        if n == 1:
            return pose[0]
        period = 2 * (n - 1)
        i = frame % period
        return pose[i if i < n else period - i]
