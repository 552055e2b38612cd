"""PyTorch backends: ``eager`` (the modules as they are) and ``compile`` (``torch.compile``; on CUDA the
``reduce-overhead`` mode, which records CUDA graphs).

In fp32 both run the graph's own modules, moved to the backend's device (not copied: full-size networks are
~100M parameters); another dtype works on a cast copy and leaves the shared networks untouched.
"""

from __future__ import annotations

import shutil

import torch
from torch import Tensor

from export.backends.base import Backend, Runner
from export.graphs import Graph, cast_graph


def _prepared(graph: Graph, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    module = cast_graph(graph, dtype).module if dtype != torch.float32 else graph.module
    return module.to(device).eval()


def _as_tuple(out: object) -> tuple[Tensor, ...]:
    if isinstance(out, (tuple, list)):
        return tuple(out)
    assert isinstance(out, Tensor)
    return (out,)


class EagerBackend(Backend):
    name = "eager"

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> str | None:
        if device.type == "cuda" and not torch.cuda.is_available():
            return "no CUDA device visible to PyTorch"
        return None

    def load(self, graph: Graph, *, batch: int = 1) -> Runner:
        module = _prepared(graph, self.device, self.dtype)

        def run(*inputs: Tensor) -> tuple[Tensor, ...]:
            with torch.inference_mode():
                return _as_tuple(module(*self._to_device(inputs)))

        return Runner(graph.name, run, tuple(s.name for s in graph.inputs))


class CompileBackend(Backend):
    """``torch.compile`` with inductor. The first call of each input shape compiles (seconds to minutes)."""

    name = "compile"

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
