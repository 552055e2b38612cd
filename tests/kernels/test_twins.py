"""The pure-PyTorch twins (kernels.reference) equal the spec-literal unfused path (LivePortrait spec section 3).

The unfused path is written out below from the spec (materialising the [B, K+1, D, H, W, 3] sparse motions, as
the original does) and, when present, engine.models.warping_ops is checked too. A CPU emulation of the kernels'
trilinear corner arithmetic (kernels/csrc/avatar_common.cuh, including its clamping of far coordinates) is checked
against torch's grid_sample, so the CUDA algorithm itself is verified without a GPU. Tolerance: 1e-5 in fp32.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from engine.models import warping_ops
from kernels import reference

ATOL = 1e-5


# ---- spec-literal unfused path (spec 3.1-3.4) -------------------------------------------------------------------


def spec_grid(d: int, h: int, w: int) -> Tensor:
    """make_coordinate_grid: [d, h, w, 3], last dim (x, y, z), axis value 2 * (i / (n - 1)) - 1."""
    axes = [2 * (torch.arange(n, dtype=torch.float32) / (n - 1)) - 1 for n in (d, h, w)]
    z, y, x = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([x, y, z], dim=-1)


def spec_sparse_motions(kp_driving: Tensor, kp_source: Tensor, d: int, h: int, w: int) -> Tensor:
    grid = spec_grid(d, h, w)[None, None]  # [1, 1, D, H, W, 3]
    b = kp_driving.shape[0]
    shifted = (grid - kp_driving[:, :, None, None, None]) + kp_source[:, :, None, None, None]
    return torch.cat([grid.expand(b, 1, d, h, w, 3), shifted], dim=1)  # [B, K+1, D, H, W, 3]


def spec_hourglass_input(compressed: Tensor, kp_driving: Tensor, kp_source: Tensor) -> Tensor:
    b, c, d, h, w = compressed.shape
    k1 = kp_driving.shape[1] + 1
    grid = spec_grid(d, h, w)

    def gaussian(kp: Tensor) -> Tensor:
        diff = grid[None, None] - kp[:, :, None, None, None]
        return torch.exp(-0.5 * (diff**2).sum(-1) / 0.01)  # [B, K, D, H, W]

    heat = gaussian(kp_driving) - gaussian(kp_source)
    heat = torch.cat([torch.zeros_like(heat[:, :1]), heat], dim=1)[:, :, None]  # [B, K+1, 1, D, H, W]
    motions = spec_sparse_motions(kp_driving, kp_source, d, h, w)
    repeated = compressed[:, None].repeat(1, k1, 1, 1, 1, 1).view(b * k1, c, d, h, w)
    deformed = F.grid_sample(repeated, motions.view(b * k1, d, h, w, 3), align_corners=False)
    deformed = deformed.view(b, k1, c, d, h, w)
    return torch.cat([heat, deformed], dim=2).view(b, k1 * (c + 1), d, h, w)


def spec_deformation(mask_logits: Tensor, kp_driving: Tensor, kp_source: Tensor) -> Tensor:
    _, _, d, h, w = mask_logits.shape
    mask = torch.softmax(mask_logits, dim=1)[..., None]  # [B, K+1, D, H, W, 1]
    return (mask * spec_sparse_motions(kp_driving, kp_source, d, h, w)).sum(dim=1)  # [B, D, H, W, 3]


def spec_warp(feature: Tensor, deformation: Tensor) -> Tensor:
    return F.grid_sample(feature, deformation, mode="bilinear", padding_mode="zeros", align_corners=False)


# ---- inputs ---------------------------------------------------------------------------------------------------


def keypoints(b: int, k: int, seed: int, spread: float = 0.8) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    kp_source = torch.rand(b, k, 3, generator=gen) * spread - spread / 2
    kp_driving = kp_source + torch.rand(b, k, 3, generator=gen) * 0.1 - 0.05
    return kp_driving, kp_source


def boundary_keypoints(b: int) -> tuple[Tensor, Tensor]:
    """Keypoint pairs whose motions land samples exactly on, just inside and beyond the volume's edges."""
    shifts = torch.tensor(
        [
            [0.0, 0.0, 0.0],  # identity motion
            [2.0, 0.0, 0.0],  # x shifted by a whole volume: everything out of range in x
            [-1.0, 1.0, 0.5],
            [0.9999, -0.9999, 1.0001],
            [1.0 / 3.0, -2.0 / 7.0, 0.25],
            [30.0, -30.0, 1e6],  # far outside: zeros, no overflow
        ]
    )
    kp_driving = torch.zeros(b, shifts.shape[0], 3)
    kp_driving[:, :, 0] = torch.linspace(-1, 1, b)[:, None]  # differs per batch item
    return kp_driving, kp_driving + shifts[None]


CASES = [
    # (batch, compressed channels, (D, H, W), keypoints)
    (1, 4, (4, 6, 6), 21),
    (2, 3, (5, 7, 9), 4),
    (3, 1, (2, 3, 2), 2),
]


@pytest.mark.parametrize(("b", "c", "size", "k"), CASES)
def test_sparse_motion_twin_matches_spec(b: int, c: int, size: tuple[int, int, int], k: int) -> None:
    gen = torch.Generator().manual_seed(b * 100 + k)
    compressed = torch.randn(b, c, *size, generator=gen)
    kp_driving, kp_source = keypoints(b, k, seed=k)
    kp_source[:, 0] = -1.0  # on the corner voxel, so the first heatmap is far from zero even on tiny grids
    kp_driving[:, 0] = -0.7
    expected = spec_hourglass_input(compressed, kp_driving, kp_source)
    got = reference.sparse_motion_features(compressed, kp_driving, kp_source)
    assert got.shape == (b, (k + 1) * (c + 1), *size)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert got[:, 0].abs().max() == 0  # background heatmap is exactly zero
    assert got[:, c + 1].abs().max() > 0.5  # the first keypoint's heatmap is not


@pytest.mark.parametrize("b", [1, 3])
def test_sparse_motion_twin_at_boundaries(b: int) -> None:
    compressed = torch.randn(b, 2, 3, 5, 4, generator=torch.Generator().manual_seed(7))
    kp_driving, kp_source = boundary_keypoints(b)
    expected = spec_hourglass_input(compressed, kp_driving, kp_source)
    got = reference.sparse_motion_features(compressed, kp_driving, kp_source)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    far_motion = 6 * (2 + 1)  # motion index 6 (keypoint 5) shifted far outside: its samples are zero
    assert got[:, far_motion + 1 : far_motion + 3].abs().max() == 0


@pytest.mark.parametrize(("b", "c", "size", "k"), CASES)
def test_flow_warp_twin_matches_spec(b: int, c: int, size: tuple[int, int, int], k: int) -> None:
    gen = torch.Generator().manual_seed(b + 10 * k)
    mask_logits = torch.randn(b, k + 1, *size, generator=gen) * 3
    feature = torch.randn(b, c + 2, size[0] + 1, size[1] * 2 - 1, size[2] + 3, generator=gen)  # other resolution
    kp_driving, kp_source = keypoints(b, k, seed=k + 1)
    deformation = spec_deformation(mask_logits, kp_driving, kp_source)
    expected = spec_warp(feature, deformation)
    twin_deformation = reference.mask_deformation(mask_logits, kp_driving, kp_source)
    out, flow_deformation = reference.flow_warp(feature, mask_logits, kp_driving, kp_source)
    torch.testing.assert_close(twin_deformation, deformation, atol=ATOL, rtol=0)
    torch.testing.assert_close(flow_deformation, deformation, atol=ATOL, rtol=0)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    assert out.shape == (b, c + 2, *size)


def test_flow_warp_twin_at_boundaries() -> None:
    b = 2
    kp_driving, kp_source = boundary_keypoints(b)
    k = kp_driving.shape[1]
    gen = torch.Generator().manual_seed(3)
    # Peaked logits: some voxels follow a single (boundary) motion almost exactly.
    mask_logits = torch.randn(b, k + 1, 3, 4, 5, generator=gen) * 20
    feature = torch.randn(b, 3, 3, 4, 5, generator=gen)
    expected = spec_warp(feature, spec_deformation(mask_logits, kp_driving, kp_source))
    out, _ = reference.flow_warp(feature, mask_logits, kp_driving, kp_source)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)


def test_coordinate_grid_matches_spec() -> None:
    torch.testing.assert_close(reference.coordinate_grid(3, 4, 5, torch.float32, "cpu"), spec_grid(3, 4, 5))
    grid = reference.coordinate_grid(2, 2, 3, torch.float32, "cpu")
    assert grid[0, 0, 0].tolist() == [-1.0, -1.0, -1.0]
    assert grid[1, 1, 2].tolist() == [1.0, 1.0, 1.0]
    assert grid[0, 1, 1].tolist() == [0.0, 1.0, -1.0]  # last dim is (x, y, z)


@pytest.mark.skipif(importlib.util.find_spec("engine.models.warping_ops") is None, reason="warping_ops not present")
def test_twins_match_engine_reference_path() -> None:

    b, c, k, size = 2, 4, 21, (4, 5, 6)
    gen = torch.Generator().manual_seed(11)
    compressed = torch.randn(b, c, *size, generator=gen)
    mask_logits = torch.randn(b, k + 1, *size, generator=gen)
    feature = torch.randn(b, 5, *size, generator=gen)
    kp_driving, kp_source = keypoints(b, k, seed=12)
    torch.testing.assert_close(
        reference.sparse_motion_features(compressed, kp_driving, kp_source),
        warping_ops.sparse_motion_input(compressed, kp_driving, kp_source),
        atol=ATOL,
        rtol=0,
    )
    deformation = warping_ops.deformation_from_mask(mask_logits, kp_driving, kp_source)
    out, twin_deformation = reference.flow_warp(feature, mask_logits, kp_driving, kp_source)
    torch.testing.assert_close(twin_deformation, deformation, atol=ATOL, rtol=0)
    torch.testing.assert_close(out, warping_ops.warp_volume(feature, deformation), atol=ATOL, rtol=0)


# ---- the kernels' trilinear arithmetic, emulated on CPU ------------------------------------------------------------


def emulated_kernel_sample(volume: Tensor, grid: Tensor) -> Tensor:
    """avatar_common.cuh's unnormalize / trilinear_corners / sample_channel, vectorised in fp32.

    volume [B, C, D, H, W], grid [B, Do, Ho, Wo, 3] -> [B, C, Do, Ho, Wo].
    """
    b, c, d, h, w = volume.shape
    out_shape = grid.shape[1:4]
    flat = volume.reshape(b, c, d * h * w)
    coords = []
    for axis, size in enumerate((w, h, d)):
        pos = ((grid[..., axis] + 1.0) * size - 1.0) * 0.5
        # fmaxf / fminf: a NaN operand yields the other operand, so NaN ends up at the lower clamp (-2).
        pos = torch.where(torch.isnan(pos), torch.full_like(pos, -2.0), pos).clamp(-2.0, size + 1.0)
        coords.append(pos)
    ix, iy, iz = coords
    x0, y0, z0 = ix.floor(), iy.floor(), iz.floor()
    out = torch.zeros(b, c, *out_shape)
    for corner in range(8):
        dx, dy, dz = corner & 1, (corner >> 1) & 1, (corner >> 2) & 1
        x, y, z = x0 + dx, y0 + dy, z0 + dz
        wx = ix - x0 if dx else (x0 + 1) - ix
        wy = iy - y0 if dy else (y0 + 1) - iy
        wz = iz - z0 if dz else (z0 + 1) - iz
        inside = (x >= 0) & (x < w) & (y >= 0) & (y < h) & (z >= 0) & (z < d)
        offset = torch.where(inside, (z * h + y) * w + x, torch.zeros_like(x)).long().reshape(b, 1, -1)
        values = torch.gather(flat, 2, offset.expand(b, c, -1)).reshape(b, c, *out_shape)
        out = out + torch.where(inside[:, None], values * (wx * wy * wz)[:, None], torch.zeros(()))
    return out


def test_kernel_trilinear_arithmetic_matches_grid_sample() -> None:
    gen = torch.Generator().manual_seed(5)
    volume = torch.randn(2, 3, 3, 4, 5, generator=gen)
    random = torch.rand(2, 4, 5, 6, 3, generator=gen) * 2.6 - 1.3  # inside and just outside [-1, 1]
    edges = torch.tensor([-1.0, 1.0, -1.0 - 1 / 5, 1.0 + 1 / 5, -1.0 + 1 / 5, 0.0, 1.0 - 1e-7, -3.0, 3.0])
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), 1e30, -1e30])
    values = torch.cat([edges, special])
    combos = torch.cartesian_prod(values, edges, values)  # [N, 3] over x, y, z
    boundary = combos[: (combos.shape[0] // 2) * 2].reshape(2, 1, 1, -1, 3)
    for grid in (random, boundary):
        expected = F.grid_sample(volume, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        torch.testing.assert_close(emulated_kernel_sample(volume, grid), expected, atol=ATOL, rtol=0)
