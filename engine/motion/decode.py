"""Ditto's 265-d motion vectors <-> engine :class:`MotionParams`, motion stitch (docs/spec/ditto.md §5.5) and clipping.

Layout (``docs/spec/ditto.md`` §1.1): ``[scale - 1 | pitch 66 logits | yaw 66 | roll 66 | t 3 | exp 63]``. Ditto keeps
pose as bin logits everywhere and decodes degrees only when building keypoints; :class:`MotionParams` carries
degrees, so encoding degrees back into logits needs a choice of logit shape (see :func:`degrees_to_logits`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from engine.keypoints import EYE, LIP, NUM_BINS, NUM_KP, MotionParams, SourceFace, bins_to_degrees

MOTION_DIM = 265
SCALE = slice(0, 1)
PITCH = slice(1, 67)
YAW = slice(67, 133)
ROLL = slice(133, 199)
T = slice(199, 202)
EXP = slice(202, 265)
POSE_DIMS = 202  # scale, pose logits and t: the dims Ditto smooths over time
BIN_CENTRES = torch.arange(NUM_BINS, dtype=torch.float64) * 3.0 - 97.5  # degrees of each pose bin
LOGIT_SIGMA_BINS = 1.5  # width of the encoded pose distribution (LivePortrait's heads are similarly peaked)


def decode_motion(v: Tensor) -> MotionParams:
    """``[N, 265]`` motion vectors -> :class:`MotionParams` (batch N; degrees decoded from the logits)."""
    if v.ndim != 2 or v.shape[1] != MOTION_DIM:
        raise ValueError(f"motion vectors must be [N, {MOTION_DIM}], got {list(v.shape)}")
    return MotionParams(
        scale=v[:, SCALE] + 1.0,
        pitch=bins_to_degrees(v[:, PITCH]),
        yaw=bins_to_degrees(v[:, YAW]),
        roll=bins_to_degrees(v[:, ROLL]),
        t=v[:, T],
        exp=v[:, EXP].reshape(-1, NUM_KP, 3),
    )


def degrees_to_logits(deg: Tensor, sigma_bins: float = LOGIT_SIGMA_BINS) -> Tensor:
    """Degrees ``[N]`` -> 66 bin logits ``[N, 66]`` whose decoded angle equals ``deg`` (to ~1e-4 degrees).

    A Gaussian over the bins, its centre corrected by a few secant steps because truncation at the ends of
    the bin range biases the expectation (solved by Newton steps). Angles are clamped to [-96, 96] degrees.
    """
    target = deg.detach().to(torch.float64).reshape(-1).clamp(-96.0, 96.0)
    centres = BIN_CENTRES.to(target.device)
    width = sigma_bins * 3.0

    def logits_at(mu: Tensor) -> Tensor:
        return -0.5 * ((centres[None] - mu[:, None]) / width) ** 2  # [N, 66]

    mu = target.clone()
    for _ in range(8):  # Newton steps with a numerical slope (the slope drops below 1 near the range ends)
        f = bins_to_degrees(logits_at(mu))
        slope = (bins_to_degrees(logits_at(mu + 1e-4)) - f) / 1e-4
        mu = mu - (f - target) / slope.clamp_min(1e-3)
    return logits_at(mu).to(deg.dtype if deg.is_floating_point() else torch.float32)


def encode_motion(params: MotionParams) -> Tensor:
    """:class:`MotionParams` (batch N) -> ``[N, 265]`` motion vectors (pose via :func:`degrees_to_logits`)."""
    n = params.exp.shape[0]
    dtype = params.exp.dtype
    return torch.cat(
        [
            params.scale.reshape(n, 1) - 1.0,
            degrees_to_logits(params.pitch).to(dtype),
            degrees_to_logits(params.yaw).to(dtype),
            degrees_to_logits(params.roll).to(dtype),
            params.t.reshape(n, 3),
            params.exp.reshape(n, NUM_KP * 3),
        ],
        dim=1,
    )


@dataclass(frozen=True)
class MotionBounds:
    """Per-dimension clip range of motion vectors (``lo``/``hi`` ``[265]``); keeps a diverging sample on screen."""

    lo: tuple[float, ...]
    hi: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.lo) != MOTION_DIM or len(self.hi) != MOTION_DIM:
            raise ValueError(f"MotionBounds need {MOTION_DIM} values each, got {len(self.lo)} and {len(self.hi)}")
        if any(not (a <= b) for a, b in zip(self.lo, self.hi, strict=True)):
            raise ValueError("MotionBounds: every lo must be <= hi (and not NaN)")

    @classmethod
    def default(cls) -> MotionBounds:
        """Generous physical ranges: scale in [0.5, 2], logits +-40, t in [-1, 1], exp in [-0.5, 0.5]."""
        lo = np.empty(MOTION_DIM)
        hi = np.empty(MOTION_DIM)
        lo[SCALE], hi[SCALE] = -0.5, 1.0
        lo[1:199], hi[1:199] = -40.0, 40.0
        lo[T], hi[T] = -1.0, 1.0
        lo[EXP], hi[EXP] = -0.5, 0.5
        return cls(tuple(lo.tolist()), tuple(hi.tolist()))

    def clip(self, v: Tensor) -> Tensor:
        """Clip ``[..., 265]`` per dimension (NaN becomes the range's lower end, so it can never leak out)."""
        lo = torch.tensor(self.lo, dtype=v.dtype, device=v.device)
        hi = torch.tensor(self.hi, dtype=v.dtype, device=v.device)
        return torch.where(v.isnan(), lo.expand_as(v), v.clamp(lo, hi))


# Ditto's gaze fix (docs/spec/ditto.md §5.5): exp dims of both eye-ball keypoints move with the head's yaw/pitch
_GAZE_X = ((33, 0.0007, 0.001), (45, 0.001, 0.0007))
_GAZE_Y = (34, 46)


class MotionStitch:
    """Ditto's relative motion for an image source: ``x = x_s + (x_d - d0)`` then region resets and gaze fix.

    ``x_s`` is the source's motion vector (encoded from ``source.params`` unless given, e.g. raw extractor
    logits); ``d0`` is the first driving frame seen (or :meth:`set_reference`). Scale stays the source's; the
    expression of keypoints outside ``keep`` (Ditto: lips + eyes) stays the source's.
    """

    def __init__(
        self,
        source: SourceFace,
        source_motion: Tensor | None = None,
        keep: Sequence[int] = LIP + EYE,
        gaze_fix: bool = True,
    ) -> None:
        x_s = source_motion if source_motion is not None else encode_motion(source.params)
        self.x_s = x_s.reshape(1, MOTION_DIM).to(torch.float32)  # [1, 265]
        keep_set = set(keep)
        mask = torch.zeros(NUM_KP, 3, dtype=torch.bool)
        mask[[k for k in range(NUM_KP) if k in keep_set]] = True
        self._exp_keep = mask.reshape(-1).to(self.x_s.device)  # [63]
        self.gaze_fix = gaze_fix
        self.d0: Tensor | None = None
        self._src_pitch = bins_to_degrees(self.x_s[:, PITCH])  # [1]
        self._src_yaw = bins_to_degrees(self.x_s[:, YAW])

    def set_reference(self, d0: Tensor | None) -> None:
        """Driving reference frame ``[265]`` (None: the next driving frame becomes the reference)."""
        self.d0 = None if d0 is None else d0.reshape(1, MOTION_DIM).to(torch.float32)

    def relative(self, x_d: Tensor) -> Tensor:
        """Driving vectors ``[N, 265]`` -> stitched vectors ``[N, 265]`` (still Ditto layout)."""
        if self.d0 is None:
            self.d0 = x_d[:1].detach().clone()
        x = self.x_s + (x_d - self.d0)
        x[:, SCALE] = self.x_s[:, SCALE]
        exp = torch.where(self._exp_keep[None], x[:, EXP], self.x_s[:, EXP])
        if self.gaze_fix:
            dx = 0.26 * (bins_to_degrees(x[:, YAW]) - self._src_yaw)  # [N]
            dy = 0.28 * (bins_to_degrees(x[:, PITCH]) - self._src_pitch)
            shift = torch.zeros_like(exp)
            for dim, pos, neg in _GAZE_X:
                shift[:, dim] = dx * torch.where(dx > 0, pos, neg)
            for dim in _GAZE_Y:
                shift[:, dim] = -0.001 * dy
            exp = exp + shift
        x[:, EXP] = exp
        return x

    def __call__(self, x_d: Tensor) -> MotionParams:
        return decode_motion(self.relative(x_d))
