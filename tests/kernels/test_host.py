"""The CUDA kernels' own code, compiled for the CPU and checked against the twins.

kernels/testing/host_emulation.h turns kernels/csrc/*.cu into plain C++ functions (one "thread" whose grid-stride
loop covers all work items), built here with the host C++ compiler and called through ctypes. This runs the exact
device code paths (index math, output layouts, softmax, heatmaps, trilinear weights, fp16 / bf16 storage) without a
GPU. Tolerances as on the GPU: fp32 <= 1e-5; fp16 / bf16 at most twice the error of torch's own low-precision path.
Only the launch configuration and the PTX fp16 conversion differ from a GPU run (tests/test_kernels_cuda.py).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from torch import Tensor

from kernels import reference
from tests.kernels.parity import ATOL, assert_warp_close

TESTING = Path(reference.__file__).parent / "testing"
SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


@pytest.fixture(scope="module")
def host_kernels(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        if os.environ.get("CI"):
            pytest.fail("a C++ compiler is required in CI to run the kernels on the CPU")
        pytest.skip("no C++ compiler (g++ / clang++) to build the host emulation of the kernels")
    out = tmp_path_factory.mktemp("host_kernels")
    probe = out / "probe.cpp"
    probe.write_text("int main() { _Float16 h = static_cast<_Float16>(1.0f); return static_cast<int>(h) - 1; }\n")
    if subprocess.run([compiler, "-std=c++17", str(probe), "-o", str(out / "probe")], capture_output=True).returncode:
        pytest.skip(f"{compiler} has no _Float16, needed to emulate fp16 storage")
    library = out / "libavatar_host_kernels.so"
    cmd = [compiler, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas", "-shared", "-fPIC"]
    result = subprocess.run(
        [*cmd, str(TESTING / "host_kernels.cpp"), "-o", str(library)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return ctypes.CDLL(str(library))


def call(lib: ctypes.CDLL, name: str, args: Sequence[Tensor | int | None]) -> None:
    values: list[ctypes.c_void_p | ctypes.c_int] = []
    for arg in args:
        if isinstance(arg, Tensor):
            assert arg.is_contiguous() and arg.device.type == "cpu"
            values.append(ctypes.c_void_p(arg.data_ptr()))
        elif arg is None:
            values.append(ctypes.c_void_p(0))
        else:
            values.append(ctypes.c_int(arg))
    getattr(lib, name)(*values)


def host_grid_sample(lib: ctypes.CDLL, volume: Tensor, grid: Tensor) -> Tensor:
    b, c, d, h, w = volume.shape
    _, do, ho, wo, _ = grid.shape
    out = torch.full((b, c, do, ho, wo), float("nan"), dtype=volume.dtype)
    call(lib, f"avatar_grid_sample_3d_{SUFFIX[volume.dtype]}", [volume, grid, out, b, c, d, h, w, do, ho, wo])
    return out


def host_flow_warp(
    lib: ctypes.CDLL, feature: Tensor | None, mask: Tensor, kp_d: Tensor, kp_s: Tensor
) -> tuple[Tensor | None, Tensor]:
    b, k1, d, h, w = mask.shape
    out = None
    if feature is not None:
        c, df, hf, wf = feature.shape[1:]
        out = torch.full((b, c, d, h, w), float("nan"), dtype=feature.dtype)
    else:
        c, df, hf, wf = 0, 1, 1, 1
    deformation = torch.full((b, d, h, w, 3), float("nan"), dtype=mask.dtype)
    kp = [kp_d.float().contiguous(), kp_s.float().contiguous()]
    args = [feature, mask, *kp, out, deformation, b, c, df, hf, wf, k1 - 1, d, h, w]
    call(lib, f"avatar_flow_warp_{SUFFIX[mask.dtype]}", args)
    return out, deformation


def host_sparse_motion(lib: ctypes.CDLL, compressed: Tensor, kp_d: Tensor, kp_s: Tensor) -> Tensor:
    b, c, d, h, w = compressed.shape
    k = kp_d.shape[1]
    out = torch.full((b, (k + 1) * (c + 1), d, h, w), float("nan"), dtype=compressed.dtype)
    kp = [kp_d.float().contiguous(), kp_s.float().contiguous()]
    call(lib, f"avatar_sparse_motion_{SUFFIX[compressed.dtype]}", [compressed, *kp, out, b, c, k, d, h, w])
    return out


def keypoints(b: int, k: int, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    kp_source = torch.rand(b, k, 3, generator=gen) * 0.8 - 0.4
    kp_driving = kp_source + torch.rand(b, k, 3, generator=gen) * 0.1 - 0.05
    kp_source[:, 0] = -1.0  # one motion on the corner voxel and shifted to the edges
    kp_driving[:, 0] = torch.tensor([-0.5, 0.25, 1.0])
    return kp_driving, kp_source


CASES = [(1, 3, (5, 7, 9), 4), (3, 2, (2, 3, 2), 2), (2, 4, (4, 16, 16), 21), (1, 4, (16, 64, 64), 21)]


@pytest.mark.parametrize(("b", "c", "size", "k"), CASES)
def test_host_kernels_fp32_match_twins(host_kernels: ctypes.CDLL, b: int, c: int, size: tuple, k: int) -> None:
    gen = torch.Generator().manual_seed(b * 7 + k)
    volume = torch.randn(b, c, *size, generator=gen)
    feature = torch.randn(b, c + 5, size[0] + 1, size[1], size[2] + 2, generator=gen)
    mask = torch.randn(b, k + 1, *size, generator=gen) * 4
    kp_d, kp_s = keypoints(b, k, seed=k)
    edges = torch.tensor([-1.0, 1.0, -1.2, 1.2, 0.0, 1.0 - 1e-7, -3.0, 1e30, float("inf"), float("nan")])
    boundary = torch.cartesian_prod(edges, edges, edges[:6]).reshape(1, 1, 1, -1, 3).expand(b, 1, 1, -1, 3)
    for grid in (torch.rand(b, 3, 4, 5, 3, generator=gen) * 2.6 - 1.3, boundary.contiguous()):
        torch.testing.assert_close(
            host_grid_sample(host_kernels, volume, grid), reference.grid_sample_3d(volume, grid), atol=ATOL, rtol=0
        )

    torch.testing.assert_close(
        host_sparse_motion(host_kernels, volume, kp_d, kp_s),
        reference.sparse_motion_features(volume, kp_d, kp_s),
        atol=ATOL,
        rtol=0,
    )

    out, deformation = host_flow_warp(host_kernels, feature, mask, kp_d, kp_s)
    expected_out, expected_deformation = reference.flow_warp(feature, mask, kp_d, kp_s)
    assert out is not None
    assert_warp_close(out, expected_out, feature, deformation, expected_deformation)
    none, deformation_only = host_flow_warp(host_kernels, None, mask, kp_d, kp_s)  # mask_deformation's launch
    assert none is None
    torch.testing.assert_close(deformation_only, expected_deformation, atol=ATOL, rtol=0)


def _warped(out: Tensor | None) -> Tensor:
    assert out is not None
    return out


def _max_error(value: Tensor, exact: Tensor) -> float:
    return (value.float() - exact).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_host_kernels_low_precision_no_worse_than_torch(host_kernels: ctypes.CDLL, dtype: torch.dtype) -> None:
    b, c, size, k = 2, 4, (4, 16, 16), 21
    gen = torch.Generator().manual_seed(1)
    volume = torch.randn(b, c, *size, generator=gen)
    feature = torch.randn(b, 8, *size, generator=gen)
    mask = torch.randn(b, k + 1, *size, generator=gen) * 4
    grid = torch.rand(b, *size, 3, generator=gen) * 1.4 - 0.7
    kp_d, kp_s = keypoints(b, k, seed=2)
    lo = {"volume": volume.to(dtype), "feature": feature.to(dtype), "mask": mask.to(dtype), "grid": grid.to(dtype)}
    checks: dict[str, tuple[Tensor, Tensor, Callable[[], Tensor]]] = {
        "grid_sample_3d": (
            reference.grid_sample_3d(volume, grid),
            reference.grid_sample_3d(lo["volume"], lo["grid"]),
            lambda: host_grid_sample(host_kernels, lo["volume"], lo["grid"]),
        ),
        "sparse_motion": (
            reference.sparse_motion_features(volume, kp_d, kp_s),
            reference.sparse_motion_features(lo["volume"], kp_d, kp_s),
            lambda: host_sparse_motion(host_kernels, lo["volume"], kp_d, kp_s),
        ),
        "flow_warp": (
            reference.flow_warp(feature, mask, kp_d, kp_s)[0],
            reference.flow_warp(lo["feature"], lo["mask"], kp_d, kp_s)[0],
            lambda: _warped(host_flow_warp(host_kernels, lo["feature"], lo["mask"], kp_d, kp_s)[0]),
        ),
    }
    for name, (exact, torch_low, run_host) in checks.items():
        host_low = run_host()
        assert host_low.dtype == dtype, name
        torch_error, host_error = _max_error(torch_low, exact), _max_error(host_low, exact)
        assert torch_error > 0, name
        assert host_error <= 2 * torch_error, f"{name}: kernel {host_error:.3g} vs torch {torch_error:.3g}"
