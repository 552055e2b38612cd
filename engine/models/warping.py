"""Warping module W: dense motion, trilinear feature-volume warp, 2-D projection (docs/spec/liveportrait.md §3.4).

Call convention is LivePortrait's: ``warping(feature_3d, kp_driving, kp_source)``. Reference shapes:
feature_3d [B, 32, 16, 64, 64], keypoints [B, 21, 3] -> out [B, 256, 64, 64]. ``ops`` selects the
implementation of the two heavy steps (:mod:`engine.models.warping_ops`: ``STANDARD`` or ``FUSED``); this is the
one forward of W, whichever runs it (eager, compiled, exported).
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn

from engine.models.blocks import SameBlock2d
from engine.models.dense_motion import DenseMotionNetwork
from engine.models.warping_ops import STANDARD, WarpOps


class WarpingOutput(NamedTuple):
    out: Tensor  # [B, 256, 64, 64] warped, projected, occlusion-masked feature
    occlusion: Tensor  # [B, 1, 64, 64]
    deformation: Tensor  # [B, 16, 64, 64, 3]


class WarpingNetwork(nn.Module):
    def __init__(
        self,
        feature_channels: int = 32,
        feature_depth: int = 16,
        out_channels: int = 256,
        num_kp: int = 21,
        dense_block_expansion: int = 32,
        dense_max_features: int = 1024,
        dense_num_blocks: int = 5,
        dense_compress: int = 4,
        dense_mask_kernel: int = 7,
        dense_occlusion_kernel: int = 7,
    ):
        super().__init__()
        self.dense_motion_network = DenseMotionNetwork(
            feature_channels=feature_channels,
            feature_depth=feature_depth,
            num_kp=num_kp,
            block_expansion=dense_block_expansion,
            max_features=dense_max_features,
            num_blocks=dense_num_blocks,
            compress=dense_compress,
            mask_kernel=dense_mask_kernel,
            occlusion_kernel=dense_occlusion_kernel,
        )
        self.third = SameBlock2d(feature_channels * feature_depth, out_channels, lrelu=True)
        self.fourth = nn.Conv2d(out_channels, out_channels, 1)

    def forward(
        self, feature_3d: Tensor, kp_driving: Tensor, kp_source: Tensor, ops: WarpOps = STANDARD
    ) -> WarpingOutput:
        dense = self.dense_motion_network(feature_3d, kp_driving, kp_source, ops)
        out, deformation = ops.warp(feature_3d, dense.mask_logits, kp_driving, kp_source)  # [B, 32, 16, 64, 64]
        b, c, d, h, w = out.shape
        out = self.fourth(self.third(out.reshape(b, c * d, h, w)))  # [B, 256, 64, 64]
        return WarpingOutput(out=out * dense.occlusion, occlusion=dense.occlusion, deformation=deformation)
