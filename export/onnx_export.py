"""ONNX export of the runtime graphs (:mod:`export.graphs`): one file per module plus ``index.json``.

Export goes through ``torch.onnx.export(dynamo=True)`` at opset 20 (the first with 5-D ``GridSample``). Files are
saved with an IR version the installed onnxruntime accepts (newer exporters write newer IR versions than older
runtimes load) and, for the standard flavour, are loaded back into onnxruntime before they are listed.

``fp16`` files are the fp32 graphs converted with onnxruntime's float16 converter, keeping inputs and outputs
fp32 and grid sampling (``GridSample`` and the plugin nodes) in fp32: the sampler's coordinate-to-voxel scaling
and its eight-corner weighted sum are where half precision would add error to every warped voxel.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import onnx
import torch
from onnx import TensorProto, helper

from export import custom_ops
from export.graphs import BATCH, FLAVOURS, Flavour, Graph

logger = logging.getLogger(__name__)

OPSET = 20
INDEX_NAME = "index.json"
INDEX_FORMAT = 1
DTYPES: tuple[str, ...] = ("fp32", "fp16")
ExportDtype = Literal["fp32", "fp16"]
# ops the fp16 conversion leaves in fp32 (besides onnxruntime's own block list)
FP32_OPS: tuple[str, ...] = ("GridSample", *custom_ops.PLUGIN_OPS)

_ONNX_DTYPES: dict[int, str] = {
    TensorProto.FLOAT: "float32",
    TensorProto.FLOAT16: "float16",
    TensorProto.BFLOAT16: "bfloat16",
    TensorProto.INT64: "int64",
    TensorProto.INT32: "int32",
    TensorProto.BOOL: "bool",
}


class ExportError(RuntimeError):
    """An export that cannot produce a valid file (the message names the module and the reason)."""


@functools.lru_cache(maxsize=1)
def max_ir_version() -> int:
    """Highest ONNX IR version the installed onnxruntime loads (probed once with a one-node model)."""
    import onnxruntime as ort

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    for ir in range(onnx.IR_VERSION, 6, -1):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=ir)
        try:
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        except Exception:  # onnxruntime raises its own (pybind) exception types for an unsupported IR version
            continue
        return ir
    raise ExportError(f"onnxruntime {ort.__version__} loads none of the IR versions 7..{onnx.IR_VERSION}")


def fit_ir_version(model: onnx.ModelProto) -> onnx.ModelProto:
    """Lower ``model.ir_version`` to what onnxruntime accepts (in place; the graph itself is unchanged)."""
    model.ir_version = min(model.ir_version, max_ir_version())
    return model


def weights_sha256(module: torch.nn.Module) -> str:
    """Hash of a module's state dict (keys, dtypes, shapes and bytes): identifies the weights a file came from."""
    h = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _value_specs(values: Iterable[onnx.ValueInfoProto]) -> list[dict[str, Any]]:
    specs = []
    for v in values:
        tt = v.type.tensor_type
        dims: list[int | str] = [d.dim_value if d.HasField("dim_value") else BATCH for d in tt.shape.dim]
        specs.append({"name": v.name, "shape": dims, "dtype": _ONNX_DTYPES.get(tt.elem_type, str(tt.elem_type))})
    return specs


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and activations, fp32 inputs / outputs and fp32 grid sampling."""
    from onnxruntime.transformers import float16

    block = [*float16.DEFAULT_OP_BLOCK_LIST, *FP32_OPS]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the converter warns about every value clipped to the fp16 range
        converted: onnx.ModelProto = float16.convert_float_to_float16(
            model, keep_io_types=True, op_block_list=block, disable_shape_infer=False
        )
    _drop_duplicate_casts(converted.graph)
    _skip_fp32_round_trips(converted.graph)
    _sort_topologically(converted.graph)  # the converter appends its Casts after their consumers
    # it also leaves some intermediate type annotations at their old dtype: drop them all and re-infer
    del converted.graph.value_info[:]
    inferred: onnx.ModelProto = onnx.shape_inference.infer_shapes(converted, strict_mode=True)
    return inferred


def _skip_fp32_round_trips(graph: onnx.GraphProto) -> None:
    """Feed fp32-only nodes the fp32 graph input itself instead of ``Cast(fp32, Cast(fp16, input))``.

    With fp32 inputs kept, the converter casts every input to fp16 and back for fp32-only nodes: keypoints going
    into the plugins would lose precision for nothing (sampling coordinates, ~1e-3 in [-1, 1]).
    """
    fp32_inputs = {i.name for i in graph.input if i.type.tensor_type.elem_type == TensorProto.FLOAT}
    producer = {o: n for n in graph.node for o in n.output}

    def cast_to(node: onnx.NodeProto | None) -> int | None:
        if node is None or node.op_type != "Cast":
            return None
        return next((int(a.i) for a in node.attribute if a.name == "to"), None)

    for node in graph.node:
        for k, name in enumerate(node.input):
            outer = producer.get(name)
            if cast_to(outer) != TensorProto.FLOAT:
                continue
            assert outer is not None
            inner = producer.get(outer.input[0])
            if cast_to(inner) == TensorProto.FLOAT16 and inner is not None and inner.input[0] in fp32_inputs:
                node.input[k] = inner.input[0]
    # drop the Casts nobody reads any more
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type == "Cast" and not any(o in used for o in n.output)]
        if not dead:
            return
        for n in dead:
            graph.node.remove(n)


def _sort_topologically(graph: onnx.GraphProto) -> None:
    """Reorder nodes so each comes after the producers of its inputs (stable otherwise)."""
    available = {"", *(i.name for i in graph.input), *(t.name for t in graph.initializer)}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            missing = sorted({i for n in pending for i in n.input if i not in available})[:5]
            raise ExportError(f"graph has a cycle or undefined values: {missing}")
        for node in ready:
            available.update(node.output)
        ordered.extend(ready)
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
    del graph.node[:]
    graph.node.extend(ordered)


def _drop_duplicate_casts(graph: onnx.GraphProto) -> None:
    """The converter names its Casts after the value they cast, so a value feeding two fp32-only nodes gets two
    identical Casts defining the same name (onnxruntime rejects the file): keep the first of each."""
    produced: dict[str, bytes] = {}
    keep = []
    for node in graph.node:
        key = node.SerializeToString()
        duplicate = [o for o in node.output if o in produced]
        if duplicate:
            if node.op_type != "Cast" or produced[duplicate[0]] != key:
                raise ExportError(f"fp16 conversion produced two different definitions of {duplicate[0]!r}")
            continue
        for o in node.output:
            produced[o] = key
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's chatter (absent torchvision ops, optimizer notes); errors still propagate."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [log.level for log in loggers]
    try:
        for log in loggers:
            log.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)


def _to_onnx(graph: Graph, *, flavour: Flavour, batch: int | None) -> onnx.ModelProto:
    """The fp32 ONNX model of ``graph``; ``batch=None`` gives a dynamic leading axis."""
    example = graph.example_inputs(2 if batch is None else batch)  # size 1 would be specialised by torch.export
    names = [s.name for s in graph.inputs]
    dynamic_shapes = None
    if batch is None:
        dim = torch.export.Dim("batch", min=1, max=1024)
        dynamic_shapes = tuple({0: dim} for _ in names)
    table = custom_ops.translation_table() if flavour == "tensorrt" else None
    graph.module.eval()
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                graph.module,
                tuple(example),
                dynamo=True,
                opset_version=OPSET,
                input_names=names,
                output_names=list(graph.outputs),
                dynamic_shapes=dynamic_shapes,
                custom_translation_table=table,
                optimize=True,
                verbose=False,
            )
    except Exception as exc:
        raise ExportError(f"{graph.name}: torch.onnx.export failed: {exc}") from exc
    if program is None:
        raise ExportError(f"{graph.name}: torch.onnx.export returned no program")
    model: onnx.ModelProto = program.model_proto
    return model


def _verify(path: Path, model: onnx.ModelProto, flavour: Flavour) -> None:
    if flavour == "tensorrt":
        custom_ops.register_schemas()
        onnx.checker.check_model(str(path), full_check=False)  # plugin nodes: only TensorRT can run them
        return
    import onnxruntime as ort

    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"{path.name}: onnxruntime cannot load the exported file: {exc}") from exc


@dataclass(frozen=True)
class ExportedFile:
    name: str
    path: Path
    record: dict[str, Any]


def export_graph(
    graph: Graph,
    out_dir: Path,
    *,
    flavour: Flavour = "standard",
    dtype: ExportDtype = "fp32",
    batch: int | None = 1,
    verify: bool = True,
) -> ExportedFile:
    """Write ``out_dir/<graph.name>.onnx`` and return its index record."""
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown flavour {flavour!r}; choose one of {FLAVOURS}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown export dtype {dtype!r}; choose one of {DTYPES}")
    if batch is not None and batch < 1:
        raise ValueError(f"batch must be >= 1 or None (dynamic), got {batch}")
    model = _to_onnx(graph, flavour=flavour, batch=batch)
    if dtype == "fp16":
        model = to_fp16(model)
    fit_ir_version(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{graph.name}.onnx"
    data = model.SerializeToString()
    path.write_bytes(data)
    if verify:
        _verify(path, model, flavour)
    plugins = sorted({n.op_type for n in model.graph.node if n.domain == custom_ops.DOMAIN})
    record = {
        "file": path.name,
        "sha256": _sha256_bytes(data),
        "weights_sha256": weights_sha256(graph.module),
        "inputs": _value_specs(model.graph.input),
        "outputs": _value_specs(model.graph.output),
        "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "ir_version": model.ir_version,
        "plugin_ops": plugins,
        "grid_sampling": any(n.op_type in FP32_OPS for n in model.graph.node),
    }
    return ExportedFile(graph.name, path, record)


def export_graphs(
    graphs: Mapping[str, Graph],
    out_dir: Path,
    *,
    flavour: Flavour = "standard",
    dtype: ExportDtype = "fp32",
    batch: int | None = 1,
    source: Mapping[str, Any] | None = None,
    verify: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Export every graph and write ``out_dir/index.json``; returns the index."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    modules: dict[str, Any] = {}
    bar = tqdm(graphs.items(), total=len(graphs), desc="export onnx", unit="module", disable=not progress)
    for name, graph in bar:
        bar.set_postfix_str(name)
        modules[name] = export_graph(graph, out_dir, flavour=flavour, dtype=dtype, batch=batch, verify=verify).record
    index = {
        "format": INDEX_FORMAT,
        "flavour": flavour,
        "dtype": dtype,
        "batch": BATCH if batch is None else batch,
        "opset": OPSET,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "source": dict(source or {}),
        "modules": modules,
    }
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return index


def read_index(onnx_dir: Path) -> dict[str, Any]:
    """The ``index.json`` of an export directory, checked against the files it lists."""
    path = Path(onnx_dir) / INDEX_NAME
    if not path.is_file():
        raise ExportError(f"{onnx_dir}: no {INDEX_NAME}; write one with 'engine export onnx'")
    index: dict[str, Any] = json.loads(path.read_text())
    if index.get("format") != INDEX_FORMAT:
        raise ExportError(f"{path}: unsupported index format {index.get('format')!r} (expected {INDEX_FORMAT})")
    for name, record in index["modules"].items():
        if not (Path(onnx_dir) / record["file"]).is_file():
            raise ExportError(f"{path}: module {name!r} lists {record['file']}, which is missing")
    return index
