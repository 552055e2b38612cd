"""Live motion controls: validated frozen state, applied per frame with smooth ramps (no pops).

Controls and the keypoints they may move (``engine.keypoints`` region sets):

* emotion x intensity, interpolation between two emotions (EDTalk), region mixing and pure-emotion subtraction
  ``P(e) - P(neutral)`` (PC-Talk), or the emotion of a reference clip -> ``EMOTION`` keypoints;
* lip scale and loudness-scaled lips -> ``LIP``;  blinks and gaze (seeded) -> ``EYE``;
* head pose mode ``diffusion | reference | fixed`` -> pose only (every keypoint moves rigidly, expression kept).

Emotions with a stored example (an :class:`EmotionBank` entry, ``engine emotion add``) are applied as keypoint
offsets (EP-Talk's and PC-Talk's emotional deformation); the others go to Ditto's emotion condition
(:meth:`MotionControls.emotion_label`), so each emotion of a state acts through exactly one of the two. A blink
closes the eyes through LivePortrait's eye retargeting network and an open source mouth closes at rest through the
lip network (:class:`engine.motion.retarget.Retargeting`), when the stage is given them.

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
from engine.motion.retarget import Retargeting

MOUTH: tuple[int, ...] = tuple(k for k in EMOTION if k in LIP)
EYES_BROWS: tuple[int, ...] = tuple(k for k in EMOTION if k not in LIP)
GAZE_KEYPOINTS = (11, 15)  # the eye-ball keypoints Ditto's gaze fix moves (exp dims 33/34 and 45/46)
NEVER = 2**62  # the next blink at blink rate 0


@dataclass(frozen=True)
class ControllerConfig:
    fps: int = 25
    seed: int = 0
    loud_floor_db: float = -60.0  # at or below: lips rest (gain 0)
    loud_ref_db: float = -20.0  # typical speech level: gain 1
    loud_max_gain: float = 1.5
    loud_smoothing: float = 0.5  # one-pole weight of the new loudness gain per frame
    blink_frames: int = 6  # 240 ms close-open
    blink_depth: float = 0.02  # eyelid offset (canonical units) at full closure without the eye network
    min_blink_gap_s: float = 0.35  # never two blinks closer than this
    rest_lips_db: tuple[float, float] = (-50.0, -60.0)  # loudness from which an open source mouth closes .. fully
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
        retargeting: Retargeting | None = None,
    ) -> None:
        self.source = source
        self.bank = bank or EmotionBank({})
        self.config = config or ControllerConfig()
        self._state = state or ControlState()
        self._reference: ReferenceMotion | None = None
        self._blink_vector = (blink_vector if blink_vector is not None else default_blink_vector()) * region_mask(EYE)
        self.retargeting = retargeting
        self._frame = 0  # the next frame apply() will see (a changed blink rate re-draws the next blink from it)
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
        self._frame = 0
        self._next_blink = self._draw_blink_gap(0)
        self._blink_start = -(10**9)
        self._gaze_from = np.zeros(2)
        self._gaze_to = np.zeros(2)
        self._gaze_change = 0
        self._next_gaze = self._draw_gaze_hold(0)
        self._loud_gain = 1.0
        self._rest_level: float | None = None

    def set_reference(self, reference: ReferenceMotion | None) -> None:
        """Reference clip for ``head_pose = "reference"`` and ``emotion_source = "reference"``."""
        if reference is None and (self._state.head_pose == "reference" or self._state.emotion_source == "reference"):
            raise ControlValueError("the current state uses the reference clip; switch away from it first")
        self._reference = reference
        self._retarget(self._state)

    def set_bank(self, bank: EmotionBank) -> None:
        """New stored emotions (an example was added or removed); the current state ramps to its new offsets."""
        self.bank = bank
        self._retarget(self._state)

    def update(self, message: Mapping[str, Any]) -> ControlState:
        """Validate and apply a control message (ramped from now); returns the new state."""
        new = self._state.apply(message)
        if self._reference is None and (new.head_pose == "reference" or new.emotion_source == "reference"):
            raise ControlValueError("no reference clip is set for this avatar (head_pose / emotion_source)")
        old_rate, self._state = self._state.blink_rate, new
        self._retarget(new)
        if new.blink_rate != old_rate:  # the pending blink was drawn at the old rate: draw it again from now
            self._next_blink = self._draw_blink_gap(self._frame)
        return new

    def emotion_label(self) -> np.ndarray:
        """Ditto's 8-d emotion condition for the current state: the interpolation weights as a label blend, then
        blended with neutral by ``intensity`` (linearly extrapolated past 1, as far as the schema allows).

        An emotion with a stored example acts through its keypoint offset instead, so its share of the label is
        neutral's; so is the whole label while the emotion comes from the reference clip."""
        s = self._state
        weights: dict[str, float] = {}
        if s.emotion_source == "reference" and self._reference is not None:
            weights["neutral"] = 1.0
        else:
            slots = [(s.emotion, 1.0 - s.mix), (s.emotion_b, s.mix)] if s.emotion_b is not None else [(s.emotion, 1.0)]
            for name, w in slots:
                key = "neutral" if self.bank.has(name) else name
                weights[key] = weights.get(key, 0.0) + w
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
        return self.bank.pure(name) if pure else self.bank.get(name)

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
        """Start frame of the next blink after ``frame`` at the current rate (never, at rate 0). The intervals are
        gamma(4) distributed with mean ``1 / rate``: fairly regular, as people blink, and at least
        ``min_blink_gap_s`` apart."""
        rate = self._state.blink_rate
        if rate <= 0:
            return NEVER
        gap_s = max(self.config.min_blink_gap_s, float(self._rng.gamma(4.0, 1.0 / (4.0 * rate))))
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

        self._frame = frame_index + 1
        loud = self._loudness_gain(loudness_db)
        gain = eff.lip_scale * ((1 - eff.loud_weight) + eff.loud_weight * loud)
        lip = list(LIP)
        exp[:, lip] = src.exp[:, lip] + (exp[:, lip] - src.exp[:, lip]) * gain
        rest = self._rest_weight(loudness_db)
        if self.retargeting is not None and rest > 0:
            closing = self.retargeting.rest_lips(rest, params.scale)
            if closing is not None:
                exp = exp + closing.to(exp)

        exp = exp + eff.emotion_offset.to(exp)[None]
        blink = self._blink_amount(frame_index)
        if eff.blink > 0 and blink > 0:
            shut = self.retargeting.blink(eff.blink * blink, params.scale) if self.retargeting is not None else None
            if shut is not None:
                exp = exp + shut.to(exp)
            else:
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

    def _rest_weight(self, loudness_db: float | None) -> float:
        """How far an open source mouth closes: 0 while speech is louder than ``rest_lips_db[0]``, 1 at or below
        ``rest_lips_db[1]`` (follows the smoothed loudness, so pauses close it smoothly)."""
        if loudness_db is None or not math.isfinite(loudness_db):
            return 0.0
        start, full = self.config.rest_lips_db
        prev = loudness_db if self._rest_level is None else self._rest_level
        level = self._rest_level = prev + self.config.loud_smoothing * (loudness_db - prev)
        return min(max((start - level) / max(start - full, 1e-6), 0.0), 1.0)

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
