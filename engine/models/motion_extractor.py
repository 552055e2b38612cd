"""Motion extractor M: ConvNeXt-V2 backbone with GRN and seven linear heads (docs/spec/liveportrait.md §2).

All parameters live under ``detector.`` as in the official checkpoint. Reference shapes: input [B, 3, 256, 256],
stage outputs [B, 96, 64, 64] -> [B, 192, 32, 32] -> [B, 384, 16, 16] -> [B, 768, 8, 8].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MotionOutput(NamedTuple):
    """Raw head outputs (no softmax, no reshaping)."""

    pitch: Tensor  # [B, 66] bin logits
    yaw: Tensor  # [B, 66]
    roll: Tensor  # [B, 66]
    t: Tensor  # [B, 3]
    exp: Tensor  # [B, 63] expression deltas, 21 x 3 row-major
    scale: Tensor  # [B, 1]
    kp: Tensor  # [B, 63] canonical keypoints, 21 x 3 row-major


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over C of an NCHW tensor (eps inside the sqrt, biased variance)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:  # [B, C, H, W] -> same
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class GRN(nn.Module):
    """Global response normalisation on NHWC: L2 over (H, W) per channel, divided by its channel mean."""

    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, channels))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, channels))

    def forward(self, x: Tensor) -> Tensor:  # [B, H, W, C] -> same
        g = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)  # [B, 1, 1, C]
        n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * n) + self.beta + x


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.grn = GRN(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:  # [B, C, H, W] -> same
        y = self.dwconv(x).permute(0, 2, 3, 1)  # [B, H, W, C]
        y = self.pwconv2(self.grn(F.gelu(self.pwconv1(self.norm(y)))))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtV2(nn.Module):
    """Backbone and heads (the official module's ``detector``)."""

    def __init__(self, in_chans: int, depths: Sequence[int], dims: Sequence[int], num_kp: int, num_bins: int):
        super().__init__()
        if len(depths) != len(dims):
            raise ValueError(f"depths {list(depths)} and dims {list(dims)} must have the same length")
        # stem is conv then LN; the later downsamplers are LN then conv (reference order)
        layers = [nn.Sequential(nn.Conv2d(in_chans, dims[0], 4, stride=4), ChannelsFirstLayerNorm(dims[0]))]
        for i in range(1, len(dims)):
            layers.append(
                nn.Sequential(ChannelsFirstLayerNorm(dims[i - 1]), nn.Conv2d(dims[i - 1], dims[i], 2, stride=2))
            )
        self.downsample_layers = nn.ModuleList(layers)
        self.stages = nn.ModuleList(
            nn.Sequential(*(ConvNeXtBlock(d) for _ in range(n))) for d, n in zip(dims, depths, strict=True)
        )
        feat = dims[-1]
        self.norm = nn.LayerNorm(feat, eps=1e-6)
        self.fc_kp = nn.Linear(feat, 3 * num_kp)
        self.fc_scale = nn.Linear(feat, 1)
        self.fc_pitch = nn.Linear(feat, num_bins)
        self.fc_yaw = nn.Linear(feat, num_bins)
        self.fc_roll = nn.Linear(feat, num_bins)
        self.fc_t = nn.Linear(feat, 3)
        self.fc_exp = nn.Linear(feat, 3 * num_kp)

    def forward(self, x: Tensor) -> MotionOutput:
        for down, stage in zip(self.downsample_layers, self.stages, strict=True):
            x = stage(down(x))  # reference: [B, 96, 64, 64] ... [B, 768, 8, 8]
        f = self.norm(x.mean(dim=(2, 3)))  # [B, 768]
        return MotionOutput(
            pitch=self.fc_pitch(f),
            yaw=self.fc_yaw(f),
            roll=self.fc_roll(f),
            t=self.fc_t(f),
            exp=self.fc_exp(f),
            scale=self.fc_scale(f),
            kp=self.fc_kp(f),
        )


class MotionExtractor(nn.Module):
    def __init__(
        self,
        in_chans: int = 3,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        num_kp: int = 21,
        num_bins: int = 66,
    ):
        super().__init__()
        self.detector = ConvNeXtV2(in_chans, depths, dims, num_kp, num_bins)

    def forward(self, image: Tensor) -> MotionOutput:  # [B, 3, 256, 256] in [0, 1]
        out: MotionOutput = self.detector(image)
        return out
