"""Emotion vocabulary and emotion sources: Ditto soft labels, per-emotion keypoint offsets, reference clips.

Class order is MEAD's, as in Ditto's condition (docs/spec/ditto.md §1.2): angry, disgusted, fear, happy, neutral, sad,
surprised, contempt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from engine.keypoints import EMOTION, NUM_KP, MotionParams, params_from_motion

EMOTIONS: tuple[str, ...] = ("angry", "disgusted", "fear", "happy", "neutral", "sad", "surprised", "contempt")
NEUTRAL = EMOTIONS.index("neutral")
SOFT_LABEL_PEAK = 8.0  # Ditto: softmax of 8 on the chosen labels, 0 elsewhere


def emotion_index(name: str) -> int:
    if not isinstance(name, str) or name.lower() not in EMOTIONS:
        raise ValueError(f"unknown emotion {name!r}; choose one of {list(EMOTIONS)}")
    return EMOTIONS.index(name.lower())


def emotion_soft_label(labels: Iterable[str] | str = "neutral") -> np.ndarray:
    """Ditto's 8-d emotion condition for a label set: softmax of 8 on the labels, 0 elsewhere -> ``[8]``."""
    names = [labels] if isinstance(labels, str) else list(labels)
    logits = np.zeros(len(EMOTIONS))
    for name in names:
        logits[emotion_index(name)] = SOFT_LABEL_PEAK
    e = np.exp(logits - logits.max())
    return (e / e.sum()).astype(np.float32)


def emotion_weights_label(weights: Mapping[str, float]) -> np.ndarray:
    """Blend of single-label soft labels by ``weights`` (normalised) -> ``[8]`` (for interpolated emotions)."""
    total = sum(weights.values())
    if total <= 0:
        return emotion_soft_label("neutral")
    return sum((w / total) * emotion_soft_label(name) for name, w in weights.items())  # type: ignore[return-value]


class EmotionBank:
    """Keypoint offsets ``P(e)`` ``[21, 3]`` per emotion, zero outside ``engine.keypoints.EMOTION``.

    Sources: the IEDP head applied to each emotion's embedding (:meth:`from_head`), stored examples (photos or
    clips of the emotion, ``engine emotion add``, see :mod:`engine.motion.library`), or explicit arrays (tests).
    ``pure`` gives an emotion's pure offset ``P(e) - P(neutral)`` (PC-Talk) directly, for examples that came with
    their own neutral example; without it the pure offset subtracts the bank's ``neutral``. ``missing`` says why
    an emotion has no offset (shown when a control that needs one is refused).
    """

    def __init__(
        self,
        offsets: Mapping[str, Tensor],
        pure: Mapping[str, Tensor] | None = None,
        missing: Mapping[str, str] | None = None,
    ) -> None:
        mask = region_mask(EMOTION)
        self.offsets: dict[str, Tensor] = {}
        self.pure_offsets: dict[str, Tensor] = {}
        for target, given in ((self.offsets, offsets), (self.pure_offsets, pure or {})):
            for name, value in given.items():
                emotion_index(name)
                if tuple(value.shape) != (NUM_KP, 3):
                    raise ValueError(f"emotion offset for {name!r} must be [{NUM_KP}, 3], got {list(value.shape)}")
                target[name.lower()] = value.detach().to(torch.float32).cpu() * mask
        self.stored = frozenset(self.offsets)  # the emotions that have an offset of their own
        self.missing = {k.lower(): v for k, v in (missing or {}).items()}
        if "neutral" not in self.offsets:
            self.offsets["neutral"] = torch.zeros(NUM_KP, 3)

    @classmethod
    def from_head(cls, head: Callable[[Tensor], Any], embed: Callable[[str], Tensor]) -> EmotionBank:
        """``head(features [1, T, C]).offsets [1, 21, 3]`` for each emotion's features ``embed(name)``."""
        with torch.no_grad():
            return cls({name: head(embed(name)).offsets[0] for name in EMOTIONS})

    def has(self, name: str) -> bool:
        """Whether ``name`` has an offset of its own (else it is zero and the caller uses another source)."""
        return EMOTIONS[emotion_index(name)] in self.stored

    def why_missing(self, name: str) -> str:
        return self.missing.get(EMOTIONS[emotion_index(name)], "no stored example")

    def get(self, name: str) -> Tensor:
        idx = emotion_index(name)
        return self.offsets.get(EMOTIONS[idx], torch.zeros(NUM_KP, 3))

    def pure(self, name: str) -> Tensor:
        """``P(e) - P(neutral)``: only what the emotion adds (PC-Talk's pure emotional deformation)."""
        key = EMOTIONS[emotion_index(name)]
        if key in self.pure_offsets:
            return self.pure_offsets[key]
        return self.get(key) - self.get("neutral")


def region_mask(region: Iterable[int]) -> Tensor:
    """``[21, 1]`` float mask, 1 on the keypoints of ``region``."""
    mask = torch.zeros(NUM_KP, 1)
    mask[list(region)] = 1.0
    return mask


class ReferenceMotion(NamedTuple):
    """Motion of a reference clip, decoded per frame by a motion extractor."""

    params: MotionParams  # batch T
    emotion_offset: Tensor  # [21, 3] mean expression change over the clip, EMOTION keypoints only
    pose: Tensor  # [T, 7]: pitch, yaw, roll (deg), tx, ty, tz, scale relative to the clip's first frame


def reference_motion(frames: Tensor, motion_net: Callable[[Tensor], Any], batch: int = 16) -> ReferenceMotion:
    """Run ``motion_net`` (LivePortrait M; outputs with fields pitch, yaw, roll, t, exp, scale) on ``frames``.

    ``frames [T, 3, H, W]`` in the extractor's input format. The emotion offset is the clip's mean expression
    minus its least-expressive frame (smallest expression norm on the EMOTION keypoints, taken as the clip's
    neutral), so identity-specific shape cancels out.
    """
    if frames.ndim != 4 or frames.shape[0] < 1:
        raise ValueError(f"reference frames must be [T, 3, H, W] with T >= 1, got {list(frames.shape)}")
    outs = []
    with torch.no_grad():
        for i in range(0, frames.shape[0], batch):
            o = motion_net(frames[i : i + batch])
            outs.append(params_from_motion(o.pitch, o.yaw, o.roll, o.t, o.exp, o.scale))
    params = MotionParams(*(torch.cat([getattr(p, f) for p in outs]) for f in MotionParams._fields))
    mask = region_mask(EMOTION)
    exp = params.exp * mask  # [T, 21, 3]
    neutral = exp[int(exp.flatten(1).norm(dim=1).argmin())]
    pose = torch.cat(
        [
            torch.stack([params.pitch, params.yaw, params.roll], 1),
            params.t,
            params.scale,
        ],
        1,
    )  # [T, 7]
    return ReferenceMotion(params=params, emotion_offset=exp.mean(0) - neutral, pose=pose - pose[:1])
