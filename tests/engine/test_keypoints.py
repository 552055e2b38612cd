"""Keypoint math of ``engine.keypoints`` against independent constructions (spec section 5 and 6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from engine import keypoints as K


def _deg(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize(
    ("pitch", "yaw", "roll", "vec", "expected"),
    [
        # row-vector convention x' = x R with R = (Rz Ry Rx)^T
        (0.0, 90.0, 0.0, (1, 0, 0), (0, 0, -1)),
        (0.0, 90.0, 0.0, (0, 0, 1), (1, 0, 0)),
        (90.0, 0.0, 0.0, (0, 1, 0), (0, 0, 1)),
        (0.0, 0.0, 90.0, (1, 0, 0), (0, 1, 0)),
        (0.0, 0.0, 90.0, (0, 1, 0), (-1, 0, 0)),
    ],
)
def test_single_axis_rotations(
    pitch: float, yaw: float, roll: float, vec: tuple[int, ...], expected: tuple[int, ...]
) -> None:
    rot = K.rotation_matrix(_deg(pitch), _deg(yaw), _deg(roll))
    out = torch.tensor(vec, dtype=torch.float64)[None, None] @ rot
    assert torch.allclose(out[0, 0], torch.tensor(expected, dtype=torch.float64), atol=1e-12)


def test_rotation_matches_intrinsic_zyx_transposed_and_is_orthonormal() -> None:
    gen = torch.Generator().manual_seed(0)
    angles = (torch.rand(8, 3, generator=gen, dtype=torch.float64) * 2 - 1) * 90
    rot = K.rotation_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    # scipy "ZYX" intrinsic with (roll, yaw, pitch) is Rz @ Ry @ Rx
    ref = Rotation.from_euler("ZYX", angles[:, [2, 1, 0]].numpy(), degrees=True).as_matrix().transpose(0, 2, 1)
    np.testing.assert_allclose(rot.numpy(), ref, atol=1e-12)
    eye = torch.eye(3, dtype=torch.float64).expand(8, 3, 3)
    assert torch.allclose(rot @ rot.transpose(1, 2), eye, atol=1e-12)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(8, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("k", [0, 1, 32, 33, 65])
def test_bins_decode_one_hot(k: int) -> None:
    logits = torch.full((2, K.NUM_BINS), -50.0, dtype=torch.float64)
    logits[:, k] = 50.0
    assert torch.allclose(K.bins_to_degrees(logits), torch.full((2,), 3.0 * k - 97.5, dtype=torch.float64))


def test_bins_decode_uniform_is_zero_and_wrong_width_is_refused() -> None:
    assert abs(float(K.bins_to_degrees(torch.zeros(1, K.NUM_BINS))[0])) < 1e-4
    with pytest.raises(ValueError, match="66 bins"):
        K.bins_to_degrees(torch.zeros(1, 65))


def test_transform_with_identity_rotation() -> None:
    gen = torch.Generator().manual_seed(1)
    kp = torch.randn(2, K.NUM_KP, 3, generator=gen)
    exp = torch.randn(2, K.NUM_KP, 3, generator=gen)
    scale = torch.tensor([[1.0], [2.0]])
    t = torch.tensor([[0.1, -0.2, 5.0], [0.3, 0.4, -7.0]])
    rot = torch.eye(3).expand(2, 3, 3)
    out = K.transform_keypoints(kp, rot, exp, scale, t)
    expected = scale[:, :, None] * (kp + exp)
    expected[..., 0] += t[:, None, 0]
    expected[..., 1] += t[:, None, 1]  # t_z is ignored by the reference
    assert torch.allclose(out, expected, atol=1e-6)


def test_keypoints_from_params_zero_pose_equals_plain_transform() -> None:
    kp = torch.randn(1, 63, generator=torch.Generator().manual_seed(2))
    logits = torch.zeros(1, K.NUM_BINS)  # uniform bins decode to 0 degrees
    params = K.params_from_motion(logits, logits, logits, torch.zeros(1, 3), torch.zeros(1, 63), torch.ones(1, 1))
    assert params.exp.shape == (1, K.NUM_KP, 3) and params.yaw.shape == (1,)
    out = K.keypoints_from_params(kp, params)
    assert torch.allclose(out, kp.reshape(1, K.NUM_KP, 3), atol=1e-4)


def test_stitch_call_convention() -> None:
    gen = torch.Generator().manual_seed(3)
    x_s = torch.randn(2, K.NUM_KP, 3, generator=gen)
    x_d = torch.randn(2, K.NUM_KP, 3, generator=gen)
    delta = torch.randn(2, 65, generator=gen)
    seen: list[torch.Tensor] = []

    def fake_mlp(inp: torch.Tensor) -> torch.Tensor:
        seen.append(inp)
        return delta

    out = K.stitch(fake_mlp, x_s, x_d)
    assert torch.equal(seen[0], torch.cat([x_s.reshape(2, 63), x_d.reshape(2, 63)], 1))
    expected = x_d + delta[:, :63].reshape(2, K.NUM_KP, 3)
    expected[..., 0] += delta[:, None, 63]
    expected[..., 1] += delta[:, None, 64]
    assert torch.allclose(out, expected)


def test_retarget_call_conventions() -> None:
    x_s = torch.randn(1, K.NUM_KP, 3, generator=torch.Generator().manual_seed(4))
    seen: list[torch.Tensor] = []

    def fake(inp: torch.Tensor) -> torch.Tensor:
        seen.append(inp)
        return torch.arange(63, dtype=torch.float32)[None]

    eye = K.eye_retarget_delta(fake, x_s, torch.tensor([[0.3, 0.35]]), torch.tensor([[0.1]]))
    lip = K.lip_retarget_delta(fake, x_s, torch.tensor([[0.2]]), torch.tensor([[0.0]]))
    assert torch.equal(seen[0][:, :63], x_s.reshape(1, 63))
    assert torch.allclose(seen[0][0, 63:], torch.tensor([0.3, 0.35, 0.1]))
    assert torch.allclose(seen[1][0, 63:], torch.tensor([0.2, 0.0]))
    assert eye.shape == lip.shape == (1, K.NUM_KP, 3)
    assert float(eye[0, 1, 0]) == 3.0  # row-major reshape of the 63-vector


def test_open_ratios_from_landmarks() -> None:
    lmk = torch.zeros(1, 203, 2)
    # left eye: corners 0, 12 are 10 px apart, lids 6, 18 are 3 px apart
    lmk[0, 0], lmk[0, 12], lmk[0, 6], lmk[0, 18] = torch.tensor([[0.0, 0], [10, 0], [5, -1.5], [5, 1.5]])
    lmk[0, 24], lmk[0, 36], lmk[0, 30], lmk[0, 42] = torch.tensor([[20.0, 0], [28, 0], [24, 0], [24, 4]])
    lmk[0, 48], lmk[0, 66], lmk[0, 90], lmk[0, 102] = torch.tensor([[0.0, 30], [20, 30], [10, 28], [10, 33]])
    assert torch.allclose(K.eye_open_ratio(lmk), torch.tensor([[0.3, 0.5]]), atol=1e-5)
    assert torch.allclose(K.lip_open_ratio(lmk), torch.tensor([[0.25]]), atol=1e-5)


def test_relative_params_identity_driving_returns_source() -> None:
    gen = torch.Generator().manual_seed(5)

    def params() -> K.MotionParams:
        return K.MotionParams(
            scale=torch.rand(1, 1, generator=gen) + 0.5,
            pitch=torch.randn(1, generator=gen),
            yaw=torch.randn(1, generator=gen),
            roll=torch.randn(1, generator=gen),
            t=torch.randn(1, 3, generator=gen),
            exp=torch.randn(1, K.NUM_KP, 3, generator=gen),
        )

    src, drv = params(), params()
    out = K.relative_params(src, drv, drv)
    for a, b in zip(out[:5], src[:5], strict=True):
        if a.shape == (1, 3):
            assert torch.allclose(a[:, :2], b[:, :2]) and float(a[0, 2]) == 0.0
        else:
            assert torch.allclose(a, b)
    assert torch.allclose(out.exp, src.exp)
