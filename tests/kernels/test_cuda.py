"""GPU checks of the fused kernels (kernels/csrc through NVRTC) against their pure-PyTorch twins.

Tolerances: fp32 <= 1e-5 absolute. fp16 / bf16: the fused kernel's error against the fp32 twin must be at most twice
the error of torch's own low-precision path (the twin run in that dtype) against the same fp32 reference.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from engine.models import warping_ops
from engine.models.warping import WarpingNetwork
from kernels import nvrtc, ops, reference
from tests.kernels.parity import ATOL, assert_warp_close

pytestmark = pytest.mark.cuda

DEVICE = "cuda"


@pytest.fixture(autouse=True)
def _require_kernels() -> None:
    reason = nvrtc.unavailable_reason()
    if reason is not None:
        pytest.fail(f"a CUDA machine must be able to run the fused kernels: {reason}")


def keypoints(b: int, k: int, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    kp_source = torch.rand(b, k, 3, generator=gen) * 0.8 - 0.4
    kp_driving = kp_source + torch.rand(b, k, 3, generator=gen) * 0.1 - 0.05
    kp_source[:, 0] = -1.0  # one motion lands on the volume's corner / edges
    kp_driving[:, 0] = torch.tensor([-0.5, 0.25, 1.0])
    return kp_driving.to(DEVICE), kp_source.to(DEVICE)


def randn(*shape: int, seed: int, scale: float = 1.0) -> Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(DEVICE)


def boundary_grid(b: int) -> Tensor:
    """Sampling points on, just inside and beyond the edges, plus huge coordinates.

    Non-finite coordinates are left out: the kernels give 0 there like torch on CPU, while torch's CUDA grid_sample
    returns NaN for a NaN coordinate (tests/test_kernels_twins.py checks the kernel arithmetic for those on CPU).
    """
    values = torch.tensor([-1.0, 1.0, -1.2, 1.2, -0.8, 0.0, 1.0 - 1e-7, -3.0, 1e30, -1e30])
    points = torch.cartesian_prod(values, values, values[:8])  # [N, 3]
    return points.reshape(1, 1, 1, -1, 3).expand(b, 1, 1, -1, 3).contiguous().to(DEVICE)


# (batch, channels, volume (D, H, W), keypoints); the last case is LivePortrait's dense-motion size
CASES = [(1, 3, (5, 7, 9), 4), (3, 2, (2, 3, 2), 2), (2, 4, (16, 64, 64), 21)]


@pytest.mark.parametrize(("b", "c", "size", "k"), CASES)
def test_grid_sample_3d_fp32(b: int, c: int, size: tuple[int, int, int], k: int) -> None:
    volume = randn(b, c, *size, seed=1)
    grid = randn(b, 4, 5, 6, 3, seed=2, scale=0.7)
    for g in (grid, boundary_grid(b)):
        got = ops.grid_sample_3d(volume, g, impl="fused")
        torch.testing.assert_close(got, reference.grid_sample_3d(volume, g), atol=ATOL, rtol=0)
    # non-contiguous inputs are accepted (made contiguous before the launch)
    strided = volume.transpose(3, 4).contiguous().transpose(3, 4)
    torch.testing.assert_close(
        ops.grid_sample_3d(strided, grid, impl="fused"), reference.grid_sample_3d(volume, grid), atol=ATOL, rtol=0
    )


@pytest.mark.parametrize(("b", "c", "size", "k"), CASES)
def test_sparse_motion_fp32(b: int, c: int, size: tuple[int, int, int], k: int) -> None:
    compressed = randn(b, c, *size, seed=3)
    kp_driving, kp_source = keypoints(b, k, seed=4)
    got = ops.sparse_motion_features(compressed, kp_driving, kp_source, impl="fused")
    expected = reference.sparse_motion_features(compressed, kp_driving, kp_source)
    assert got.shape == (b, (k + 1) * (c + 1), *size)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("b", "c", "size", "k"), CASES)
def test_flow_warp_and_mask_deformation_fp32(b: int, c: int, size: tuple[int, int, int], k: int) -> None:
    feature = randn(b, c * 8, size[0] + 1, size[1], size[2] + 2, seed=5)
    mask_logits = randn(b, k + 1, *size, seed=6, scale=4.0)
    kp_driving, kp_source = keypoints(b, k, seed=7)
    expected_out, expected_deformation = reference.flow_warp(feature, mask_logits, kp_driving, kp_source)
    fused = ops.flow_warp(feature, mask_logits, kp_driving, kp_source, return_deformation=True, impl="fused")
    assert fused.deformation is not None
    assert_warp_close(fused.out, expected_out, feature, fused.deformation, expected_deformation)
    without = ops.flow_warp(feature, mask_logits, kp_driving, kp_source, impl="fused")
    assert without.deformation is None
    torch.testing.assert_close(without.out, fused.out, atol=0, rtol=0)
    deformation = ops.mask_deformation(mask_logits, kp_driving, kp_source, impl="fused")
    torch.testing.assert_close(deformation, expected_deformation, atol=ATOL, rtol=0)


def _max_error(value: Tensor, reference_fp32: Tensor) -> float:
    return (value.float() - reference_fp32).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_no_worse_than_torch(dtype: torch.dtype) -> None:
    b, c, size, k = 2, 4, (16, 64, 64), 21
    feature = randn(b, 32, *size, seed=8)
    compressed = randn(b, c, *size, seed=9)
    mask_logits = randn(b, k + 1, *size, seed=10, scale=4.0)
    grid = randn(b, *size, 3, seed=11, scale=0.7)
    kp_driving, kp_source = keypoints(b, k, seed=12)
    low = {name: t.to(dtype) for name, t in (("feature", feature), ("compressed", compressed), ("mask", mask_logits))}
    checks = {
        "grid_sample_3d": (
            reference.grid_sample_3d(feature, grid),
            reference.grid_sample_3d(low["feature"], grid.to(dtype)),
            ops.grid_sample_3d(low["feature"], grid.to(dtype), impl="fused"),
        ),
        "sparse_motion": (
            reference.sparse_motion_features(compressed, kp_driving, kp_source),
            reference.sparse_motion_features(low["compressed"], kp_driving, kp_source),
            ops.sparse_motion_features(low["compressed"], kp_driving, kp_source, impl="fused"),
        ),
        "flow_warp": (
            reference.flow_warp(feature, mask_logits, kp_driving, kp_source)[0],
            reference.flow_warp(low["feature"], low["mask"], kp_driving, kp_source)[0],
            ops.flow_warp(low["feature"], low["mask"], kp_driving, kp_source, impl="fused").out,
        ),
    }
    for name, (exact, torch_low, fused_low) in checks.items():
        assert fused_low.dtype == dtype, name
        torch_error = _max_error(torch_low, exact)
        fused_error = _max_error(fused_low, exact)
        assert torch_error > 0, name
        assert fused_error <= 2 * torch_error, f"{name}: fused {fused_error:.3g} vs torch {torch_error:.3g}"


def test_auto_uses_fused_and_env_forces_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    volume = randn(1, 2, 3, 4, 5, seed=13)
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    assert ops.use_fused(None, volume)
    monkeypatch.setenv(ops.ENV_VAR, "torch")
    assert not ops.use_fused(None, volume)
    assert not ops.use_fused(None, volume.double())  # fused kernels cover fp32 / fp16 / bf16 only


def test_runs_on_torch_current_stream() -> None:
    volume = randn(2, 8, 16, 64, 64, seed=14)
    grid = randn(2, 16, 64, 64, 3, seed=15, scale=0.7)
    expected = reference.grid_sample_3d(volume, grid)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = ops.grid_sample_3d(volume, grid, impl="fused")
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_compiled_image_is_cached_on_disk(engine_home: Path) -> None:
    major, minor = torch.cuda.get_device_capability()
    nvrtc.compiled_source.cache_clear()
    compiled = nvrtc.compiled_source("grid_sample_3d.cu", major * 10 + minor)
    images = list((engine_home / "kernel_cache").glob(f"grid_sample_3d-{compiled.target}-*"))
    assert len(images) == 1 and images[0].read_bytes() == compiled.image
    nvrtc.compiled_source.cache_clear()


def test_opcheck_on_cuda() -> None:
    feature = randn(2, 3, 4, 6, 5, seed=20)
    mask_logits = randn(2, 5, 3, 5, 4, seed=21)
    compressed = randn(2, 3, 3, 5, 4, seed=22)
    grid = randn(2, 3, 5, 4, 3, seed=23, scale=0.7)
    kp = keypoints(2, 4, seed=24)
    cases = [
        (torch.ops.avatar_engine.grid_sample_3d.default, (feature, grid)),
        (torch.ops.avatar_engine.mask_deformation.default, (mask_logits, *kp)),
        (torch.ops.avatar_engine.flow_warp.default, (feature, mask_logits, *kp, True)),
        (torch.ops.avatar_engine.sparse_motion_features.default, (compressed, *kp)),
    ]
    for op, args in cases:
        results = torch.library.opcheck(op, args)
        assert all(outcome == "SUCCESS" for outcome in results.values()), (op, results)


class _Hourglass(torch.nn.Module):
    def forward(self, compressed: Tensor, kp_driving: Tensor, kp_source: Tensor) -> Tensor:
        return ops.sparse_motion_features(compressed, kp_driving, kp_source, impl="fused") + 1


def test_torch_compile_sees_one_op() -> None:
    graphs: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, example_inputs: list[Tensor]) -> torch.fx.GraphModule:
        graphs.append(gm)
        return gm

    compressed = randn(2, 4, 4, 8, 8, seed=18)
    kp_driving, kp_source = keypoints(2, 3, seed=19)
    torch._dynamo.reset()
    out = torch.compile(_Hourglass(), backend=record, fullgraph=True)(compressed, kp_driving, kp_source)
    targets = [str(n.target) for n in graphs[0].graph.nodes if str(n.target).startswith("avatar_engine.")]
    assert targets == ["avatar_engine.sparse_motion_features.default"]
    torch.testing.assert_close(out, reference.sparse_motion_features(compressed, kp_driving, kp_source) + 1)
    torch._dynamo.reset()
    inductor = torch.compile(_Hourglass(), fullgraph=True)(compressed, kp_driving, kp_source)
    torch.testing.assert_close(inductor, out, atol=ATOL, rtol=0)


def test_warping_module_dispatches_to_fused_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """engine.models.warping_ops sends CUDA inputs to kernels.ops: three launches per forward, same result."""

    if not hasattr(warping_ops, "kernel_ops"):
        pytest.skip("engine.models.warping_ops does not dispatch to kernels.ops")
    launched: list[str] = []
    launch = nvrtc.launch

    def counting_launch(name: str, kernel: str, *args: object, **kwargs: object) -> None:
        launched.append(kernel)
        launch(name, kernel, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(nvrtc, "launch", counting_launch)
    net = WarpingNetwork().to(DEVICE).eval()  # random weights: only the dispatch and the numbers' agreement matter
    feature = randn(2, 32, 16, 64, 64, seed=30)
    kp_driving, kp_source = keypoints(2, 21, seed=31)
    with torch.inference_mode():
        monkeypatch.setenv(ops.ENV_VAR, "torch")
        unfused = net(feature, kp_driving, kp_source)
        assert launched == []
        monkeypatch.setenv(ops.ENV_VAR, "auto")
        fused = net(feature, kp_driving, kp_source)
    assert sorted(launched) == ["avatar_flow_warp_f32", "avatar_grid_sample_3d_f32", "avatar_sparse_motion_f32"]
    # The hourglass and convolutions amplify ulp-level input differences; per-op parity is tested above.
    torch.testing.assert_close(fused.deformation, unfused.deformation, atol=1e-4, rtol=0)
    torch.testing.assert_close(fused.out, unfused.out, atol=1e-3, rtol=1e-3)
