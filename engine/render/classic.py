"""Weight-free warp-only renderer (classic mode): analytic dense flow from the 21 keypoints + a drawn mouth.

Keypoints come from 68-point landmarks (``engine68`` / iBUG order) so the region sets of ``engine.keypoints``
land on the matching facial parts: LIP on mouth corners, inner lip edges and chin, EYE on the lids and glabella,
EMOTION adds the brows. Coordinates are normalised crop coordinates in [-1, 1] (x right, y down, z 0), the
``grid_sample(align_corners=False)`` convention, so pixel ``p`` maps to ``(2 p + 1) / S - 1``.

Rendering: every keypoint carries an anisotropic Gaussian footprint; the backward flow at an output pixel is
the weight-normalised sum of the keypoints' ``source - driving`` displacements, with a constant background
weight that keeps far pixels still. The flow is evaluated at a low resolution and upsampled (it is smooth),
then the portrait is grid-sampled. Inside the driven lip contour a mouth cavity (dark, with a teeth hint)
is blended in proportion to the lip gap, so opening the jaw shows speech instead of stretched lips.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from engine.avatar.landmarks import CLASSIC_SCHEMES
from engine.avatar.record import Avatar
from engine.keypoints import NUM_KP, MotionParams, SourceFace, keypoints_from_params
from engine.render.base import PreparedAvatar

# Footprint (sigma_x, sigma_y) of each keypoint in units of the inter-ocular distance.
_SIGMA = (
    (0.80, 0.45),  # 0 forehead
    (0.30, 0.14),  # 1 left brow
    (0.30, 0.14),  # 2 right brow
    (0.22, 0.20),  # 3 nose tip
    (0.30, 0.30),  # 4 left cheek
    (0.30, 0.30),  # 5 right cheek
    (0.13, 0.11),  # 6 left mouth corner
    (0.35, 0.35),  # 7 left jaw
    (0.35, 0.35),  # 8 right jaw
    (0.15, 0.25),  # 9 nose bridge
    (0.60, 0.30),  # 10 neck
    (0.18, 0.10),  # 11 left upper lid
    (0.13, 0.11),  # 12 right mouth corner
    (0.18, 0.08),  # 13 left lower lid
    (0.24, 0.10),  # 14 upper lip
    (0.18, 0.10),  # 15 right upper lid
    (0.18, 0.08),  # 16 right lower lid
    (0.24, 0.12),  # 17 lower lip
    (0.12, 0.12),  # 18 glabella
    (0.45, 0.20),  # 19 chin
    (0.30, 0.14),  # 20 below the lower lip
)
_BACKGROUND = 0.02  # constant weight of the "no motion" component
_EPS2 = 0.03  # Shepard-style sharpening: weights ~ gauss / (r^2 + eps^2) pin each keypoint's own motion


class ClassicState(NamedTuple):
    portrait: torch.Tensor  # [3, S, S] float in [0, 1]
    sigma: torch.Tensor  # [21, 2] normalised footprint
    iod: float  # inter-ocular distance, normalised units


def keypoints_from_landmarks(landmarks: np.ndarray, size: int) -> np.ndarray:
    """68-point landmarks ``[68, 2]`` (crop pixels) -> classic keypoints ``[21, 3]`` normalised, z = 0."""
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (68, 2):
        raise ValueError(f"classic mode needs 68-point landmarks [68, 2], got shape {lm.shape}")

    def mean(*idx: int) -> np.ndarray:
        return lm[list(idx)].mean(axis=0)

    eye_l, eye_r = mean(36, 37, 38, 39, 40, 41), mean(42, 43, 44, 45, 46, 47)
    iod = float(np.linalg.norm(eye_r - eye_l))
    down = np.array([0.0, 1.0])
    kp = np.stack(
        [
            mean(19, 24) - 0.45 * iod * down,  # 0 forehead
            mean(18, 19, 20),  # 1 left brow
            mean(23, 24, 25),  # 2 right brow
            lm[30],  # 3 nose tip
            mean(3, 31, 41),  # 4 left cheek
            mean(13, 35, 46),  # 5 right cheek
            lm[48],  # 6 left mouth corner
            lm[5],  # 7 left jaw
            lm[11],  # 8 right jaw
            lm[28],  # 9 nose bridge
            lm[8] + 0.45 * iod * down,  # 10 neck
            mean(37, 38),  # 11 left upper lid
            lm[54],  # 12 right mouth corner
            mean(40, 41),  # 13 left lower lid
            lm[62],  # 14 upper lip (inner edge: the seam is where the warp must tear)
            mean(43, 44),  # 15 right upper lid
            mean(46, 47),  # 16 right lower lid
            lm[66],  # 17 lower lip (inner edge)
            mean(21, 22),  # 18 glabella
            lm[8],  # 19 chin
            0.5 * (lm[57] + lm[8]),  # 20 below the lower lip
        ]
    )
    norm = (2.0 * kp + 1.0) / size - 1.0
    return np.concatenate([norm, np.zeros((NUM_KP, 1))], axis=1).astype(np.float32)


def source_face(landmarks: np.ndarray, size: int) -> SourceFace:
    """Classic :class:`SourceFace`: canonical = source keypoints, identity params (scale 1, no pose, exp 0)."""
    kp = torch.from_numpy(keypoints_from_landmarks(landmarks, size))
    params = MotionParams(
        scale=torch.ones(1, 1),
        pitch=torch.zeros(1),
        yaw=torch.zeros(1),
        roll=torch.zeros(1),
        t=torch.zeros(1, 3),
        exp=torch.zeros(1, NUM_KP, 3),
    )
    return SourceFace(kp, params, keypoints_from_params(kp[None], params)[0])


def face_size(source: SourceFace) -> float:
    """Inter-ocular distance in normalised units (eye keypoints 11/13 and 15/16)."""
    kp = source.kp_canonical
    left, right = (kp[11] + kp[13]) / 2, (kp[15] + kp[16]) / 2
    return float(torch.linalg.vector_norm(right[:2] - left[:2]))


def _flow(query: torch.Tensor, kp_d: torch.Tensor, disp: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Backward displacement at ``query`` ``[B, P, 2]`` -> ``[B, P, 2]`` (source = query + result).

    kp_d ``[B, 21, 2]`` driving keypoints, disp ``[B, 21, 2]`` = source - driving, sigma ``[B, 21, 2]``.
    """
    d = (query[:, :, None, :] - kp_d[:, None, :, :]) / sigma[:, None, :, :]  # [B, P, 21, 2]
    r2 = (d * d).sum(-1)  # [B, P, 21]
    w = torch.exp(-0.5 * r2) / (r2 + _EPS2)
    total = w.sum(-1, keepdim=True) + _BACKGROUND  # [B, P, 1]
    return (w @ disp) / total


def _sample(image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear 2-D sampling of the portrait (ATen's on any device: the fused kernels are the 3-D warps of the
    neural renderer, and a 2-D grid sample is already one memory-bound pass)."""
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)


class ClassicRenderer:
    """Warp-only renderer (no learned weights). ``flow_size``: internal flow resolution (upsampled)."""

    name = "classic"
    untrained = False
    CPU_CHUNK = 4  # frames rendered at once on a CPU

    def __init__(self, size: int = 512, flow_size: int = 128, device: str | torch.device = "cpu") -> None:
        if size <= 0 or flow_size <= 0:
            raise ValueError(f"size and flow_size must be positive, got {size}, {flow_size}")
        self.size = size
        self.flow_size = flow_size
        self.device = torch.device(device)
        lin = (2.0 * torch.arange(flow_size, dtype=torch.float32) + 1.0) / flow_size - 1.0
        gy, gx = torch.meshgrid(lin, lin, indexing="ij")
        self._query = torch.stack([gx, gy], -1).reshape(1, -1, 2).to(self.device)  # [1, F*F, 2]
        full = (2.0 * torch.arange(size, dtype=torch.float32) + 1.0) / size - 1.0
        fy, fx = torch.meshgrid(full, full, indexing="ij")
        self._base = torch.stack([fx, fy], -1)[None].to(self.device)  # [1, S, S, 2]

    def prepare(self, avatar: Avatar) -> PreparedAvatar:
        if avatar.landmarks is None:
            raise ValueError(
                f"avatar {avatar.name!r} has no landmarks, which classic mode needs: import the face detector "
                "models ('engine weights import ...') or pass --landmarks when adding the avatar"
            )
        if avatar.landmark_scheme not in CLASSIC_SCHEMES or np.shape(avatar.landmarks) != (68, 2):
            raise ValueError(
                f"avatar {avatar.name!r}: classic mode needs 68-point landmarks ({', '.join(CLASSIC_SCHEMES)}), "
                f"got scheme {avatar.landmark_scheme!r} with shape {np.shape(avatar.landmarks)}"
            )
        crop = avatar.crop
        if crop.shape[:2] != (self.size, self.size):
            raise ValueError(f"avatar crop must be {self.size}x{self.size}, got {crop.shape[:2]}")
        source = source_face(avatar.landmarks * 1.0, self.size)
        iod = face_size(source)
        sigma = torch.tensor(_SIGMA, dtype=torch.float32) * iod  # [21, 2]
        portrait = torch.from_numpy(crop).permute(2, 0, 1).float().div(255.0).to(self.device)
        return PreparedAvatar(avatar, source, ClassicState(portrait, sigma.to(self.device), iod))

    def drive(self, prepared: PreparedAvatar, params: MotionParams) -> torch.Tensor:
        """No stitching network in classic mode: the transformed keypoints ``[B, 21, 3]`` as they are."""
        kp_c = prepared.source.kp_canonical[None].expand(params.exp.shape[0], -1, -1)
        return keypoints_from_params(kp_c, params)

    def render(self, prepared: Sequence[PreparedAvatar], kp_driving: torch.Tensor) -> torch.Tensor:
        if kp_driving.shape != (len(prepared), NUM_KP, 3):
            raise ValueError(f"kp_driving must be [{len(prepared)}, {NUM_KP}, 3], got {tuple(kp_driving.shape)}")
        if self.device.type == "cpu" and len(prepared) > self.CPU_CHUNK:
            # a CPU gains nothing from wide batches here (the cost is per frame), and each frame's intermediate
            # tensors are ~30 MB: chunks keep a batch of 16 from holding half a gigabyte at once
            return torch.cat(
                [
                    self.render(prepared[i : i + self.CPU_CHUNK], kp_driving[i : i + self.CPU_CHUNK])
                    for i in range(0, len(prepared), self.CPU_CHUNK)
                ]
            )
        states: list[ClassicState] = [p.state for p in prepared]
        b = len(prepared)
        kp_d = kp_driving[..., :2].to(self.device, torch.float32)
        kp_s = torch.stack([p.source.kp_source[:, :2] for p in prepared]).to(self.device)
        sigma = torch.stack([s.sigma for s in states])
        disp = kp_s - kp_d
        flow = _flow(self._query.expand(b, -1, -1), kp_d, disp, sigma)  # [B, F*F, 2]
        flow = flow.reshape(b, self.flow_size, self.flow_size, 2).permute(0, 3, 1, 2)
        flow = F.interpolate(flow, size=(self.size, self.size), mode="bilinear", align_corners=False)
        grid = self._base + flow.permute(0, 2, 3, 1)
        portrait = torch.stack([s.portrait for s in states])
        out = _sample(portrait, grid)  # [B, 3, S, S]
        return self._mouth(out, states, kp_d, disp, sigma).clamp_(0.0, 1.0)

    def _mouth(
        self,
        out: torch.Tensor,
        states: Sequence[ClassicState],
        kp_d: torch.Tensor,
        disp: torch.Tensor,
        sigma: torch.Tensor,
    ) -> torch.Tensor:
        """Blend a mouth cavity between the driven inner lip edges (keypoints 14 and 17)."""
        # the mouth corners and inner lip edges are keypoints 6, 12, 14, 17: their driven positions are exact
        src = (kp_d + disp)[:, [6, 12, 14, 17]]  # [B, 4, 2]
        pts = kp_d[:, [6, 12, 14, 17]]
        left, right, top, bottom = pts.unbind(1)  # [B, 2] each
        iod = torch.tensor([s.iod for s in states], device=out.device)
        gap = bottom[:, 1] - top[:, 1] - (src[:, 3, 1] - src[:, 2, 1])  # opening beyond the portrait's own
        if float(gap.max()) <= 1e-3:
            return out
        half = ((right[:, 0] - left[:, 0]) / 2).clamp_min(1e-3)
        cx = (left[:, 0] + right[:, 0]) / 2
        x, y = self._base[..., 0], self._base[..., 1]  # [1, S, S]
        u = (x - cx[:, None, None]) / half[:, None, None]
        lip_y = left[:, 1, None, None] + (right[:, 1] - left[:, 1])[:, None, None] * (u + 1) / 2
        bulge = (1 - u * u).clamp_min(0.0)
        y_top = lip_y + (top[:, 1, None, None] - lip_y) * bulge
        y_bot = lip_y + (bottom[:, 1, None, None] - lip_y) * bulge
        edge = 2.0 / self.size
        inside = torch.sigmoid((y - y_top) / edge) * torch.sigmoid((y_bot - y) / edge) * (u.abs() < 1)
        strength = (gap / (0.04 * iod)).clamp(0.0, 1.0)[:, None, None]
        alpha = inside * strength  # [B, S, S]
        depth = ((y - y_top) / (y_bot - y_top).clamp_min(1e-4)).clamp(0, 1)
        cavity = torch.stack([0.25 - 0.1 * depth, 0.07 + 0 * depth, 0.08 + 0 * depth], 1)  # dark red
        teeth_h = (0.025 * iod)[:, None, None]
        teeth = (
            torch.sigmoid((y_top + teeth_h - y) / edge)
            * (1 - u.abs() ** 4).clamp_min(0)
            * (gap > 0.02 * iod)[:, None, None]
        )
        cavity = cavity * (1 - teeth[:, None]) + 0.9 * teeth[:, None]
        a = alpha[:, None]
        return out * (1 - a) + cavity * a
