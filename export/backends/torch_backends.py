"""PyTorch backends: ``eager`` (the modules as they are) and ``compile`` (``torch.compile``; on CUDA the
``reduce-overhead`` mode, which records CUDA graphs).

In fp32 both run the graph's own modules, moved to the backend's device (not copied: full-size networks are
~100M parameters); another dtype works on a cast copy and leaves the shared networks untouched.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from engine.models.warping_ops import OPS
from export.backends.base import Backend, BackendError, Runner
from export.graphs import Graph, cast_graph


def _prepared(graph: Graph, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    module = cast_graph(graph, dtype).module if dtype != torch.float32 else graph.module
    return module.to(device).eval()


def _kernels_option(value: str) -> str:
    if value not in ("auto", *OPS):
        raise BackendError(f"option kernels must be one of {['auto', *OPS]}, got {value!r}")
    return value


def _as_tuple(out: object) -> tuple[Tensor, ...]:
    if isinstance(out, (tuple, list)):
        return tuple(out)
    assert isinstance(out, Tensor)
    return (out,)


class CudaGraphs:
    """Replays a module from CUDA graphs, one per input shape and dtype, captured on first use.

    Frames at batch 1-16 are small work for a GPU: launching the warping network's and decoder's ~200 kernels
    one by one costs more than running them. A captured graph launches them all at once. Inputs are copied into
    the graph's static buffers (device to device) and the outputs are cloned out of them, because the next replay
    overwrites them. Shapes are few when the caller buckets its batches (:class:`~export.backends.base.Runner`).
    All graphs share one memory pool; capture is thread-local, so other threads keep using the device meanwhile.
    """

    WARMUP = 2  # eager runs before capture: kernels compile (NVRTC), libraries pick their algorithms

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self.module = module
        self.device = device
        self.graphs: dict[tuple[Any, ...], tuple[list[Tensor], tuple[Tensor, ...], torch.cuda.CUDAGraph]] = {}
        self._pool: Any = None

    def __call__(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        entry = self.graphs.get(key) or self._capture(key, inputs)
        static_in, static_out, graph = entry
        for buffer, t in zip(static_in, inputs, strict=True):
            buffer.copy_(t, non_blocking=True)
        graph.replay()
        return tuple(t.clone() for t in static_out)

    def _capture(
        self, key: tuple[Any, ...], inputs: tuple[Tensor, ...]
    ) -> tuple[list[Tensor], tuple[Tensor, ...], torch.cuda.CUDAGraph]:
        static_in = [t.clone() for t in inputs]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP):
                self.module(*static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            static_out = _as_tuple(self.module(*static_in))
        self._pool = graph.pool()
        self.graphs[key] = (static_in, static_out, graph)
        return self.graphs[key]


class EagerBackend(Backend):
    """The modules as they are. On CUDA the calls replay CUDA graphs (option ``cuda_graphs``, default on)."""

    name = "eager"
    OPTIONS = ("cuda_graphs", "kernels")

    def __init__(
        self,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        cuda_graphs: bool = True,
        kernels: str = "auto",
    ):
        super().__init__(device, dtype)
        self.cuda_graphs = bool(cuda_graphs) and self.device.type == "cuda"
        self.warp_kernels = _kernels_option(kernels)

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> str | None:
        if device.type == "cuda" and not torch.cuda.is_available():
            return "no CUDA device visible to PyTorch"
        return None

    def load(self, graph: Graph, *, batch: int = 1) -> Runner:
        module = _prepared(graph, self.device, self.dtype)
        call: Callable[..., Any] = CudaGraphs(module, self.device) if self.cuda_graphs else module

        def run(*inputs: Tensor) -> tuple[Tensor, ...]:
            with torch.inference_mode():
                return _as_tuple(call(*self._to_device(inputs)))

        return Runner(graph.name, run, tuple(s.name for s in graph.inputs))


class CompileBackend(Backend):
    """``torch.compile`` with inductor. The first call of each input shape compiles (seconds to minutes)."""

    name = "compile"
    OPTIONS = ("kernels",)

    def __init__(
        self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, *, kernels: str = "auto"
    ):
        super().__init__(device, dtype)
        self.warp_kernels = _kernels_option(kernels)

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> str | None:
        if device.type == "cuda" and not torch.cuda.is_available():
            return "no CUDA device visible to PyTorch"
        if device.type == "cpu" and shutil.which("cc") is None and shutil.which("gcc") is None:
            return "inductor's CPU code generation needs a C++ compiler (cc / gcc) on PATH"
        return None

    def load(self, graph: Graph, *, batch: int = 1) -> Runner:
        module = _prepared(graph, self.device, self.dtype)
        # CUDA graphs remove the per-kernel launch cost that dominates small-batch frames on a GPU
        mode = "reduce-overhead" if self.device.type == "cuda" else None
        compiled = torch.compile(module, mode=mode, dynamic=False, fullgraph=False)

        def run(*inputs: Tensor) -> tuple[Tensor, ...]:
            with torch.inference_mode():
                out = _as_tuple(compiled(*self._to_device(inputs)))
            # CUDA-graph outputs live in a pool the next replay overwrites: hand out copies
            return tuple(t.clone() for t in out) if mode == "reduce-overhead" else out

        return Runner(graph.name, run, tuple(s.name for s in graph.inputs))
