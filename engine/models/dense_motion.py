"""Dense motion network of W: keypoints + compressed feature -> mask logits, occlusion (docs/spec/liveportrait.md §3.3).

Reference shapes: feature [B, 32, 16, 64, 64]; hourglass input [B, 110, 16, 64, 64]; prediction
[B, 142, 16, 64, 64]; mask logits [B, 22, 16, 64, 64]; occlusion [B, 1, 64, 64]. The mask's softmax turns into
the deformation inside the warp step (``WarpOps.warp``), so a fused kernel can do both in one pass.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.models.blocks import DownBlock3d, UpBlock3d
from engine.models.warping_ops import STANDARD, WarpOps


class DenseMotionOutput(NamedTuple):
    mask_logits: Tensor  # [B, K+1, D, H, W] pre-softmax weights of the K+1 motions
    occlusion: Tensor  # [B, 1, H, W] in (0, 1)


class HourglassEncoder(nn.Module):
    def __init__(self, block_expansion: int, in_features: int, num_blocks: int, max_features: int):
        super().__init__()
        blocks = []
        for i in range(num_blocks):
            cin = in_features if i == 0 else min(max_features, block_expansion * (2**i))
            blocks.append(DownBlock3d(cin, min(max_features, block_expansion * (2 ** (i + 1)))))
        self.down_blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = [x]  # input first, then each scale (depth is never pooled)
        for block in self.down_blocks:
            outs.append(block(outs[-1]))
        return outs


class HourglassDecoder(nn.Module):
    def __init__(self, block_expansion: int, in_features: int, num_blocks: int, max_features: int):
        super().__init__()
        blocks = []
        for i in reversed(range(num_blocks)):
            cin = (1 if i == num_blocks - 1 else 2) * min(max_features, block_expansion * (2 ** (i + 1)))
            blocks.append(UpBlock3d(cin, min(max_features, block_expansion * (2**i))))
        self.up_blocks = nn.ModuleList(blocks)
        self.out_filters = block_expansion + in_features
        self.conv = nn.Conv3d(self.out_filters, self.out_filters, 3, padding=1)
        self.norm = nn.BatchNorm3d(self.out_filters)

    def forward(self, skips: list[Tensor]) -> Tensor:
        skips = list(skips)
        out = skips.pop()
        for block in self.up_blocks:
            out = torch.cat([block(out), skips.pop()], dim=1)  # upsampled first, skip second
        return F.relu(self.norm(self.conv(out)))


class Hourglass(nn.Module):
    def __init__(self, block_expansion: int, in_features: int, num_blocks: int, max_features: int):
        super().__init__()
        self.encoder = HourglassEncoder(block_expansion, in_features, num_blocks, max_features)
        self.decoder = HourglassDecoder(block_expansion, in_features, num_blocks, max_features)
        self.out_filters = self.decoder.out_filters

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


class DenseMotionNetwork(nn.Module):
    def __init__(
        self,
        feature_channels: int = 32,
        feature_depth: int = 16,
        num_kp: int = 21,
        block_expansion: int = 32,
        max_features: int = 1024,
        num_blocks: int = 5,
        compress: int = 4,
        mask_kernel: int = 7,
        occlusion_kernel: int = 7,
    ):
        super().__init__()
        self.compress = nn.Conv3d(feature_channels, compress, 1)
        self.norm = nn.BatchNorm3d(compress)
        in_features = (num_kp + 1) * (compress + 1)
        self.hourglass = Hourglass(block_expansion, in_features, num_blocks, max_features)
        pred = self.hourglass.out_filters
        self.mask = nn.Conv3d(pred, num_kp + 1, mask_kernel, padding=mask_kernel // 2)
        self.occlusion = nn.Conv2d(pred * feature_depth, 1, occlusion_kernel, padding=occlusion_kernel // 2)

    def forward(
        self, feature: Tensor, kp_driving: Tensor, kp_source: Tensor, ops: WarpOps = STANDARD
    ) -> DenseMotionOutput:
        compressed = F.relu(self.norm(self.compress(feature)))  # [B, 4, 16, 64, 64]
        inp = ops.sparse_motion(compressed, kp_driving, kp_source)  # [B, 110, 16, 64, 64]
        prediction = self.hourglass(inp)  # [B, 142, 16, 64, 64]
        b, c, d, h, w = prediction.shape
        occlusion = torch.sigmoid(self.occlusion(prediction.reshape(b, c * d, h, w)))  # [B, 1, 64, 64]
        return DenseMotionOutput(mask_logits=self.mask(prediction), occlusion=occlusion)
