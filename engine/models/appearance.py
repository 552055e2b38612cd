"""Appearance feature extractor F: portrait -> 3-D feature volume (docs/spec/liveportrait.md §1).

Reference shapes (preset ``liveportrait``): [B, 3, 256, 256] -> [B, 32, 16, 64, 64].
"""

from __future__ import annotations

from torch import Tensor, nn

from engine.models.blocks import DownBlock2d, ResBlock3d, SameBlock2d


class AppearanceFeatureExtractor(nn.Module):
    def __init__(
        self,
        image_channel: int = 3,
        block_expansion: int = 64,
        num_down_blocks: int = 2,
        max_features: int = 512,
        reshape_channel: int = 32,
        reshape_depth: int = 16,
        num_resblocks: int = 6,
    ):
        super().__init__()
        self.reshape_channel = reshape_channel
        self.reshape_depth = reshape_depth
        self.first = SameBlock2d(image_channel, block_expansion)
        down = []
        for i in range(num_down_blocks):
            cin = min(max_features, block_expansion * (2**i))
            cout = min(max_features, block_expansion * (2 ** (i + 1)))
            down.append(DownBlock2d(cin, cout))
        self.down_blocks = nn.ModuleList(down)
        self.second = nn.Conv2d(cout if num_down_blocks else block_expansion, reshape_channel * reshape_depth, 1)
        self.resblocks_3d = nn.Sequential()
        for i in range(num_resblocks):
            self.resblocks_3d.add_module(f"3dr{i}", ResBlock3d(reshape_channel))

    def forward(self, image: Tensor) -> Tensor:
        x = self.first(image)  # [B, 64, 256, 256]
        for block in self.down_blocks:
            x = block(x)  # [B, 128, 128, 128] then [B, 256, 64, 64]
        x = self.second(x)  # [B, 512, 64, 64]
        b, _, h, w = x.shape
        # pure view: channel ch = c * depth + d
        x = x.view(b, self.reshape_channel, self.reshape_depth, h, w)  # [B, 32, 16, 64, 64]
        return self.resblocks_3d(x)  # [B, 32, 16, 64, 64]
