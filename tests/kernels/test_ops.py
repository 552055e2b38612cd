"""CPU checks of the PyTorch front end: impl selection, custom-op registration (opcheck, export, compile), input
validation and the NVRTC cache. The CUDA launches themselves are covered by tests/test_kernels_cuda.py."""

from __future__ import annotations

import contextlib
import ctypes
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor

from kernels import nvrtc, ops, reference


def make_inputs(b: int = 2, c: int = 3, k: int = 4, size: tuple[int, int, int] = (3, 5, 4)) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(0)
    kp_source = torch.rand(b, k, 3, generator=gen) * 0.8 - 0.4
    return {
        "feature": torch.randn(b, c, 4, 6, 5, generator=gen),
        "compressed": torch.randn(b, c, *size, generator=gen),
        "mask_logits": torch.randn(b, k + 1, *size, generator=gen),
        "grid": torch.rand(b, *size, 3, generator=gen) * 2.4 - 1.2,
        "kp_driving": kp_source + torch.rand(b, k, 3, generator=gen) * 0.1 - 0.05,
        "kp_source": kp_source,
    }


# ---- impl selection ---------------------------------------------------------------------------------------------


def test_impl_argument_wins_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ops.ENV_VAR, "torch")
    assert ops.selected_impl() == "torch"
    assert ops.selected_impl("fused") == "fused"
    monkeypatch.setenv(ops.ENV_VAR, " Fused ")
    assert ops.selected_impl() == "fused"  # read at call time, not at import
    monkeypatch.delenv(ops.ENV_VAR)
    assert ops.selected_impl() == "auto"


def test_bad_impl_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ops.ENV_VAR, "triton")
    with pytest.raises(ValueError, match=r"AVATAR_ENGINE_KERNELS.*'triton'"):
        ops.selected_impl()
    with pytest.raises(ValueError, match="impl argument"):
        ops.selected_impl("cuda")  # type: ignore[arg-type]


def test_auto_on_cpu_uses_plain_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.zeros(1, 1, 2, 2, 2)
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    assert not ops.use_fused(None, x)
    assert ops.use_fused("fused", x)
    monkeypatch.setenv(ops.ENV_VAR, "fused")
    assert ops.use_fused(None, x)
    assert not ops.use_fused("torch", x)


# ---- custom ops on CPU --------------------------------------------------------------------------------------------


def test_fused_impl_on_cpu_equals_twins() -> None:
    t = make_inputs()
    kp = (t["kp_driving"], t["kp_source"])
    torch.testing.assert_close(
        ops.grid_sample_3d(t["feature"], t["grid"], impl="fused"), reference.grid_sample_3d(t["feature"], t["grid"])
    )
    fused = ops.flow_warp(t["feature"], t["mask_logits"], *kp, return_deformation=True, impl="fused")
    twin_out, twin_deformation = reference.flow_warp(t["feature"], t["mask_logits"], *kp)
    torch.testing.assert_close(fused.out, twin_out)
    assert fused.deformation is not None
    torch.testing.assert_close(fused.deformation, twin_deformation)
    assert ops.flow_warp(t["feature"], t["mask_logits"], *kp, impl="fused").deformation is None
    torch.testing.assert_close(
        ops.mask_deformation(t["mask_logits"], *kp, impl="fused"), twin_deformation, atol=0, rtol=0
    )
    torch.testing.assert_close(
        ops.sparse_motion_features(t["compressed"], *kp, impl="fused"),
        reference.sparse_motion_features(t["compressed"], *kp),
    )


def test_opcheck_all_ops() -> None:
    t = make_inputs()
    kp = (t["kp_driving"], t["kp_source"])
    cases = [
        (torch.ops.avatar_engine.grid_sample_3d.default, (t["feature"], t["grid"])),
        (torch.ops.avatar_engine.mask_deformation.default, (t["mask_logits"], *kp)),
        (torch.ops.avatar_engine.flow_warp.default, (t["feature"], t["mask_logits"], *kp, True)),
        (torch.ops.avatar_engine.flow_warp.default, (t["feature"], t["mask_logits"], *kp, False)),
        (torch.ops.avatar_engine.sparse_motion_features.default, (t["compressed"], *kp)),
    ]
    for op, args in cases:
        results = torch.library.opcheck(op, args)
        assert results, op
        assert all(outcome == "SUCCESS" for outcome in results.values()), (op, results)


class _Warp(torch.nn.Module):
    def forward(self, feature: Tensor, mask_logits: Tensor, kp_driving: Tensor, kp_source: Tensor) -> Tensor:
        return ops.flow_warp(feature, mask_logits, kp_driving, kp_source, impl="fused").out


class _Hourglass(torch.nn.Module):
    def forward(self, compressed: Tensor, kp_driving: Tensor, kp_source: Tensor) -> Tensor:
        return ops.sparse_motion_features(compressed, kp_driving, kp_source, impl="fused") * 2


def _custom_nodes(graph: torch.fx.Graph) -> list[str]:
    return [str(node.target) for node in graph.nodes if str(node.target).startswith("avatar_engine.")]


def test_export_shows_one_custom_op_node() -> None:
    t = make_inputs()
    kp = (t["kp_driving"], t["kp_source"])
    exported = torch.export.export(_Warp(), (t["feature"], t["mask_logits"], *kp))
    assert _custom_nodes(exported.graph) == ["avatar_engine.flow_warp.default"]
    torch.testing.assert_close(
        exported.module()(t["feature"], t["mask_logits"], *kp), _Warp()(t["feature"], t["mask_logits"], *kp)
    )
    exported = torch.export.export(_Hourglass(), (t["compressed"], *kp))
    assert _custom_nodes(exported.graph) == ["avatar_engine.sparse_motion_features.default"]


def test_torch_compile_sees_one_op() -> None:
    t = make_inputs()
    kp = (t["kp_driving"], t["kp_source"])
    graphs: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, example_inputs: list[Tensor]) -> torch.fx.GraphModule:
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    compiled = torch.compile(_Hourglass(), backend=record, fullgraph=True)
    out = compiled(t["compressed"], *kp)
    torch.testing.assert_close(out, 2 * reference.sparse_motion_features(t["compressed"], *kp))
    assert len(graphs) == 1
    assert _custom_nodes(graphs[0].graph) == ["avatar_engine.sparse_motion_features.default"]


# ---- validation ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["torch", "fused"])
def test_bad_inputs_name_the_problem(impl: ops.Impl) -> None:
    t = make_inputs()
    kp = (t["kp_driving"], t["kp_source"])
    with pytest.raises(ValueError, match="grid must be"):
        ops.grid_sample_3d(t["feature"], t["grid"][..., :2], impl=impl)
    with pytest.raises(ValueError, match="input must be 5-D"):
        ops.grid_sample_3d(t["feature"][0], t["grid"], impl=impl)
    with pytest.raises(ValueError, match=r"grid is torch\.float64"):
        ops.grid_sample_3d(t["feature"], t["grid"].double(), impl=impl)
    with pytest.raises(ValueError, match=r"K\+1 = 5 channels"):
        ops.mask_deformation(t["mask_logits"][:, :4], *kp, impl=impl)
    with pytest.raises(ValueError, match="kp_source must be"):
        ops.sparse_motion_features(t["compressed"], t["kp_driving"], t["kp_source"][:1], impl=impl)
    with pytest.raises(ValueError, match="at least 2 voxels"):
        ops.sparse_motion_features(t["compressed"][:, :, :1], *kp, impl=impl)
    with pytest.raises(ValueError, match="feature batch"):
        ops.flow_warp(t["feature"][:1], t["mask_logits"], *kp, impl=impl)


# ---- NVRTC: targets, cache, availability -----------------------------------------------------------------------


def test_select_target() -> None:
    assert nvrtc.select_target(90, (75, 80, 90)) == "sm_90"
    assert nvrtc.select_target(89, (75, 80, 90)) == "compute_80"  # unknown arch: PTX for the newest older one
    with pytest.raises(nvrtc.KernelError, match=r"compute capability 7\.0"):
        nvrtc.select_target(70, (75, 80))


def _nvrtc_works() -> bool:
    try:
        nvrtc.nvrtc_version()
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _nvrtc_works(), reason="NVRTC (nvidia-cuda-nvrtc) not installed")
def test_compiled_source_is_cached_on_disk(engine_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nvrtc.compiled_source.cache_clear()
    first = nvrtc.compiled_source("grid_sample_3d.cu", 80)
    assert first.target == "sm_80"
    files = list((engine_home / "kernel_cache").glob("grid_sample_3d-sm_80-*.cubin"))
    assert len(files) == 1 and files[0].read_bytes() == first.image

    def fail(name: str, target: str) -> bytes:
        raise AssertionError("recompiled although the disk cache holds the image")

    monkeypatch.setattr(nvrtc, "compile_program", fail)
    nvrtc.compiled_source.cache_clear()
    assert nvrtc.compiled_source("grid_sample_3d.cu", 80) == first
    nvrtc.compiled_source.cache_clear()


def test_launch_without_cuda_explains_why() -> None:
    if nvrtc.available():
        pytest.skip("kernels are available here")
    assert nvrtc.unavailable_reason()
    with pytest.raises(nvrtc.KernelError, match="fused kernels unavailable"):
        nvrtc.launch("grid_sample_3d.cu", "avatar_grid_sample_3d_f32", 1, [], torch.device("cuda", 0))


def test_torch_compile_follows_env_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """With impl=None the setting comes from the environment, also under fullgraph compilation."""
    t = make_inputs()
    graphs: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, example_inputs: list[Tensor]) -> torch.fx.GraphModule:
        graphs.append(gm)
        return gm

    def warp(volume: Tensor, grid: Tensor) -> Tensor:
        return ops.grid_sample_3d(volume, grid)

    for setting, expected in (("fused", ["avatar_engine.grid_sample_3d.default"]), ("torch", [])):
        monkeypatch.setenv(ops.ENV_VAR, setting)
        torch._dynamo.reset()
        graphs.clear()
        out = torch.compile(warp, backend=record, fullgraph=True)(t["feature"], t["grid"])
        torch.testing.assert_close(out, reference.grid_sample_3d(t["feature"], t["grid"]))
        assert _custom_nodes(graphs[0].graph) == expected, setting
    torch._dynamo.reset()


# ---- launch ABI: what the CUDA kernels of the custom ops pass to cuLaunchKernel ----------------------------------


def _kernel_parameters(source: str) -> list[tuple[str, str]]:
    """(kind, name) of the extern "C" kernel's parameters, read from the CUDA source: kind "ptr" or "int"."""
    text = (nvrtc.CSRC_DIR / source).read_text().replace("\\\n", " ")
    match = re.search(r"avatar_\w+_##SUFFIX\(([^)]*)\)", text)
    assert match is not None, source
    params = [p.strip() for p in match.group(1).split(",")]
    return [("ptr" if "*" in p else "int", p.replace("*", " ").split()[-1]) for p in params]


class _FakeDriver:
    """Stands in for cuda.bindings.driver: records each launch and decodes its void** parameter array."""

    def __init__(self) -> None:
        self.launches: list[dict[str, object]] = []

    def cuLibraryLoadData(self, image: bytes, *options: object) -> tuple[int, str]:
        return 0, "library"

    def cuLibraryGetKernel(self, library: str, name: bytes) -> tuple[int, str]:
        return 0, name.decode()

    def cuCtxGetCurrent(self) -> tuple[int, int]:
        return 0, 1

    def CUstream(self, handle: int) -> int:
        return handle

    def cuLaunchKernel(self, kernel: str, gx: int, gy: int, gz: int, bx: int, by: int, bz: int, shared: int,
                       stream: int, params: int, extra: int) -> tuple[int]:  # fmt: skip
        source = next(s for s in nvrtc.SOURCES if kernel.startswith("avatar_" + s.removesuffix(".cu")))
        signature = _kernel_parameters(source)
        slots = (ctypes.c_void_p * len(signature)).from_address(params)
        values = {
            name: (ctypes.c_void_p.from_address(slot).value or 0)
            if kind == "ptr"
            else ctypes.c_int.from_address(slot).value
            for (kind, name), slot in zip(signature, slots, strict=True)
        }
        self.launches.append({"kernel": kernel, "grid": (gx, gy, gz), "block": (bx, by, bz), "stream": stream,
                              "values": values})  # fmt: skip
        return (0,)


@pytest.fixture
def fake_driver(monkeypatch: pytest.MonkeyPatch) -> Iterator[_FakeDriver]:
    driver = _FakeDriver()
    monkeypatch.setattr(nvrtc, "_bindings", lambda: (driver, None))
    monkeypatch.setattr(nvrtc, "unavailable_reason", lambda: None)
    monkeypatch.setattr(nvrtc, "compiled_source", lambda name, arch: nvrtc.CompiledSource(b"image", f"sm_{arch}"))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda index=None: SimpleNamespace(cuda_stream=777))
    nvrtc._library.cache_clear()
    nvrtc._kernel.cache_clear()
    yield driver
    nvrtc._library.cache_clear()  # the fake handles must not outlive the test
    nvrtc._kernel.cache_clear()


def _check_launch(launch: dict[str, object], kernel: str, threads: int, expected: dict[str, int]) -> None:
    assert launch["kernel"] == kernel
    assert launch["block"] == (nvrtc.BLOCK_SIZE, 1, 1)
    assert launch["grid"] == ((threads + nvrtc.BLOCK_SIZE - 1) // nvrtc.BLOCK_SIZE, 1, 1)
    assert launch["stream"] == 777
    assert launch["values"] == expected


def test_launch_arguments_match_kernel_signatures(fake_driver: _FakeDriver) -> None:
    t = make_inputs(b=2, c=3, k=4, size=(3, 5, 4))
    kp_d, kp_s = t["kp_driving"], t["kp_source"]
    feature, mask, compressed, grid = t["feature"], t["mask_logits"], t["compressed"], t["grid"]
    ptr = {name: tensor.data_ptr() for name, tensor in t.items()}

    out = ops._grid_sample_3d_cuda(feature, grid)
    dims = {"B": 2, "C": 3, "D": 4, "H": 6, "W": 5, "Do": 3, "Ho": 5, "Wo": 4}
    expected = {"input": ptr["feature"], "grid": ptr["grid"], "output": out.data_ptr(), **dims}
    _check_launch(fake_driver.launches[-1], "avatar_grid_sample_3d_f32", 2 * 3 * 5 * 4, expected)

    kp = {"kp_driving": ptr["kp_driving"], "kp_source": ptr["kp_source"]}
    mask_dims = {"B": 2, "K": 4, "D": 3, "H": 5, "W": 4}
    out, deformation = ops._flow_warp_cuda(feature, mask, kp_d, kp_s, True)
    expected = {"feature": ptr["feature"], "mask_logits": ptr["mask_logits"], **kp, "out": out.data_ptr()}
    expected |= {"deformation": deformation.data_ptr(), "C": 3, "Df": 4, "Hf": 6, "Wf": 5, **mask_dims}
    _check_launch(fake_driver.launches[-1], "avatar_flow_warp_f32", 2 * 3 * 5 * 4, expected)
    assert out.shape == (2, 3, 3, 5, 4) and deformation.shape == (2, 3, 5, 4, 3)

    _, empty = ops._flow_warp_cuda(feature, mask, kp_d, kp_s, False)
    assert empty.numel() == 0 and fake_driver.launches[-1]["values"]["deformation"] == 0  # type: ignore[index]

    deformation = ops._mask_deformation_cuda(mask, kp_d, kp_s)
    expected = {"feature": 0, "mask_logits": ptr["mask_logits"], **kp, "out": 0, "deformation": deformation.data_ptr()}
    expected |= {"C": 0, "Df": 1, "Hf": 1, "Wf": 1, **mask_dims}
    _check_launch(fake_driver.launches[-1], "avatar_flow_warp_f32", 2 * 3 * 5 * 4, expected)

    out = ops._sparse_motion_cuda(compressed, kp_d, kp_s)
    expected = {"compressed": ptr["compressed"], **kp, "out": out.data_ptr(), "C": 3, **mask_dims}
    _check_launch(fake_driver.launches[-1], "avatar_sparse_motion_f32", 2 * 5 * 3 * 5 * 4, expected)
    assert out.shape == (2, 5 * 4, 3, 5, 4)

    ops._sparse_motion_cuda(compressed.half(), kp_d.double(), kp_s)  # keypoints are handed over as fp32 copies
    launch = fake_driver.launches[-1]
    assert launch["kernel"] == "avatar_sparse_motion_f16"
    assert launch["values"]["kp_driving"] not in (0, ptr["kp_driving"])  # type: ignore[index]
