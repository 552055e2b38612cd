"""onnxruntime backend: the CPU execution provider, or the CUDA one for CUDA devices when it is installed.

A graph is exported on first load (standard flavour, dynamic batch, fp32 or fp16 per the backend dtype) into a
temporary directory, or taken from an ``engine export onnx`` directory when the ``dir`` option is given; a file whose
recorded weights hash differs from the graph's weights is refused rather than silently run.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from engine.models.warping_ops import STANDARD, WarpOps
from export import onnx_export
from export.backends.base import Backend, BackendError, Runner
from export.graphs import Graph

_NUMPY = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "bool": np.bool_, "int32": np.int32}


def _providers(device: torch.device) -> list[Any]:
    if device.type == "cuda":
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    OPTIONS = ("dir", "threads")

    def __init__(
        self,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        dir: str | Path | None = None,
        threads: int | None = None,
    ):
        super().__init__(device, dtype)
        if dtype == torch.bfloat16:
            raise BackendError("backend 'onnxruntime': bfloat16 is not supported; use float32 or float16")
        self.onnx_dir = Path(dir) if dir is not None else None
        self.threads = threads if threads is not None else torch.get_num_threads()

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> str | None:
        try:
            import onnxruntime as ort
        except ImportError:
            return "onnxruntime is not installed (pip install onnxruntime)"
        if device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            return "onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)"
        if device.type not in ("cpu", "cuda"):
            return f"device type {device.type!r} is not supported (cpu or cuda)"
        return None

    @property
    def warp_ops(self) -> WarpOps:
        return STANDARD  # ONNX's GridSample: the fused kernels exist only as TensorRT plugins

    def _model_bytes(self, graph: Graph, batch: int) -> bytes:
        dtype = "fp16" if self.dtype == torch.float16 else "fp32"
        if self.onnx_dir is not None:
            index = onnx_export.read_index(self.onnx_dir)
            record = index["modules"].get(graph.name)
            if record is None:
                raise BackendError(f"{self.onnx_dir}: the export has no {graph.name!r} module")
            if index["flavour"] != "standard":
                raise BackendError(f"{self.onnx_dir}: {index['flavour']} exports need TensorRT; export 'standard'")
            if index["dtype"] != dtype:
                raise BackendError(f"{self.onnx_dir} holds {index['dtype']} files; the backend runs {dtype}")
            if index["batch"] not in (onnx_export.BATCH, batch):
                raise BackendError(
                    f"{self.onnx_dir} was exported for batch {index['batch']}, not {batch}; export with --batch dynamic"
                )
            if record["weights_sha256"] != onnx_export.weights_sha256(graph.module):
                raise BackendError(
                    f"{self.onnx_dir}/{record['file']} was exported from other weights than the loaded {graph.name}"
                )
            return (self.onnx_dir / record["file"]).read_bytes()
        with tempfile.TemporaryDirectory(prefix="avatar-onnx-") as tmp:
            exported = onnx_export.export_graph(graph, Path(tmp), dtype=dtype, batch=None, verify=False)  # type: ignore[arg-type]
            return exported.path.read_bytes()

    def load(self, graph: Graph, *, batch: int = 1) -> Runner:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # idle pool threads would otherwise spin for a while after each run, taking cores from the other stages
        # (audio, motion, encoding) that share the CPU in a live session
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(self._model_bytes(graph, batch), options, providers=_providers(self.device))
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"onnxruntime cannot load {graph.name}: {exc}") from exc
        feeds = [(i.name, _NUMPY.get(i.type[len("tensor(") : -1], np.float32)) for i in session.get_inputs()]
        if [name for name, _ in feeds] != [s.name for s in graph.inputs]:
            raise BackendError(f"{graph.name}: ONNX inputs {[n for n, _ in feeds]} do not match the graph's")
        device = self.device

        def run(*inputs: Tensor) -> tuple[Tensor, ...]:
            arrays: dict[str, np.ndarray] = {
                name: t.detach().cpu().numpy().astype(np_type, copy=False)
                for (name, np_type), t in zip(feeds, inputs, strict=True)
            }
            outs = session.run(None, arrays)
            return tuple(torch.from_numpy(np.asarray(o)).to(device) for o in outs)

        return Runner(graph.name, run, tuple(s.name for s in graph.inputs))
