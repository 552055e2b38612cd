"""Every CUDA source compiles: with nvcc for sm_80 and sm_90 (the TensorRT plugin's toolchain) and with NVRTC through
cuda-python (the PyTorch front end's toolchain). Neither needs a GPU. The cubins must export every kernel that the
front ends look up by name (unmangled, extern "C")."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from kernels import nvrtc

CSRC = Path(nvrtc.CSRC_DIR)
TRT = CSRC.parent / "trt"
ARCHS = ("sm_80", "sm_90")
KERNEL_PREFIX = {
    "grid_sample_3d.cu": "avatar_grid_sample_3d",
    "flow_warp.cu": "avatar_flow_warp",
    "sparse_motion.cu": "avatar_sparse_motion",
}
DTYPE_SUFFIXES = ("f32", "f16", "bf16")


def _nvcc() -> str:
    found = shutil.which("nvcc") or next((str(p) for p in (Path("/usr/local/cuda/bin/nvcc"),) if p.is_file()), None)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("nvcc is required in CI to check the CUDA sources")
        pytest.skip("nvcc not installed (CUDA toolkit absent); the CUDA sources were not compile-checked")
    return found


def _assert_exports(image: bytes, source: str) -> None:
    for suffix in DTYPE_SUFFIXES:
        name = f"{KERNEL_PREFIX[source]}_{suffix}".encode()
        assert b".text." + name + b"\x00" in image, f"{name!r} missing from the {source} image"


def test_every_source_is_listed() -> None:
    assert sorted(p.name for p in CSRC.glob("*.cu")) == sorted(nvrtc.SOURCES) == sorted(KERNEL_PREFIX)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", sorted(KERNEL_PREFIX))
def test_nvcc_compiles_source(source: str, arch: str, tmp_path: Path) -> None:
    cubin = tmp_path / f"{source}.{arch}.cubin"
    cmd = [_nvcc(), f"-arch={arch}", "-std=c++17", "-Werror", "all-warnings", "-cubin", "-o", str(cubin)]
    result = subprocess.run([*cmd, str(CSRC / source)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    _assert_exports(cubin.read_bytes(), source)


def test_nvcc_compiles_trt_launchers(tmp_path: Path) -> None:
    """kernels/trt/avatar_kernels.cu (all sources in one unit plus host launchers) builds with nvcc -c."""
    obj = tmp_path / "avatar_kernels.o"
    cmd = [_nvcc(), "-arch=sm_80", "-std=c++17", "-Werror", "all-warnings", "-c", "-o", str(obj)]
    result = subprocess.run([*cmd, str(TRT / "avatar_kernels.cu")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert obj.stat().st_size > 0


def _nvrtc_error() -> str | None:
    try:
        nvrtc.nvrtc_version()
    except Exception as error:
        return str(error)
    return None


@pytest.mark.parametrize("target", ["sm_80", "sm_90", "compute_90"])
@pytest.mark.parametrize("source", sorted(KERNEL_PREFIX))
def test_nvrtc_compiles_source(source: str, target: str) -> None:
    error = _nvrtc_error()
    if error is not None:  # cuda-python and NVRTC come with the optional [cuda] extra
        pytest.skip(f"NVRTC not loadable (pip install 'avatar-engine[cuda]'): {error}")
    image = nvrtc.compile_program(source, target)
    if target.startswith("sm_"):
        assert image[:4] == b"\x7fELF"
        _assert_exports(image, source)
    else:
        text = image.decode()
        for suffix in DTYPE_SUFFIXES:
            assert f".entry {KERNEL_PREFIX[source]}_{suffix}(" in text


def test_nvrtc_reports_compile_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if _nvrtc_error() is not None:
        pytest.skip("NVRTC not loadable")
    broken = tmp_path / "csrc"
    broken.mkdir()
    for header in nvrtc.HEADERS:
        (broken / header).write_bytes((CSRC / header).read_bytes())
    (broken / "flow_warp.cu").write_text(
        '#include "avatar_common.cuh"\nextern "C" __global__ void k() { undefined_name; }\n'
    )
    monkeypatch.setattr(nvrtc, "CSRC_DIR", broken)
    with pytest.raises(nvrtc.KernelError, match="undefined_name"):
        nvrtc.compile_program("flow_warp.cu", "sm_80")


@pytest.mark.slow
def test_cmake_builds_kernel_objects(tmp_path: Path) -> None:
    """The top-level CMake project configures (with or without TensorRT) and builds the kernel object library."""
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake not installed")
    nvcc = _nvcc()
    root = CSRC.parents[1]
    build = tmp_path / "build"
    configure = [cmake, "-S", str(root), "-B", str(build), f"-DCMAKE_CUDA_COMPILER={nvcc}"]
    result = subprocess.run(
        [*configure, "-DAVATAR_CUDA_ARCHITECTURES=80", "-DTENSORRT_ROOT=/nonexistent"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "avatar kernels: TensorRT" in result.stdout  # says whether the plugin library is built
    result = subprocess.run(
        [cmake, "--build", str(build), "--target", "avatar_kernels_objects"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert list(build.rglob("avatar_kernels.cu.o"))


def _tensorrt_headers() -> Path:
    root = os.environ.get("TENSORRT_ROOT")
    if not root or not (Path(root) / "include" / "NvInferRuntime.h").is_file():
        pytest.skip("TensorRT headers not installed (set TENSORRT_ROOT to a TensorRT 10+ prefix with include/)")
    return Path(root)


@pytest.mark.slow
def test_trt_plugin_library_builds_and_keeps_its_contract(tmp_path: Path) -> None:
    """With TensorRT's headers (no GPU, no libnvinfer needed): CMake builds libavatar_engine_trt_plugins.so with no
    undefined symbols, and kernels/testing/trt_contract.cpp loads it as TensorRT would and checks every plugin's
    identity, output types and shapes, format negotiation and shape refusals."""
    root = _tensorrt_headers()
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake not installed")
    build = tmp_path / "build"
    configure = [cmake, "-S", str(CSRC.parents[1]), "-B", str(build), f"-DCMAKE_CUDA_COMPILER={_nvcc()}"]
    steps = [
        [*configure, "-DAVATAR_CUDA_ARCHITECTURES=80", f"-DTENSORRT_ROOT={root}"],
        [cmake, "--build", str(build), "--target", "avatar_trt_contract"],
    ]
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
    library = next(build.rglob("libavatar_engine_trt_plugins.so"))
    checker = next(build.rglob("avatar_trt_contract"))
    result = subprocess.run([str(checker), str(library)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok: ")
