"""Displacement heads: shapes, region-only offsets, the Conv1d -> pool -> Linear math, the FiLM adapter."""

from __future__ import annotations

import pytest
import torch

from engine.keypoints import EMOTION, HEAD, LIP, NUM_KP
from engine.motion.heads import EmotionAdapter, EmotionHead, FiLMParams, LipHead, PoseHead


@pytest.mark.parametrize(
    ("head", "in_dim", "region"),
    [(LipHead(81), 81, LIP), (EmotionHead(8), 8, EMOTION), (PoseHead(), 7, HEAD)],
)
def test_offsets_only_on_region(head: torch.nn.Module, in_dim: int, region: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    out = head(torch.randn(3, 9, in_dim))
    assert out.offsets.shape == (3, NUM_KP, 3) and out.region_offsets.shape == (3, len(region), 3)
    outside = [k for k in range(NUM_KP) if k not in region]
    assert torch.all(out.offsets[:, outside] == 0)
    assert torch.all(out.offsets[:, list(region)].abs().sum(-1) > 0)
    torch.testing.assert_close(out.offsets[:, list(region)], out.region_offsets)


def test_math_matches_manual_conv_pool_linear() -> None:
    torch.manual_seed(1)
    head = LipHead(4, hidden=6, kernel=3)
    x = torch.randn(2, 7, 4)
    w, b = head.conv.weight, head.conv.bias  # [6, 4, 3], [6]
    assert b is not None
    padded = torch.nn.functional.pad(x, (0, 0, 1, 1))  # [2, 9, 4]
    h = torch.stack([torch.einsum("btc,oct->bo", padded[:, i : i + 3], w) + b for i in range(7)], 2).relu()
    expected = head.fc(h.mean(2)).view(2, len(LIP), 3)
    torch.testing.assert_close(head(x).region_offsets, expected)


def test_emotion_adapter_film() -> None:
    torch.manual_seed(2)
    head = EmotionHead(8, hidden=16)
    adapter = EmotionAdapter(emotion_dim=8, hidden=16)
    e = torch.randn(2, 8)
    film = adapter(e)
    assert film.gamma.shape == (2, 16) and film.gamma.abs().max() < 1 and film.beta.abs().max() < 1
    x = torch.randn(2, 5, 8)
    zero = FiLMParams(torch.zeros(2, 16), torch.zeros(2, 16))
    torch.testing.assert_close(head(x, zero).offsets, head(x).offsets)  # zero FiLM is the identity
    assert not torch.allclose(head(x, film).offsets, head(x).offsets)
    assert torch.all(head(x, film).offsets[:, [k for k in range(NUM_KP) if k not in EMOTION]] == 0)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="region"):
        LipHead(4, region=(3, 3))
    with pytest.raises(ValueError, match="region"):
        LipHead(4, region=(21,))
    with pytest.raises(ValueError, match="odd"):
        LipHead(4, kernel=4)
    with pytest.raises(ValueError, match=r"\[B, T, 4\]"):
        LipHead(4)(torch.zeros(1, 3, 5))
