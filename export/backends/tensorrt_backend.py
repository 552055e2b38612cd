"""TensorRT backend: runs engines built by :mod:`export.tensorrt` on CUDA tensors (zero-copy, torch's stream).

The ``dir`` option is an ``engine export tensorrt`` output; without it a graph is exported (tensorrt flavour) and
built on first load into ``engine_home()/tensorrt`` (cached by GPU, TensorRT version and ONNX hash).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from engine.models.warping_ops import FUSED, WarpOps
from engine.paths import engine_home
from export import onnx_export, tensorrt
from export.backends.base import Backend, BackendError, Runner
from export.graphs import Graph
from export.tensorrt import Precision


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int64: torch.int64, trt.bool: torch.bool}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    if dtype not in table:
        raise BackendError(f"TensorRT tensor dtype {dtype} has no torch equivalent here")
    return table[dtype]


class TensorRTBackend(Backend):
    name = "tensorrt"
    OPTIONS = ("dir", "plugin_library", "max_batch")

    def __init__(
        self,
        device: str | torch.device = "cuda",
        dtype: torch.dtype = torch.float32,
        *,
        dir: str | Path | None = None,
        plugin_library: str | Path | None = None,
        max_batch: int = 8,
    ):
        super().__init__(device, dtype)
        self.engine_dir = Path(dir) if dir is not None else None
        self.plugin_library = Path(plugin_library) if plugin_library is not None else None
        self.max_batch = max_batch

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> str | None:
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            return "TensorRT is not installed (pip install tensorrt; needs an NVIDIA GPU and driver)"
        if device.type != "cuda":
            return "TensorRT runs on CUDA devices only (use --device cuda on a GPU machine)"
        if not torch.cuda.is_available():
            return "no CUDA device visible to PyTorch"
        return None

    @property
    def warp_ops(self) -> WarpOps:
        return FUSED  # the tensorrt flavour: the fused kernels run as the project's TensorRT plugins

    def _precision(self) -> Precision:
        table: dict[torch.dtype, Precision] = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
        return table[self.dtype]

    def _engine_file(self, graph: Graph, batch: int) -> Path:
        if self.engine_dir is None:
            cache = engine_home() / "tensorrt"
            with tempfile.TemporaryDirectory(prefix="avatar-trt-") as tmp:
                onnx_export.export_graphs({graph.name: graph}, Path(tmp), flavour="tensorrt", batch=None, verify=False)
                config = tensorrt.BuildConfig(
                    self._precision(), opt_batch=min(batch, self.max_batch), max_batch=max(batch, self.max_batch)
                )
                manifest = tensorrt.build_engines(Path(tmp), cache, config, plugin_library=self.plugin_library)
            return cache / manifest["engines"][graph.name]["file"]
        manifest_path = self.engine_dir / tensorrt.MANIFEST_NAME
        if not manifest_path.is_file():
            raise BackendError(f"{self.engine_dir}: no {tensorrt.MANIFEST_NAME}; build with 'engine export tensorrt'")
        manifest = json.loads(manifest_path.read_text())
        record = manifest["engines"].get(graph.name)
        if record is None:
            raise BackendError(f"{self.engine_dir}: no engine for {graph.name!r}")
        if record["weights_sha256"] != onnx_export.weights_sha256(graph.module):
            raise BackendError(f"{self.engine_dir}: the {graph.name} engine was built from other weights")
        return self.engine_dir / record["file"]

    def load(self, graph: Graph, *, batch: int = 1) -> Runner:
        trt = tensorrt.import_tensorrt()
        path = self._engine_file(graph, batch)
        trt_logger = trt.Logger(trt.Logger.WARNING)
        tensorrt.load_plugins(str(tensorrt.find_plugin_library(self.plugin_library).resolve()))
        runtime = trt.Runtime(trt_logger)
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise BackendError(f"{path}: TensorRT could not deserialize the engine (other GPU or TensorRT version?)")
        context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        input_names = [s.name for s in graph.inputs]
        outputs = [n for n in names if not is_input[n]]
        if sorted(n for n in names if is_input[n]) != sorted(input_names):
            raise BackendError(f"{path}: engine inputs {[n for n in names if is_input[n]]} differ from {input_names}")
        types = {n: _torch_dtype(trt, engine.get_tensor_dtype(n)) for n in names}
        device = self.device

        # the Python bindings do not keep the runtime and engine alive for the context: the closure does
        alive = (runtime, engine, context)

        def run(*inputs: Tensor) -> tuple[Tensor, ...]:
            _, _, ctx = alive
            staged = []  # converted inputs must outlive the enqueue below
            for name, t in zip(input_names, inputs, strict=True):
                t = t.to(device, types[name]).contiguous()
                staged.append(t)
                ctx.set_input_shape(name, tuple(t.shape))
                ctx.set_tensor_address(name, t.data_ptr())
            results = []
            for name in outputs:
                out = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=types[name], device=device)
                ctx.set_tensor_address(name, out.data_ptr())
                results.append(out)
            if not ctx.execute_async_v3(torch.cuda.current_stream(device).cuda_stream):
                raise BackendError(f"TensorRT execution of {graph.name} failed")
            return tuple(results)

        return Runner(graph.name, run, tuple(input_names))
