"""Runtime backends behind one interface (:class:`export.backends.base.Backend`), selected by name.

=============== ==============================================================================================
``eager``       PyTorch modules as they are (reference for every parity test)
``compile``     ``torch.compile`` (inductor; CUDA graphs on GPU)
``onnxruntime`` onnxruntime, CPU provider (CUDA provider on CUDA devices when onnxruntime-gpu is installed)
``tensorrt``    TensorRT engines with the project's plugins (CUDA only; needs ``tensorrt``)
=============== ==============================================================================================

Usage::

    backend = backends.get_backend(BackendConfig("onnxruntime", device="cpu"))
    runner = backend.load(graph)              # graph: export.graphs.Graph
    outputs = runner(*inputs)                 # tuple of tensors, the graph's outputs
    renderer = backends.RendererRuntime(nets, backend)   # appearance / motion / warp_decode per frame
    denoiser = backends.DenoiserRuntime(den, backend)    # drop-in for the LMDM denoiser's __call__

A new backend is one module with a :class:`Backend` subclass plus one entry in ``_BACKENDS`` below.
"""

from __future__ import annotations

import importlib

import torch

from export.backends.base import Backend, BackendError, Runner
from export.backends.config import BackendConfig
from export.backends.runners import DenoiserRuntime, RendererRuntime

# name -> (module, class); imported on use so a missing optional package only affects its backend
_BACKENDS: dict[str, tuple[str, str]] = {
    "eager": ("export.backends.torch_backends", "EagerBackend"),
    "compile": ("export.backends.torch_backends", "CompileBackend"),
    "onnxruntime": ("export.backends.onnxruntime_backend", "OnnxRuntimeBackend"),
    "tensorrt": ("export.backends.tensorrt_backend", "TensorRTBackend"),
}
BACKEND_NAMES: tuple[str, ...] = tuple(_BACKENDS)

__all__ = [
    "BACKEND_NAMES",
    "Backend",
    "BackendConfig",
    "BackendError",
    "DenoiserRuntime",
    "RendererRuntime",
    "Runner",
    "available_backends",
    "backend_class",
    "get_backend",
]


def backend_class(name: str) -> type[Backend]:
    if name not in _BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of {list(BACKEND_NAMES)}")
    module, attr = _BACKENDS[name]
    cls: type[Backend] = getattr(importlib.import_module(module), attr)
    return cls


def available_backends(device: str | torch.device = "cpu") -> dict[str, str | None]:
    """``{name: None if usable on device else the reason}`` for every backend."""
    dev = torch.device(device)
    return {name: backend_class(name).unavailable_reason(dev) for name in BACKEND_NAMES}


def get_backend(config: BackendConfig) -> Backend:
    """The backend ``config`` names, on its device and dtype; the error says why it cannot run and lists the
    backends usable there."""
    try:
        device = config.torch_device()
        dtype = config.torch_dtype()
    except ValueError as exc:
        raise BackendError(str(exc)) from exc
    if config.name not in _BACKENDS:
        usable = [n for n, reason in available_backends(device).items() if reason is None]
        raise BackendError(
            f"unknown backend {config.name!r}; available on {device}: {usable} (all: {list(BACKEND_NAMES)})"
        )
    cls = backend_class(config.name)
    reason = cls.unavailable_reason(device)
    if reason is not None:
        usable = [n for n, r in available_backends(device).items() if r is None]
        raise BackendError(f"backend {config.name!r} is unavailable on {device}: {reason}. Available there: {usable}")
    unknown = sorted(set(config.options) - set(cls.OPTIONS))
    if unknown:
        raise BackendError(
            f"backend {config.name!r} takes no option(s) {unknown}; its options: {sorted(cls.OPTIONS) or 'none'}"
        )
    return cls(device, dtype, **config.options)
