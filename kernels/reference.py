"""Pure-PyTorch twins of the fused warping kernels (kernels/csrc/*.cu): same math, same outputs, any device.

They are what ``impl="torch"`` runs and what the custom ops run on CPU. Unlike the spec-literal path
(engine/models/warping_ops.py) they loop over the K+1 motions, so the [B, K+1, D, H, W, 3] sparse-motion tensor
and the [B, K+1, C, D, H, W] deformed-feature tensor are never materialised; peak memory is one motion's worth.
Coordinate grid as in docs/spec/liveportrait.md §3.1: align_corners=True spacing, sampled with align_corners=False.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

KP_VARIANCE = 0.01  # variance of the keypoint Gaussian heatmaps (kp2gaussian)


def coordinate_grid(d: int, h: int, w: int, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """``[d, h, w, 3]`` grid, last dim (x, y, z); each axis is 2 * (i / (n - 1)) - 1."""

    def axis(n: int) -> Tensor:
        index = torch.arange(n, dtype=dtype, device=device)
        return 2 * (index / (n - 1)) - 1

    z, y, x = torch.meshgrid(axis(d), axis(h), axis(w), indexing="ij")  # each [d, h, w]
    return torch.stack([x, y, z], dim=-1)


def grid_sample_3d(input: Tensor, grid: Tensor) -> Tensor:
    """Trilinear sample of ``input [B, C, D, H, W]`` at ``grid [B, Do, Ho, Wo, 3]`` -> ``[B, C, Do, Ho, Wo]``."""
    return F.grid_sample(input, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _gaussian(grid: Tensor, kp: Tensor) -> Tensor:
    """Heatmap of one keypoint per batch item: ``grid [D, H, W, 3]``, ``kp [B, 3]`` -> ``[B, D, H, W]``."""
    diff = grid[None] - kp[:, None, None, None, :]  # [B, D, H, W, 3]
    return torch.exp(-0.5 * (diff**2).sum(-1) / KP_VARIANCE)


def _motion(grid: Tensor, kp_driving: Tensor, kp_source: Tensor) -> Tensor:
    """Sparse motion of one keypoint: ``(grid - kp_driving) + kp_source`` -> ``[B, D, H, W, 3]``."""
    return (grid[None] - kp_driving[:, None, None, None, :]) + kp_source[:, None, None, None, :]


def mask_deformation(mask_logits: Tensor, kp_driving: Tensor, kp_source: Tensor) -> Tensor:
    """Softmax over ``mask_logits [B, K+1, D, H, W]`` weighting the K+1 motions -> deformation ``[B, D, H, W, 3]``.

    Computed in the mask's dtype (keypoints are cast to it), one motion at a time.
    """
    b, k1, d, h, w = mask_logits.shape
    kp_driving = kp_driving.to(mask_logits.dtype)
    kp_source = kp_source.to(mask_logits.dtype)
    grid = coordinate_grid(d, h, w, mask_logits.dtype, mask_logits.device)  # [D, H, W, 3]
    mask = torch.softmax(mask_logits, dim=1)  # [B, K+1, D, H, W]
    deformation = mask[:, 0, ..., None] * grid[None].expand(b, d, h, w, 3)  # [B, D, H, W, 3]
    for k in range(k1 - 1):
        deformation = deformation + mask[:, k + 1, ..., None] * _motion(grid, kp_driving[:, k], kp_source[:, k])
    return deformation


def flow_warp(feature: Tensor, mask_logits: Tensor, kp_driving: Tensor, kp_source: Tensor) -> tuple[Tensor, Tensor]:
    """Warp ``feature [B, C, Df, Hf, Wf]`` by the mask-weighted motions -> (``[B, C, D, H, W]``, deformation)."""
    deformation = mask_deformation(mask_logits, kp_driving, kp_source)  # [B, D, H, W, 3]
    return grid_sample_3d(feature, deformation.to(feature.dtype)), deformation


def sparse_motion_features(compressed: Tensor, kp_driving: Tensor, kp_source: Tensor) -> Tensor:
    """Hourglass input ``[B, (K+1)*(C+1), D, H, W]`` of ``compressed [B, C, D, H, W]``.

    Channel m*(C+1) is motion m's heatmap difference (zero for the background m = 0), channels m*(C+1)+1 ..
    m*(C+1)+C the compressed volume sampled at motion m. Written slice by slice into the final tensor.
    """
    b, c, d, h, w = compressed.shape
    k = kp_driving.shape[1]
    kp_driving = kp_driving.to(compressed.dtype)
    kp_source = kp_source.to(compressed.dtype)
    grid = coordinate_grid(d, h, w, compressed.dtype, compressed.device)  # [D, H, W, 3]
    out = compressed.new_empty((b, (k + 1) * (c + 1), d, h, w))
    out[:, 0] = 0
    out[:, 1 : c + 1] = grid_sample_3d(compressed, grid[None].expand(b, d, h, w, 3))
    for m in range(1, k + 1):
        kd, ks = kp_driving[:, m - 1], kp_source[:, m - 1]  # [B, 3]
        base = m * (c + 1)
        out[:, base] = _gaussian(grid, kd) - _gaussian(grid, ks)
        out[:, base + 1 : base + c + 1] = grid_sample_3d(compressed, _motion(grid, kd, ks))
    return out
