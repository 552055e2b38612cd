"""TensorRT engine building without TensorRT: the clear error where it is missing, the cache key, the batch
profile, and the builder configuration (precision flags, fp32 grid sampling, timing cache) against a minimal
stand-in for the ``tensorrt`` module (the only part that cannot run here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner

from export import tensorrt
from streaming.cli import main

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed")
def test_cli_says_tensorrt_is_missing(tmp_path: Path) -> None:
    (tmp_path / "onnx").mkdir()
    result = CliRunner().invoke(main, ["export", "tensorrt", "--onnx", str(tmp_path / "onnx"), "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert "TensorRT is not installed" in result.output and "pip install tensorrt" in result.output


def test_cli_validates_max_batch(tmp_path: Path) -> None:
    (tmp_path / "onnx").mkdir()
    result = CliRunner().invoke(
        main, ["export", "tensorrt", "--onnx", str(tmp_path / "onnx"), "--out", str(tmp_path), "--max-batch", "0"]
    )
    assert result.exit_code == 2 and "--max-batch" in result.output


def test_cache_key_depends_on_every_component() -> None:
    base = {"onnx_sha256": "a" * 64, "gpu": "H100 sm_90", "trt_version": "10.5", "precision": "fp16"}
    key = tensorrt.engine_cache_key(**base, plugin_sha256="p")
    assert key == tensorrt.engine_cache_key(**base, plugin_sha256="p")
    for field, value in [
        ("onnx_sha256", "b" * 64),
        ("gpu", "A100 sm_80"),
        ("trt_version", "10.6"),
        ("precision", "bf16"),
    ]:
        assert tensorrt.engine_cache_key(**{**base, field: value}, plugin_sha256="p") != key
    assert tensorrt.engine_cache_key(**base, plugin_sha256="q") != key
    assert tensorrt.timing_cache_name("H100 sm_90", "10.5") != tensorrt.timing_cache_name("H100 sm_90", "10.6")


def test_profile_covers_only_batch_axes() -> None:
    inputs = [
        {"name": "feature_3d", "shape": ["batch", 32, 16, 64, 64]},
        {"name": "kp_driving", "shape": ["batch", 21, 3]},
        {"name": "fixed", "shape": [1, 3]},
    ]
    shapes = tensorrt.profile_shapes(inputs, tensorrt.BuildConfig(min_batch=1, opt_batch=2, max_batch=4))
    assert shapes == {
        "feature_3d": ((1, 32, 16, 64, 64), (2, 32, 16, 64, 64), (4, 32, 16, 64, 64)),
        "kp_driving": ((1, 21, 3), (2, 21, 3), (4, 21, 3)),
    }
    with pytest.raises(tensorrt.EngineBuildError, match="only the batch axis"):
        tensorrt.profile_shapes([{"name": "x", "shape": ["batch", "time"]}], tensorrt.BuildConfig())


def test_build_config_validation() -> None:
    with pytest.raises(ValueError, match="precision"):
        tensorrt.BuildConfig(precision="int8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_batch"):
        tensorrt.BuildConfig(opt_batch=9, max_batch=8)


def test_plugin_library_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(tensorrt.PLUGIN_ENV, raising=False)
    with pytest.raises(tensorrt.TensorRTUnavailable, match="plugin library not found"):
        tensorrt.find_plugin_library()
    lib = tmp_path / "custom.so"
    lib.write_bytes(b"\x7fELF")
    monkeypatch.setenv(tensorrt.PLUGIN_ENV, str(lib))
    assert tensorrt.find_plugin_library() == lib


# ---- builder configuration against a stand-in for the tensorrt module --------------------------------------------


class _Layer:
    def __init__(self, name: str, kind: str, outputs: int = 1):
        self.name, self.type, self.num_outputs = name, kind, outputs
        self.precision: str | None = None
        self.output_types: dict[int, str] = {}

    def set_output_type(self, index: int, dtype: str) -> None:
        self.output_types[index] = dtype


class _Recorder:
    """Builder / config / profile stand-in recording what the configuration code asks of TensorRT."""

    def __init__(self) -> None:
        self.flags: list[str] = []
        self.profiles: list[dict[str, Any]] = []
        self.pool: dict[str, int] = {}
        self.timing: list[tuple[bytes, bool]] = []

    # builder
    def create_builder_config(self) -> _Recorder:
        return self

    def create_optimization_profile(self) -> dict[str, Any]:
        return {}

    # config
    def set_memory_pool_limit(self, pool: str, size: int) -> None:
        self.pool[pool] = size

    def set_flag(self, flag: str) -> None:
        self.flags.append(flag)

    def add_optimization_profile(self, profile: dict[str, Any]) -> None:
        self.profiles.append(profile)

    def create_timing_cache(self, data: bytes) -> bytes:
        return data

    def set_timing_cache(self, cache: bytes, ignore_mismatch: bool) -> None:
        self.timing.append((cache, ignore_mismatch))


class _Profile(dict):
    def set_shape(self, name: str, lo: tuple[int, ...], opt: tuple[int, ...], hi: tuple[int, ...]) -> None:
        self[name] = (lo, opt, hi)


FAKE_TRT: Any = SimpleNamespace(
    LayerType=SimpleNamespace(GRID_SAMPLE="grid_sample", PLUGIN_V2="plugin_v2", PLUGIN_V3="plugin_v3"),
    BuilderFlag=SimpleNamespace(FP16="FP16", BF16="BF16", OBEY_PRECISION_CONSTRAINTS="OBEY"),
    MemoryPoolType=SimpleNamespace(WORKSPACE="workspace"),
    float32="float32",
)


def _network() -> Any:
    layers = [
        _Layer("conv_0", "convolution"),
        _Layer("node_AvatarSparseMotion_3", "plugin_v3"),
        _Layer("node_AvatarFlowWarp_9", "plugin_v3", outputs=2),
        _Layer("grid_sample_12", "grid_sample"),
        _Layer("softmax_4", "softmax"),
    ]
    return SimpleNamespace(num_layers=len(layers), get_layer=layers.__getitem__, layers=layers)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_pins_grid_sampling_to_fp32(precision: str) -> None:
    builder, network = _Recorder(), _network()
    builder.create_optimization_profile = _Profile  # type: ignore[method-assign]
    inputs = [{"name": "feature_3d", "shape": ["batch", 32, 2, 32, 32]}]
    config = tensorrt.BuildConfig(precision=precision, max_batch=4, workspace_gib=1)  # type: ignore[arg-type]
    _, pinned = tensorrt.configure_builder(builder, network, FAKE_TRT, config, inputs, b"cache")
    assert pinned == ["node_AvatarSparseMotion_3", "node_AvatarFlowWarp_9", "grid_sample_12"]
    assert builder.flags == [precision.upper(), "OBEY"]
    by_name = {layer.name: layer for layer in network.layers}
    for name in pinned:
        layer = by_name[name]
        assert layer.precision == "float32"
        assert layer.output_types == dict.fromkeys(range(layer.num_outputs), "float32")
    assert by_name["conv_0"].precision is None and not by_name["softmax_4"].output_types
    assert builder.profiles == [{"feature_3d": ((1, 32, 2, 32, 32), (1, 32, 2, 32, 32), (4, 32, 2, 32, 32))}]
    assert builder.pool == {"workspace": 1 << 30}
    assert builder.timing == [(b"cache", False)]


def test_fp32_build_sets_no_precision_constraints() -> None:
    builder, network = _Recorder(), _network()
    _, pinned = tensorrt.configure_builder(builder, network, FAKE_TRT, tensorrt.BuildConfig(), [], b"")
    assert pinned == [] and builder.flags == [] and builder.profiles == []
    assert all(layer.precision is None for layer in network.layers)


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed")
def test_build_engines_without_tensorrt_names_the_fix(tmp_path: Path) -> None:
    (tmp_path / "index.json").write_text(json.dumps({"format": 1, "modules": {}}))
    with pytest.raises(tensorrt.TensorRTUnavailable, match="pip install tensorrt"):
        tensorrt.build_engines(tmp_path, tmp_path / "engines", tensorrt.BuildConfig())
