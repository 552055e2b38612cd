"""Per-frame keypoint displacement heads (EP-Talk supplement: Conv1d -> average pool -> Linear).

Each head reads a short window of per-frame features and predicts offsets for ONE keypoint region only; every
other keypoint's offset is exactly zero by construction (the Linear layer has outputs for the region alone):

* :class:`LipHead` (LADP): audio features -> ``engine.keypoints.LIP`` offsets.
* :class:`EmotionHead` (IEDP): emotion features -> ``engine.keypoints.EMOTION`` offsets.
* :class:`PoseHead` (IMDP): reference-clip pose features -> ``engine.keypoints.HEAD`` offsets.

:class:`EmotionAdapter` is EAT's Emotional Adaptation Module: ``gamma, beta = tanh(FC(ReLU(FC(e))))``, applied
to a head's hidden features as ``(1 + gamma) * h + beta`` (identity when both are 0).
No trained weights exist for these heads: until trained they are random and their offsets are noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from engine.keypoints import EMOTION, HEAD, LIP, NUM_KP


class HeadOutput(NamedTuple):
    offsets: Tensor  # [B, 21, 3], exactly zero outside the head's region
    region_offsets: Tensor  # [B, len(region), 3]


class FiLMParams(NamedTuple):
    gamma: Tensor  # [B, hidden]
    beta: Tensor  # [B, hidden]


class EmotionAdapter(nn.Module):
    """EAT's Emotional Adaptation Module: emotion vector ``[B, E]`` -> FiLM ``gamma, beta`` ``[B, hidden]``."""

    def __init__(self, emotion_dim: int, hidden: int, mid: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(emotion_dim, mid)
        self.fc2 = nn.Linear(mid, 2 * hidden)

    def forward(self, e: Tensor) -> FiLMParams:
        gamma, beta = torch.tanh(self.fc2(torch.relu(self.fc1(e)))).chunk(2, dim=-1)  # [B, hidden] each
        return FiLMParams(gamma, beta)


def _check_region(region: Sequence[int]) -> tuple[int, ...]:
    out = tuple(int(k) for k in region)
    if not out or len(set(out)) != len(out) or not all(0 <= k < NUM_KP for k in out):
        raise ValueError(f"region must be distinct keypoint indices in 0..{NUM_KP - 1}, got {region}")
    return out


class _RegionHead(nn.Module):
    """Shared body: Conv1d over time -> ReLU -> (FiLM) -> mean over time -> Linear -> region offsets."""

    def __init__(self, in_dim: int, region: Sequence[int], hidden: int, kernel: int) -> None:
        super().__init__()
        if in_dim < 1 or hidden < 1 or kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"need in_dim, hidden >= 1 and an odd kernel, got {in_dim}, {hidden}, {kernel}")
        self.region = _check_region(region)
        self.in_dim = in_dim
        self.hidden = hidden
        self.conv = nn.Conv1d(in_dim, hidden, kernel, padding=kernel // 2)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(hidden, 3 * len(self.region))
        self.register_buffer("index", torch.tensor(self.region, dtype=torch.long), persistent=False)

    def forward(self, features: Tensor, film: FiLMParams | None = None) -> HeadOutput:
        """``features [B, T, C]`` (a window of per-frame features) -> :class:`HeadOutput`."""
        if features.ndim != 3 or features.shape[2] != self.in_dim:
            raise ValueError(f"features must be [B, T, {self.in_dim}], got {list(features.shape)}")
        h = torch.relu(self.conv(features.transpose(1, 2)))  # [B, hidden, T]
        if film is not None:
            h = (1 + film.gamma[:, :, None]) * h + film.beta[:, :, None]
        pooled = self.pool(h)[:, :, 0]  # [B, hidden]
        region = self.fc(pooled).view(-1, len(self.region), 3)  # [B, R, 3]
        offsets = region.new_zeros(region.shape[0], NUM_KP, 3)
        offsets = offsets.index_copy(1, self.index, region)  # [B, 21, 3]; untouched keypoints stay exactly 0
        return HeadOutput(offsets, region)


class LipHead(_RegionHead):
    """LADP: audio features -> lip keypoint offsets."""

    def __init__(self, in_dim: int, hidden: int = 128, kernel: int = 5, region: Sequence[int] = LIP) -> None:
        super().__init__(in_dim, region, hidden, kernel)


class EmotionHead(_RegionHead):
    """IEDP: emotion features (e.g. a one-hot emotion or a reference clip's expressions) -> emotion offsets."""

    def __init__(self, in_dim: int, hidden: int = 128, kernel: int = 3, region: Sequence[int] = EMOTION) -> None:
        super().__init__(in_dim, region, hidden, kernel)


class PoseHead(_RegionHead):
    """IMDP: reference-clip pose features (pitch, yaw, roll, t, scale per frame) -> whole-head offsets."""

    def __init__(self, in_dim: int = 7, hidden: int = 64, kernel: int = 5, region: Sequence[int] = HEAD) -> None:
        super().__init__(in_dim, region, hidden, kernel)
