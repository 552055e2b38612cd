"""The TensorRT plugin nodes of the ``tensorrt`` flavour (contract: kernels/README.md, "ONNX nodes the exporter
must emit").

The fused kernels' torch custom ops (``avatar_engine::*``, kernels/ops.py) are translated to nodes in the
``avatar_engine`` domain whose ``op_type`` is the plugin name; TensorRT's ONNX parser turns an unknown op into
the plugin of that name, found through the ``plugin_namespace`` attribute. ONNX op schemas are registered for
the plugin nodes so onnxscript can emit them and ``onnx.checker`` validates their inputs, outputs and types.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnx
import onnxscript
from onnx.defs import OpSchema

from kernels import ops as kernel_ops

DOMAIN = "avatar_engine"
DOMAIN_VERSION = 1
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = "avatar_engine"
GRID_SAMPLE_3D = "AvatarGridSample3D"
FLOW_WARP = "AvatarFlowWarp"
SPARSE_MOTION = "AvatarSparseMotion"
MASK_DEFORMATION = "AvatarMaskDeformation"
PLUGIN_OPS: tuple[str, ...] = (GRID_SAMPLE_3D, FLOW_WARP, SPARSE_MOTION, MASK_DEFORMATION)
PLUGIN_ATTRIBUTES = {"plugin_version": PLUGIN_VERSION, "plugin_namespace": PLUGIN_NAMESPACE}

# name -> (inputs as (name, type var), outputs as (name, type var)); T: the volume dtype, K: fp32 keypoints
_SIGNATURES: dict[str, tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]] = {
    GRID_SAMPLE_3D: ((("input", "T"), ("grid", "T")), (("out", "T"),)),
    FLOW_WARP: (
        (("feature", "T"), ("mask_logits", "T"), ("kp_driving", "K"), ("kp_source", "K")),
        (("out", "T"), ("deformation", "T")),
    ),
    SPARSE_MOTION: ((("compressed", "T"), ("kp_driving", "K"), ("kp_source", "K")), (("out", "T"),)),
    MASK_DEFORMATION: ((("mask_logits", "T"), ("kp_driving", "K"), ("kp_source", "K")), (("deformation", "T"),)),
}


def plugin_signature(op_type: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Input and output names of a plugin node, in the order the plugin expects."""
    inputs, outputs = _SIGNATURES[op_type]
    return tuple(n for n, _ in inputs), tuple(n for n, _ in outputs)


def register_schemas() -> None:
    """Register the plugin nodes' ONNX schemas (idempotent: a schema already present is kept)."""
    volume = ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "volume dtype, shared by the node")
    keypoints = ("K", ["tensor(float)"], "keypoints are always float32")
    attributes = [
        OpSchema.Attribute("plugin_version", OpSchema.AttrType.STRING, "TensorRT plugin version"),
        OpSchema.Attribute("plugin_namespace", OpSchema.AttrType.STRING, "TensorRT plugin creator namespace"),
    ]
    for op_type, (inputs, outputs) in _SIGNATURES.items():
        if onnx.defs.has(op_type, DOMAIN_VERSION, DOMAIN):
            continue
        uses_k = any(t == "K" for _, t in inputs)
        schema = OpSchema(
            op_type,
            DOMAIN,
            DOMAIN_VERSION,
            f"TensorRT plugin {op_type} (kernels/README.md)",
            inputs=[OpSchema.FormalParameter(name, tv) for name, tv in inputs],
            outputs=[OpSchema.FormalParameter(name, tv) for name, tv in outputs],
            type_constraints=[volume, keypoints] if uses_k else [volume],
            attributes=attributes,
        )
        onnx.defs.register_schema(schema)


def translation_table() -> dict[Any, Callable[..., Any]]:
    """``custom_translation_table`` for ``torch.onnx.export``: every custom op of ``kernels.ops`` -> its plugin."""
    register_schemas()
    opset = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)
    grid_sample_op = getattr(opset, GRID_SAMPLE_3D)
    flow_warp_op = getattr(opset, FLOW_WARP)
    sparse_motion_op = getattr(opset, SPARSE_MOTION)
    mask_deformation_op = getattr(opset, MASK_DEFORMATION)

    def grid_sample_3d(input: Any, grid: Any) -> Any:
        return grid_sample_op(input, grid, **PLUGIN_ATTRIBUTES)

    def flow_warp(feature: Any, mask_logits: Any, kp_driving: Any, kp_source: Any, return_deformation: bool) -> Any:
        # the plugin always has both outputs; an unused deformation is simply not consumed
        out, deformation = flow_warp_op(
            feature, mask_logits, kp_driving, kp_source, **PLUGIN_ATTRIBUTES, _num_outputs=2
        )
        return out, deformation

    def sparse_motion(compressed: Any, kp_driving: Any, kp_source: Any) -> Any:
        return sparse_motion_op(compressed, kp_driving, kp_source, **PLUGIN_ATTRIBUTES)

    def mask_deformation(mask_logits: Any, kp_driving: Any, kp_source: Any) -> Any:
        return mask_deformation_op(mask_logits, kp_driving, kp_source, **PLUGIN_ATTRIBUTES)

    return {
        kernel_ops.CUSTOM_OPS["grid_sample_3d"].default: grid_sample_3d,
        kernel_ops.CUSTOM_OPS["flow_warp"].default: flow_warp,
        kernel_ops.CUSTOM_OPS["sparse_motion_features"].default: sparse_motion,
        kernel_ops.CUSTOM_OPS["mask_deformation"].default: mask_deformation,
    }
