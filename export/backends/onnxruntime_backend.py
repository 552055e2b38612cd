"""onnxruntime backend: the CPU execution provider, or the CUDA one for CUDA devices when it is installed.

A graph is exported on first load (standard flavour, dynamic batch, fp32 or fp16 per the backend dtype) into a
temporary directory, or taken from an ``engine export onnx`` directory when the ``dir`` option is given; a file whose
recorded weights hash differs from the graph's weights is refused rather than silently run.

Runs go through I/O binding: inputs are bound where the torch tensors already live (device memory on CUDA) and
outputs are written into torch tensors allocated on the backend's device, so nothing crosses the bus or passes
through NumPy per call (on CUDA, ``session.run`` would copy the 8.4 MB feature volume to the host and back every
frame). An output whose shape cannot be derived from the inputs' shapes is left to onnxruntime and copied out.
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
_ONNX_TYPES = {"float": "float32", "float16": "float16", "int64": "int64", "bool": "bool", "int32": "int32"}


def _dtype_name(onnx_type: str) -> str:
    """``'tensor(float)'`` -> ``'float32'`` (a torch / NumPy dtype name)."""
    inner = onnx_type[len("tensor(") : -1]
    if inner not in _ONNX_TYPES:
        raise BackendError(f"onnxruntime backend: unsupported tensor type {onnx_type}")
    return _ONNX_TYPES[inner]


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
        if [i.name for i in session.get_inputs()] != [s.name for s in graph.inputs]:
            names = [i.name for i in session.get_inputs()]
            raise BackendError(f"{graph.name}: ONNX inputs {names} do not match the graph's")
        return Runner(graph.name, _BoundSession(session, self.device), tuple(s.name for s in graph.inputs))


class _BoundSession:
    """Calls an ``InferenceSession`` through I/O binding with torch tensors on ``device`` (see the module doc)."""

    def __init__(self, session: Any, device: torch.device) -> None:
        self.session = session
        self.device = device
        self.device_type = "cuda" if device.type == "cuda" else "cpu"
        self.device_id = device.index or 0
        # (name, dtype name, declared shape: ints and symbol names) per input and output
        self.inputs = [(i.name, _dtype_name(i.type), tuple(i.shape)) for i in session.get_inputs()]
        self.outputs = [(o.name, _dtype_name(o.type), tuple(o.shape)) for o in session.get_outputs()]

    def _output_shape(self, declared: tuple[Any, ...], symbols: dict[str, int]) -> tuple[int, ...] | None:
        if all(isinstance(d, int) or d in symbols for d in declared):
            return tuple(d if isinstance(d, int) else symbols[d] for d in declared)
        return None

    def __call__(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        binding = self.session.io_binding()
        symbols: dict[str, int] = {}
        bound = []  # kept alive until the run is over: onnxruntime holds raw pointers to them
        for (name, dtype, declared), t in zip(self.inputs, tensors, strict=True):
            t = t.detach().to(self.device, getattr(torch, dtype)).contiguous()
            bound.append(t)
            symbols.update({d: n for d, n in zip(declared, t.shape, strict=False) if isinstance(d, str)})
            binding.bind_input(name, self.device_type, self.device_id, _NUMPY[dtype], tuple(t.shape), t.data_ptr())
        outputs: list[Tensor | None] = []
        for name, dtype, declared in self.outputs:
            shape = self._output_shape(declared, symbols)
            if shape is None:
                binding.bind_output(name, self.device_type, self.device_id)
                outputs.append(None)
                continue
            out = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
            binding.bind_output(name, self.device_type, self.device_id, _NUMPY[dtype], shape, out.data_ptr())
            outputs.append(out)
        if self.device.type == "cuda":  # onnxruntime reads the inputs on its own stream
            torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        if all(o is not None for o in outputs):
            return tuple(o for o in outputs if o is not None)
        copied = binding.copy_outputs_to_cpu()
        return tuple(
            o if o is not None else torch.from_numpy(c).to(self.device) for o, c in zip(outputs, copied, strict=True)
        )
