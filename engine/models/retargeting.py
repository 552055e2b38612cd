"""Stitching / eye / lip retargeting MLP (docs/spec/liveportrait.md §5): Linear -> ReLU -> ... -> Linear.

Parameters are ``mlp.{0,2,4,...}`` as in the official checkpoint (ReLUs take the odd indices).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class RetargetingMLP(nn.Module):
    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, out_features))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:  # [B, in_features] -> [B, out_features]
        out: Tensor = self.mlp(x)
        return out
