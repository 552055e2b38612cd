"""LivePortrait keypoint math: pose bins, rotation, keypoint transform, stitching and retargeting calls.

Conventions are the reference implementation's (row vectors, ``R = (R_z R_y R_x)^T``,
``x = s * (x_c R + delta) + (t_x, t_y, 0)``); see ``docs/spec/liveportrait.md`` §6.
Every function is batched and differentiable; nothing here owns weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

NUM_KP = 21
NUM_BINS = 66

# Region index sets of the seed papers (EP-Talk / PC-Talk), used by the displacement heads and controls.
LIP: tuple[int, ...] = (6, 12, 14, 17, 19, 20)
EYE: tuple[int, ...] = (11, 13, 15, 16, 18)  # Ditto's eye keypoints (kept by its motion stitch)
EMOTION: tuple[int, ...] = (1, 2, 6, 12, 13, 14, 16, 17, 18, 19, 20)
HEAD: tuple[int, ...] = tuple(range(NUM_KP))

Net = Callable[[Tensor], Tensor]


class MotionParams(NamedTuple):
    """Decoded per-frame motion of one face (pose in degrees)."""

    scale: Tensor  # [B, 1]
    pitch: Tensor  # [B] degrees
    yaw: Tensor  # [B] degrees
    roll: Tensor  # [B] degrees
    t: Tensor  # [B, 3]
    exp: Tensor  # [B, 21, 3]


class SourceFace(NamedTuple):
    """An avatar's face in one renderer's keypoint space (what motion and keypoint stages need)."""

    kp_canonical: Tensor  # [21, 3]
    params: MotionParams  # batch 1: the portrait's own pose / expression
    kp_source: Tensor  # [21, 3] transformed source keypoints


def rest_lips(params: MotionParams, rest: MotionParams, weight: float) -> MotionParams:
    """``params`` with the LIP keypoints' expression moved ``weight`` (0..1) of the way to ``rest``'s: the mouth
    closes to the portrait's own, the head and the other keypoints stay (used to end speech on an interrupt)."""
    lips = list(LIP)
    exp = params.exp.clone()  # [B, 21, 3]
    exp[:, lips] = exp[:, lips] + weight * (rest.exp[:, lips].to(exp) - exp[:, lips])
    return params._replace(exp=exp)


def bins_to_degrees(logits: Tensor) -> Tensor:
    """66 pose-bin logits -> degrees: ``softmax . arange(66) * 3 - 97.5``; ``[..., 66] -> [...]``."""
    if logits.shape[-1] != NUM_BINS:
        raise ValueError(f"pose logits must have {NUM_BINS} bins in the last dim, got shape {tuple(logits.shape)}")
    idx = torch.arange(NUM_BINS, dtype=logits.dtype, device=logits.device)
    return (torch.softmax(logits, dim=-1) * idx).sum(dim=-1) * 3.0 - 97.5


def rotation_matrix(pitch: Tensor, yaw: Tensor, roll: Tensor) -> Tensor:
    """Degrees ``[B]`` each -> ``(R_z R_y R_x)^T`` ``[B, 3, 3]`` (the reference's row-vector convention)."""
    x, y, z = (a.reshape(-1) / 180.0 * math.pi for a in (pitch, yaw, roll))
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    rx = torch.stack([one, zero, zero, zero, x.cos(), -x.sin(), zero, x.sin(), x.cos()], 1).view(-1, 3, 3)
    ry = torch.stack([y.cos(), zero, y.sin(), zero, one, zero, -y.sin(), zero, y.cos()], 1).view(-1, 3, 3)
    rz = torch.stack([z.cos(), -z.sin(), zero, z.sin(), z.cos(), zero, zero, zero, one], 1).view(-1, 3, 3)
    return (rz @ ry @ rx).transpose(1, 2)


def transform_keypoints(kp_canonical: Tensor, rot: Tensor, exp: Tensor, scale: Tensor, t: Tensor) -> Tensor:
    """``x = s * (x_c R + delta) + (t_x, t_y, 0)``.

    Shapes: kp_canonical, exp ``[B, 21, 3]``; rot ``[B, 3, 3]``; scale ``[B, 1]``; t ``[B, 3]`` -> ``[B, 21, 3]``.
    The reference ignores t_z; so do we.
    """
    x = scale.reshape(-1, 1, 1) * (kp_canonical @ rot + exp)
    shift = torch.cat([t[:, :2], torch.zeros_like(t[:, 2:3])], dim=1)  # [B, 3]
    return x + shift[:, None, :]


def params_from_motion(pitch: Tensor, yaw: Tensor, roll: Tensor, t: Tensor, exp: Tensor, scale: Tensor) -> MotionParams:
    """Raw motion-extractor heads (bin logits, flat exp) -> :class:`MotionParams`."""
    return MotionParams(
        scale=scale.reshape(-1, 1),
        pitch=bins_to_degrees(pitch),
        yaw=bins_to_degrees(yaw),
        roll=bins_to_degrees(roll),
        t=t,
        exp=exp.reshape(-1, NUM_KP, 3),
    )


def keypoints_from_params(kp_canonical: Tensor, params: MotionParams) -> Tensor:
    """Canonical keypoints ``[B, 21, 3]`` driven by ``params`` -> transformed keypoints ``[B, 21, 3]``."""
    rot = rotation_matrix(params.pitch, params.yaw, params.roll)
    return transform_keypoints(kp_canonical.reshape(-1, NUM_KP, 3), rot, params.exp, params.scale, params.t)


def relative_params(source: MotionParams, driving: MotionParams, driving_ref: MotionParams) -> MotionParams:
    """Relative driving of an image source (reference "pose-friendly" default).

    Scale, translation and expression follow the reference exactly. The reference composes rotations as
    matrices; here the pose stays in degrees (so controls can ramp and clip it) and the angles are composed
    additively, which agrees with the matrix form to first order in the relative rotation. Callers that need
    the exact matrix form use :func:`relative_rotation`.
    """
    return MotionParams(
        scale=source.scale * (driving.scale / driving_ref.scale),
        pitch=source.pitch + (driving.pitch - driving_ref.pitch),
        yaw=source.yaw + (driving.yaw - driving_ref.yaw),
        roll=source.roll + (driving.roll - driving_ref.roll),
        t=torch.cat([(source.t + driving.t - driving_ref.t)[:, :2], torch.zeros_like(source.t[:, 2:3])], 1),
        exp=source.exp + (driving.exp - driving_ref.exp),
    )


def relative_rotation(rot_driving: Tensor, rot_driving_ref: Tensor, rot_source: Tensor) -> Tensor:
    """``R_new = (R_d,i R_d,0^T) R_s`` on ``[B, 3, 3]`` matrices (the reference's exact composition)."""
    return rot_driving @ rot_driving_ref.transpose(1, 2) @ rot_source


# --- stitching and retargeting (the MLPs are passed in; this module owns only the calling convention) ---


def stitch(stitching: Net, x_s: Tensor, x_d: Tensor) -> Tensor:
    """Apply the stitching MLP: ``x_d + delta[:63]`` and the shared ``(tx, ty)`` of ``delta[63:65]``."""
    b = x_s.shape[0]
    delta = stitching(torch.cat([x_s.reshape(b, -1), x_d.reshape(b, -1)], dim=1))  # [B, 65]
    out = x_d + delta[:, : NUM_KP * 3].reshape(b, NUM_KP, 3)
    shift = torch.cat([delta[:, NUM_KP * 3 :], torch.zeros_like(delta[:, :1])], dim=1)  # [B, 3]
    return out + shift[:, None, :]


def eye_retarget_delta(eye: Net, x_s: Tensor, eye_ratio_source: Tensor, eye_ratio_target: Tensor) -> Tensor:
    """Eye retargeting offset ``[B, 21, 3]``; ratios ``[B, 2]`` (left, right of the source) and ``[B, 1]``."""
    b = x_s.shape[0]
    inp = torch.cat([x_s.reshape(b, -1), eye_ratio_source.reshape(b, 2), eye_ratio_target.reshape(b, 1)], 1)
    return eye(inp).reshape(b, NUM_KP, 3)


def lip_retarget_delta(lip: Net, x_s: Tensor, lip_ratio_source: Tensor, lip_ratio_target: Tensor) -> Tensor:
    """Lip retargeting offset ``[B, 21, 3]``; ratios ``[B, 1]`` each (0 target = "lip normalisation")."""
    b = x_s.shape[0]
    inp = torch.cat([x_s.reshape(b, -1), lip_ratio_source.reshape(b, 1), lip_ratio_target.reshape(b, 1)], 1)
    return lip(inp).reshape(b, NUM_KP, 3)


def _dist(lmk: Tensor, i: int, j: int) -> Tensor:
    return torch.linalg.vector_norm(lmk[:, i] - lmk[:, j], dim=-1)


def eye_open_ratio(lmk: Tensor) -> Tensor:
    """203-point LivePortrait landmarks ``[B, 203, 2]`` -> ``[B, 2]`` (left, right) open ratios."""
    left = _dist(lmk, 6, 18) / (_dist(lmk, 0, 12) + 1e-6)
    right = _dist(lmk, 30, 42) / (_dist(lmk, 24, 36) + 1e-6)
    return torch.stack([left, right], dim=1)


def lip_open_ratio(lmk: Tensor) -> Tensor:
    """203-point LivePortrait landmarks ``[B, 203, 2]`` -> ``[B, 1]`` lip open ratio."""
    return (_dist(lmk, 90, 102) / (_dist(lmk, 48, 66) + 1e-6))[:, None]
