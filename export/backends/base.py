"""The backend interface: a named way of running an exportable graph (:class:`export.graphs.Graph`).

A :class:`Backend` turns a graph into a :class:`Runner`: ``runner(*tensors) -> tuple of tensors`` with the graph's
inputs and outputs, on the backend's device. Everything above (renderer, denoiser, benchmarks, parity tests)
uses only this, so switching between eager PyTorch, torch.compile, onnxruntime and TensorRT is a name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor

import kernels
from engine.models.warping_ops import FUSED, OPS, STANDARD, WarpOps
from export.graphs import Graph


class BackendError(RuntimeError):
    """A backend that cannot be selected or cannot run a graph; the message says why and what to do."""


BATCH_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32)


def bucket(batch: int, buckets: tuple[int, ...] = BATCH_BUCKETS) -> int:
    """The smallest bucket that holds ``batch`` (``batch`` itself beyond the largest)."""
    return next((b for b in buckets if b >= batch), batch)


class Runner:
    """A loaded graph: call with the graph's inputs (any device; moved as needed), get its outputs as a tuple.

    With ``buckets``, a call of batch B runs at the smallest bucket >= B: the inputs are padded by repeating
    their last row and the outputs cut back to B. A static-shape backend (torch.compile, CUDA graphs, TensorRT
    profiles) then sees a handful of shapes, each built once, instead of one per batch size a live worker forms.
    """

    def __init__(
        self,
        name: str,
        fn: Callable[..., tuple[Tensor, ...]],
        input_names: tuple[str, ...],
        buckets: tuple[int, ...] | None = None,
    ):
        self.name = name
        self._fn = fn
        self.input_names = input_names
        self.buckets = buckets

    def __call__(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"{self.name} takes {len(self.input_names)} inputs {self.input_names}, got {len(inputs)}")
        if self.buckets is None:
            return self._fn(*inputs)
        b = inputs[0].shape[0]
        size = bucket(b, self.buckets)
        if size == b:
            return self._fn(*inputs)
        padded = tuple(torch.cat([t, t[-1:].expand(size - b, *t.shape[1:])]) for t in inputs)
        return tuple(out[:b] for out in self._fn(*padded))


class Backend(ABC):
    """Base of every backend. ``device`` is a torch device string; ``dtype`` the compute precision."""

    name: ClassVar[str]
    OPTIONS: ClassVar[tuple[str, ...]] = ()  # keyword options the constructor takes (BackendConfig.options)

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.dtype = dtype
        reason = self.unavailable_reason(self.device)
        if reason is not None:
            raise BackendError(f"backend {self.name!r} is unavailable on {self.device}: {reason}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise BackendError(f"backend {self.name!r}: dtype must be float32, float16 or bfloat16, got {dtype}")

    @classmethod
    @abstractmethod
    def unavailable_reason(cls, device: torch.device) -> str | None:
        """``None`` when the backend can run on ``device``, else a one-line reason (missing package, no GPU)."""

    warp_kernels: str = "auto"  # auto | fused | standard (the torch backends take it as option "kernels")

    @property
    def warp_ops(self) -> WarpOps:
        """The warping ops this backend's renderer graphs use: the fused kernels on a GPU where they can be
        compiled (they do softmax, deformation and warp in one pass), else the standard PyTorch path."""
        if self.warp_kernels != "auto":
            return OPS[self.warp_kernels]
        return FUSED if self.device.type == "cuda" and kernels.available() else STANDARD

    @abstractmethod
    def load(self, graph: Graph, *, batch: int = 1) -> Runner:
        """A runner for ``graph``; ``batch`` is the batch it will mostly see (static-shape backends build for it)."""

    def _to_device(self, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return tuple(t.to(self.device, self.dtype) if t.is_floating_point() else t.to(self.device) for t in inputs)
