"""Which backend runs the networks, where, in what precision: one frozen config the CLI and files can fill.

``BackendConfig(name, device, dtype, options)``:

* ``name``: a registered backend (:data:`export.backends.BACKEND_NAMES`): ``eager``, ``compile``, ``onnxruntime``,
  ``tensorrt``;
* ``device``: ``auto`` (CUDA when PyTorch sees a GPU, else CPU), ``cpu``, ``cuda`` or ``cuda:N``;
* ``dtype``: ``auto`` (bf16 on GPUs that support it, fp32 on CPU), ``fp32``, ``bf16`` or ``fp16``;
* ``options``: backend-specific keyword arguments, checked against what the backend accepts (e.g. ``dir``: a
  directory of exported files to serve, from ``engine export onnx`` or ``engine export tensorrt``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_CHOICES: tuple[str, ...] = ("auto", *DTYPES)


def resolve_device(device: str) -> torch.device:
    """``auto`` -> ``cuda`` when PyTorch sees a GPU, else ``cpu``; other names are parsed (``ValueError`` if bad)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device: {device!r} is not a device name (auto, cpu, cuda, cuda:N)") from exc
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device: {device!r} is not supported (auto, cpu, cuda, cuda:N)")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} was asked for, but PyTorch sees no CUDA GPU here (use cpu or auto)")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bf16 on a GPU that supports it, else fp32 (CPU inference is fastest and exact in fp32)."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return DTYPES[dtype]


@dataclass(frozen=True)
class BackendConfig:
    name: str = "eager"
    device: str = "auto"
    dtype: str = "auto"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"backend name must be a non-empty string, got {self.name!r}")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {list(DTYPE_CHOICES)}, got {self.dtype!r}")
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"device must be a device name (auto, cpu, cuda, cuda:N), got {self.device!r}")
        if not isinstance(self.options, Mapping) or not all(isinstance(k, str) for k in self.options):
            raise ValueError(f"options must be a mapping of names to values, got {self.options!r}")
        object.__setattr__(self, "options", dict(self.options))  # a private copy: the caller's dict may change

    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype, self.torch_device())
