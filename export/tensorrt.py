"""TensorRT engines from an ``engine export onnx`` directory (best with ``--flavour tensorrt``).

* The project's plugin library (kernels/trt, ``libavatar_engine_trt_plugins.so``) is loaded before parsing, so the
  ``avatar_engine`` plugin nodes resolve.
* fp16 / bf16 engines keep grid sampling in fp32: the plugin layers and any ``GRID_SAMPLE`` layer are pinned to
  fp32 with ``OBEY_PRECISION_CONSTRAINTS`` (coordinate scaling and the eight-corner sum stay exact to fp32).
* Engines are cached by GPU, TensorRT version, ONNX hash, precision and plugin-library hash; a timing cache
  (one per GPU and TensorRT version) makes rebuilds fast.

TensorRT itself is imported only here and in :mod:`export.backends.tensorrt_backend`; where it is missing every
entry point raises :class:`TensorRTUnavailable` with what to install.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from engine.weights.checkpoint import sha256_file
from export.graphs import BATCH
from export.onnx_export import read_index

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "bf16"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16")
PLUGIN_ENV = "AVATAR_ENGINE_TRT_PLUGINS"
PLUGIN_LIBRARY = "libavatar_engine_trt_plugins.so"
MANIFEST_NAME = "engines.json"
TIMING_CACHE_PREFIX = "timing"


class TensorRTUnavailable(RuntimeError):
    """TensorRT (or a GPU, or the plugin library) is missing; the message says what to install or build."""


class EngineBuildError(RuntimeError):
    """TensorRT could not parse or build a module."""


def import_tensorrt() -> ModuleType:
    try:
        import tensorrt
    except ImportError as exc:
        raise TensorRTUnavailable(
            "TensorRT is not installed: 'pip install tensorrt' (Linux x86-64 / aarch64 with an NVIDIA driver), "
            "then build the plugin library (kernels/README.md). ONNX export works without it."
        ) from exc
    return tensorrt


@dataclass(frozen=True)
class BuildConfig:
    """What an engine is built for. Dynamic-batch ONNX inputs get one profile ``min_batch..max_batch``."""

    precision: Precision = "fp32"
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 8
    workspace_gib: float = 4.0

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {self}")
        if self.workspace_gib <= 0:
            raise ValueError(f"workspace_gib must be > 0, got {self.workspace_gib}")


def find_plugin_library(explicit: Path | None = None) -> Path:
    """``explicit``, else ``$AVATAR_ENGINE_TRT_PLUGINS``, else ``build/libavatar_engine_trt_plugins.so``."""
    candidates = [explicit] if explicit is not None else []
    if os.environ.get(PLUGIN_ENV):
        candidates.append(Path(os.environ[PLUGIN_ENV]))
    candidates.append(Path("build") / PLUGIN_LIBRARY)
    for path in candidates:
        if path is not None and Path(path).is_file():
            return Path(path)
    raise TensorRTUnavailable(
        f"TensorRT plugin library not found (tried {[str(p) for p in candidates]}): build it with "
        "'cmake -S . -B build -DTENSORRT_ROOT=... && cmake --build build' or pass --plugins / set "
        f"${PLUGIN_ENV}"
    )


def gpu_identity() -> str:
    """Name and compute capability of the current CUDA device (engines are specific to both)."""
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable("TensorRT engines need an NVIDIA GPU; none is visible to PyTorch")
    major, minor = torch.cuda.get_device_capability()
    return f"{torch.cuda.get_device_name()} sm_{major}{minor}"


def engine_cache_key(*, onnx_sha256: str, gpu: str, trt_version: str, precision: str, plugin_sha256: str) -> str:
    """Engines are valid only for the same ONNX file, GPU, TensorRT version, precision and plugin build."""
    text = json.dumps([onnx_sha256, gpu, trt_version, precision, plugin_sha256])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def timing_cache_name(gpu: str, trt_version: str) -> str:
    digest = hashlib.sha256(f"{gpu}|{trt_version}".encode()).hexdigest()[:12]
    return f"{TIMING_CACHE_PREFIX}-{digest}.cache"


def profile_shapes(
    inputs: Iterable[Mapping[str, Any]], config: BuildConfig
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """``{input: (min, opt, max)}`` for the inputs whose index shape has a symbolic batch axis."""
    out = {}
    for spec in inputs:
        shape = spec["shape"]
        if BATCH not in shape:
            continue
        if any(isinstance(d, str) and d != BATCH for d in shape):
            raise EngineBuildError(f"input {spec['name']}: only the batch axis may be symbolic, got {shape}")
        out[spec["name"]] = tuple(
            tuple(b if d == BATCH else int(d) for d in shape)
            for b in (config.min_batch, config.opt_batch, config.max_batch)
        )
    return out  # type: ignore[return-value]


def pin_grid_sampling_fp32(network: Any, trt: ModuleType) -> list[str]:
    """Force grid-sampling layers (``GRID_SAMPLE`` and plugin layers: the only plugins in these graphs are the
    avatar grid-sampling ones) to compute and output fp32. Returns the pinned layer names; every other layer
    keeps the builder's reduced precision.
    """
    kinds = {getattr(trt.LayerType, k) for k in ("GRID_SAMPLE", "PLUGIN_V2", "PLUGIN_V3") if hasattr(trt.LayerType, k)}
    pinned = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type not in kinds:
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        pinned.append(layer.name)
    return pinned


def configure_builder(
    builder: Any,
    network: Any,
    trt: ModuleType,
    config: BuildConfig,
    inputs: Iterable[Mapping[str, Any]],
    timing_cache: bytes,
) -> tuple[Any, list[str]]:
    """The builder config for ``network``: precision flags, fp32 grid sampling, batch profile, timing cache."""
    cfg = builder.create_builder_config()
    cfg.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config.workspace_gib * (1 << 30)))
    pinned: list[str] = []
    if config.precision != "fp32":
        cfg.set_flag(trt.BuilderFlag.FP16 if config.precision == "fp16" else trt.BuilderFlag.BF16)
        pinned = pin_grid_sampling_fp32(network, trt)
        if pinned:
            cfg.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    shapes = profile_shapes(inputs, config)
    if shapes:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        cfg.add_optimization_profile(profile)
    cache = cfg.create_timing_cache(timing_cache)
    cfg.set_timing_cache(cache, False)
    return cfg, pinned


@functools.cache
def load_plugins(plugin_library: str) -> None:
    """Register TensorRT's own plugins and the project's library, once per process and library path."""
    trt = import_tensorrt()
    trt.init_libnvinfer_plugins(trt.Logger(trt.Logger.WARNING), "")
    if trt.get_plugin_registry().load_library(plugin_library) is None:
        raise TensorRTUnavailable(f"TensorRT could not load the plugin library {plugin_library}")


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    inputs: Iterable[Mapping[str, Any]],
    config: BuildConfig,
    *,
    plugin_library: Path,
    timing_cache_path: Path,
) -> list[str]:
    """Parse ``onnx_path`` and write the serialized engine; returns the layers pinned to fp32."""
    trt = import_tensorrt()
    trt_logger = trt.Logger(trt.Logger.WARNING)
    load_plugins(str(Path(plugin_library).resolve()))
    builder = trt.Builder(trt_logger)
    explicit = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    network = builder.create_network(0 if explicit is None else 1 << int(explicit))
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"{onnx_path.name}: TensorRT cannot parse the file: {errors}")
    cache = timing_cache_path.read_bytes() if timing_cache_path.is_file() else b""
    cfg, pinned = configure_builder(builder, network, trt, config, inputs, cache)
    serialized = builder.build_serialized_network(network, cfg)
    if serialized is None:
        raise EngineBuildError(f"{onnx_path.name}: TensorRT failed to build an engine (see its log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = engine_path.with_suffix(".tmp")
    tmp.write_bytes(bytes(serialized))
    tmp.replace(engine_path)
    timing_cache_path.write_bytes(bytes(cfg.get_timing_cache().serialize()))
    return pinned


def build_engines(
    onnx_dir: Path,
    out_dir: Path,
    config: BuildConfig,
    *,
    plugin_library: Path | None = None,
    modules: Iterable[str] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Engines for every module of an export directory (cached); writes and returns ``out_dir/engines.json``."""
    from tqdm import tqdm

    trt = import_tensorrt()
    gpu = gpu_identity()
    plugin = find_plugin_library(plugin_library)
    plugin_sha = sha256_file(plugin)
    index = read_index(onnx_dir)
    names = list(modules) if modules is not None else list(index["modules"])
    unknown = [n for n in names if n not in index["modules"]]
    if unknown:
        raise ValueError(f"{onnx_dir}: no module(s) {unknown}; it has {sorted(index['modules'])}")
    standard_samplers = [n for n in names if index["flavour"] == "standard" and index["modules"][n]["grid_sampling"]]
    if standard_samplers:
        logger.warning(
            "%s use ONNX GridSample on 5-D volumes, which TensorRT's parser may reject; export with "
            "'--flavour tensorrt' to use the project's plugins",
            ", ".join(standard_samplers),
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timing = out_dir / timing_cache_name(gpu, trt.__version__)
    engines: dict[str, Any] = {}
    for name in tqdm(names, desc="build tensorrt", unit="engine", disable=not progress):
        record = index["modules"][name]
        key = engine_cache_key(
            onnx_sha256=record["sha256"],
            gpu=gpu,
            trt_version=trt.__version__,
            precision=config.precision,
            plugin_sha256=plugin_sha,
        )
        path = out_dir / f"{name}-{key}.engine"
        cached = path.is_file()
        pinned: list[str] = []
        if not cached:
            pinned = build_engine(
                Path(onnx_dir) / record["file"],
                path,
                record["inputs"],
                config,
                plugin_library=plugin,
                timing_cache_path=timing,
            )
        engines[name] = {
            "file": path.name,
            "cached": cached,
            "fp32_layers": pinned,
            "inputs": record["inputs"],
            "outputs": record["outputs"],
            "weights_sha256": record["weights_sha256"],
        }
    manifest = {
        "gpu": gpu,
        "tensorrt": trt.__version__,
        "precision": config.precision,
        "batch": [config.min_batch, config.opt_batch, config.max_batch],
        "plugin_library": str(plugin),
        "plugin_sha256": plugin_sha,
        "onnx_dir": str(onnx_dir),
        "engines": engines,
    }
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
