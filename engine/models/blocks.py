"""Conv building blocks of the LivePortrait-compatible networks (docs/spec/liveportrait.md §0, "Building blocks").

Parameter names (``conv``, ``norm``, ``conv1`` ...) are the reference's, so official state dicts load strictly.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class SameBlock2d(nn.Module):
    """conv2d -> BN2d -> ReLU (or LeakyReLU 0.01); spatial size kept."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, padding: int = 1, lrelu: bool = False
    ):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding)
        self.norm = nn.BatchNorm2d(out_channels)
        self.lrelu = lrelu

    def forward(self, x: Tensor) -> Tensor:  # [B, Cin, H, W] -> [B, Cout, H, W]
        y = self.norm(self.conv(x))
        # the reference's lrelu flag means nn.LeakyReLU() with its default slope 0.01 (not SPADE's 0.2)
        return F.leaky_relu(y, 0.01) if self.lrelu else F.relu(y)


class DownBlock2d(nn.Module):
    """conv2d k3 -> BN2d -> ReLU -> AvgPool2d(2)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:  # [B, Cin, H, W] -> [B, Cout, H/2, W/2]
        return F.avg_pool2d(F.relu(self.norm(self.conv(x))), 2)


class DownBlock3d(nn.Module):
    """conv3d k3 -> BN3d -> ReLU -> AvgPool3d(1, 2, 2): depth is never pooled."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.norm = nn.BatchNorm3d(out_channels)

    def forward(self, x: Tensor) -> Tensor:  # [B, Cin, D, H, W] -> [B, Cout, D, H/2, W/2]
        return F.avg_pool3d(F.relu(self.norm(self.conv(x))), (1, 2, 2))


class UpBlock3d(nn.Module):
    """nearest upsample (1, 2, 2) -> conv3d k3 -> BN3d -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.norm = nn.BatchNorm3d(out_channels)

    def forward(self, x: Tensor) -> Tensor:  # [B, Cin, D, H, W] -> [B, Cout, D, 2H, 2W]
        x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
        return F.relu(self.norm(self.conv(x)))


class ResBlock3d(nn.Module):
    """Pre-activation residual block: ``x + conv2(relu(norm2(conv1(relu(norm1(x))))))``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1)
        self.norm1 = nn.BatchNorm3d(channels)
        self.norm2 = nn.BatchNorm3d(channels)

    def forward(self, x: Tensor) -> Tensor:  # [B, C, D, H, W] -> same
        h = self.conv1(F.relu(self.norm1(x)))
        h = self.conv2(F.relu(self.norm2(h)))
        return x + h
