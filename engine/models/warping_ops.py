"""The hot pieces of dense motion / warping as plain functions, and the two op sets the warping network runs.

:data:`STANDARD` is the spec-literal PyTorch path (docs/spec/liveportrait.md §3, including its align_corners
mismatch: the grid uses the align_corners=True convention while every grid_sample uses align_corners=False); it
is bit-identical to LivePortrait's own code and exports to opset-20 ``GridSample``. :data:`FUSED` runs the same
maths through the fused kernels' custom ops (``kernels.ops``): one CUDA pass for softmax + deformation + warp, and
one for the hourglass input; on CPU the custom ops run the kernels' pure-PyTorch twins. Which set runs is chosen
once, by whoever builds the graph (``export.graphs``), never per call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import ops as kernel_ops

# one definition of the grid and the heatmap variance, shared with the kernels' twins
from kernels.reference import KP_VARIANCE, coordinate_grid

__all__ = [
    "FUSED",
    "KP_VARIANCE",
    "OPS",
    "STANDARD",
    "WarpOps",
    "coordinate_grid",
    "deformation_from_mask",
    "keypoint_heatmap",
    "sparse_motion_input",
    "sparse_motions",
    "warp_volume",
]


def keypoint_heatmap(kp: Tensor, grid: Tensor) -> Tensor:
    """Gaussian of each keypoint on the grid: ``kp [B, K, 3]``, ``grid [D, H, W, 3]`` -> ``[B, K, D, H, W]``."""
    diff = grid[None, None] - kp[:, :, None, None, None, :]  # [B, K, D, H, W, 3]
    return torch.exp(-0.5 * (diff**2).sum(-1) / KP_VARIANCE)


def sparse_motions(kp_driving: Tensor, kp_source: Tensor, d: int, h: int, w: int) -> Tensor:
    """Per-keypoint motions ``[B, K+1, D, H, W, 3]``; index 0 is the identity (background)."""
    grid = coordinate_grid(d, h, w, kp_source.dtype, kp_source.device)  # [D, H, W, 3]
    b = kp_source.shape[0]
    shifted = grid[None, None] - kp_driving[:, :, None, None, None, :]  # [B, K, D, H, W, 3]
    shifted = shifted + kp_source[:, :, None, None, None, :]
    identity = grid[None, None].expand(b, 1, d, h, w, 3)
    return torch.cat([identity, shifted], dim=1)


def sparse_motion_input(compressed: Tensor, kp_driving: Tensor, kp_source: Tensor) -> Tensor:
    """Hourglass input ``[B, (K+1)*(C+1), D, H, W]`` from the compressed feature ``[B, C, D, H, W]``.

    Per motion m the channels are [heatmap, C deformed channels]; motion 0 (background) has a zero heatmap.
    """
    b, c, d, h, w = compressed.shape
    k1 = kp_source.shape[1] + 1
    grid = coordinate_grid(d, h, w, kp_source.dtype, kp_source.device)
    heat = keypoint_heatmap(kp_driving, grid) - keypoint_heatmap(kp_source, grid)  # [B, K, D, H, W]
    heat = torch.cat([torch.zeros_like(heat[:, :1]), heat], dim=1)[:, :, None]  # [B, K+1, 1, D, H, W]
    motions = sparse_motions(kp_driving, kp_source, d, h, w)  # [B, K+1, D, H, W, 3]
    repeated = compressed[:, None].expand(b, k1, c, d, h, w).reshape(b * k1, c, d, h, w)
    deformed = F.grid_sample(repeated, motions.reshape(b * k1, d, h, w, 3), align_corners=False)
    deformed = deformed.view(b, k1, c, d, h, w)  # [B, K+1, C, D, H, W]
    return torch.cat([heat, deformed], dim=2).view(b, k1 * (c + 1), d, h, w)


def deformation_from_mask(mask_logits: Tensor, kp_driving: Tensor, kp_source: Tensor) -> Tensor:
    """Softmax of ``mask_logits [B, K+1, D, H, W]`` over the motions, then the weighted motion ``[B, D, H, W, 3]``."""
    _, _, d, h, w = mask_logits.shape
    mask = torch.softmax(mask_logits, dim=1)  # [B, K+1, D, H, W]
    motions = sparse_motions(kp_driving, kp_source, d, h, w).permute(0, 1, 5, 2, 3, 4)  # [B, K+1, 3, D, H, W]
    deformation = (mask[:, :, None] * motions).sum(dim=1)  # [B, 3, D, H, W]
    return deformation.permute(0, 2, 3, 4, 1)


def warp_volume(feature: Tensor, deformation: Tensor) -> Tensor:
    """Trilinear sample of ``feature [B, C, D, H, W]`` at ``deformation [B, D, H, W, 3]`` (zeros outside)."""
    return F.grid_sample(feature, deformation, mode="bilinear", padding_mode="zeros", align_corners=False)


def _standard_warp(
    feature: Tensor, mask_logits: Tensor, kp_driving: Tensor, kp_source: Tensor
) -> tuple[Tensor, Tensor]:
    deformation = deformation_from_mask(mask_logits, kp_driving, kp_source)  # [B, D, H, W, 3]
    return warp_volume(feature, deformation), deformation


def _fused_sparse_motion(compressed: Tensor, kp_driving: Tensor, kp_source: Tensor) -> Tensor:
    return kernel_ops.sparse_motion_features(compressed, kp_driving, kp_source, impl="fused")


def _fused_warp(feature: Tensor, mask_logits: Tensor, kp_driving: Tensor, kp_source: Tensor) -> tuple[Tensor, Tensor]:
    # the kernels read keypoints as fp32 whatever the volume dtype (kernels/README.md)
    fused = kernel_ops.flow_warp(
        feature, mask_logits, kp_driving.float(), kp_source.float(), return_deformation=True, impl="fused"
    )
    assert fused.deformation is not None  # requested
    return fused.out, fused.deformation


class WarpOps(NamedTuple):
    """How the warping network computes its two memory-heavy steps (see the module docstring)."""

    name: str
    # compressed [B, C, D, H, W], kp_driving, kp_source [B, K, 3] -> hourglass input [B, (K+1)(C+1), D, H, W]
    sparse_motion: Callable[[Tensor, Tensor, Tensor], Tensor]
    # feature [B, C, D, H, W], mask logits [B, K+1, D, H, W], keypoints -> (warped [B, C, D, H, W], deformation)
    warp: Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


STANDARD = WarpOps("standard", sparse_motion_input, _standard_warp)
FUSED = WarpOps("fused", _fused_sparse_motion, _fused_warp)
OPS: dict[str, WarpOps] = {ops.name: ops for ops in (STANDARD, FUSED)}
