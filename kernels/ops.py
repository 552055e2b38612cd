"""PyTorch front end of the fused warping kernels: validated entry points, impl selection, torch.library ops.

Each op is a ``torch.library`` custom op (``avatar_engine::<name>``) with a fake implementation, so torch.compile
and torch.export see one node. Its CUDA kernel compiles ``kernels/csrc/<op>.cu`` through NVRTC (kernels.nvrtc);
every other device runs the pure-PyTorch twin from kernels.reference.

Which implementation runs is chosen per call: the ``impl`` argument, else ``$AVATAR_ENGINE_KERNELS`` read at call
time, else ``"auto"``.

* ``"torch"``: the twin, as plain aten ops (no custom op in the graph).
* ``"fused"``: the custom op. On CUDA tensors it launches the fused kernel and raises when NVRTC is unavailable;
  on CPU tensors the op's CPU kernel is the twin (useful to test registration and export without a GPU).
* ``"auto"``: ``"fused"`` for CUDA tensors of a supported dtype when the kernels are available, else ``"torch"``.
"""

from __future__ import annotations

import os
from typing import Any, Literal, NamedTuple, get_args

import torch
from torch import Tensor

from kernels import nvrtc, reference

Impl = Literal["auto", "fused", "torch"]
IMPLS: tuple[str, ...] = get_args(Impl)
ENV_VAR = "AVATAR_ENGINE_KERNELS"
FUSED_DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
_INT32_MAX = 2**31 - 1


class FlowWarpOutput(NamedTuple):
    out: Tensor  # [B, C, D, H, W] warped feature
    deformation: Tensor | None  # [B, D, H, W, 3] when requested


def selected_impl(impl: Impl | None = None) -> Impl:
    """The requested implementation: ``impl`` if given, else ``$AVATAR_ENGINE_KERNELS``, else ``"auto"``."""
    choice = impl if impl is not None else os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in IMPLS:
        source = "impl argument" if impl is not None else f"${ENV_VAR}"
        raise ValueError(f"{source} must be one of {IMPLS}, got {choice!r}")
    return choice  # type: ignore[return-value]


def use_fused(impl: Impl | None, *tensors: Tensor) -> bool:
    """Whether a call with these tensors goes through the custom op (see the module docstring)."""
    choice = selected_impl(impl)
    if choice != "auto":
        return choice == "fused"
    return all(t.is_cuda for t in tensors) and all(t.dtype in FUSED_DTYPES for t in tensors) and nvrtc.available()


# ---- validation shared by both implementations --------------------------------------------------------------


def _check_volume(name: str, t: Tensor) -> None:
    if t.dim() != 5:
        raise ValueError(f"{name} must be 5-D [B, C, D, H, W], got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if any(s > _INT32_MAX for s in t.shape):
        raise ValueError(f"{name} has a dimension too large for the kernels: {tuple(t.shape)}")


def _check_grid_axes(name: str, d: int, h: int, w: int) -> None:
    # The coordinate grid divides by (n - 1) per axis: a single voxel would make it NaN.
    if min(d, h, w) < 2:
        raise ValueError(f"{name} needs at least 2 voxels per spatial axis for the coordinate grid, got {(d, h, w)}")


def _check_keypoints(kp_driving: Tensor, kp_source: Tensor, batch: int, like: Tensor) -> int:
    for name, kp in (("kp_driving", kp_driving), ("kp_source", kp_source)):
        if kp.dim() != 3 or kp.shape[2] != 3 or kp.shape[0] != batch:
            raise ValueError(f"{name} must be [B={batch}, K, 3], got shape {tuple(kp.shape)}")
        if kp.device != like.device:
            raise ValueError(f"{name} is on {kp.device} but the volume is on {like.device}")
        if not kp.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {kp.dtype}")
    if kp_driving.shape != kp_source.shape:
        raise ValueError(f"kp_driving {tuple(kp_driving.shape)} and kp_source {tuple(kp_source.shape)} differ")
    return kp_driving.shape[1]


def _check_same(name: str, t: Tensor, like: Tensor, like_name: str) -> None:
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but {like_name} is on {like.device}")
    if t.dtype != like.dtype:
        raise ValueError(f"{name} is {t.dtype} but {like_name} is {like.dtype}; cast one of them")


def _suffix(t: Tensor) -> str:
    suffix = FUSED_DTYPES.get(t.dtype)
    if suffix is None:
        raise ValueError(f"fused kernels support {list(FUSED_DTYPES)}, got {t.dtype}; use impl='torch'")
    return suffix


def _keypoints_f32(kp: Tensor) -> Tensor:
    return kp.to(torch.float32).contiguous()  # the kernels read keypoints as fp32 whatever the volume dtype


# ---- avatar_engine::grid_sample_3d -------------------------------------------------------------------------------


@torch.library.custom_op("avatar_engine::grid_sample_3d", mutates_args=())
def _grid_sample_3d_op(input: Tensor, grid: Tensor) -> Tensor:
    return reference.grid_sample_3d(input, grid)


@_grid_sample_3d_op.register_kernel("cuda")
def _grid_sample_3d_cuda(input: Tensor, grid: Tensor) -> Tensor:
    input, grid = input.contiguous(), grid.contiguous()
    b, c, d, h, w = input.shape
    _, do, ho, wo, _ = grid.shape
    out = input.new_empty((b, c, do, ho, wo))
    kernel = f"avatar_grid_sample_3d_{_suffix(input)}"
    nvrtc.launch(
        "grid_sample_3d.cu", kernel, b * do * ho * wo, [input, grid, out, b, c, d, h, w, do, ho, wo], out.device
    )
    return out


@_grid_sample_3d_op.register_fake
def _grid_sample_3d_fake(input: Tensor, grid: Tensor) -> Tensor:
    return input.new_empty((input.shape[0], input.shape[1], *grid.shape[1:4]))


def grid_sample_3d(input: Tensor, grid: Tensor, *, impl: Impl | None = None) -> Tensor:
    """``grid_sample(input [B, C, D, H, W], grid [B, Do, Ho, Wo, 3])``, trilinear, zeros, align_corners=False."""
    _check_volume("input", input)
    if grid.dim() != 5 or grid.shape[-1] != 3 or grid.shape[0] != input.shape[0]:
        raise ValueError(f"grid must be [B={input.shape[0]}, Do, Ho, Wo, 3], got shape {tuple(grid.shape)}")
    _check_same("grid", grid, input, "input")
    if use_fused(impl, input, grid):
        return _grid_sample_3d_op(input, grid)
    return reference.grid_sample_3d(input, grid)


# ---- avatar_engine::mask_deformation and avatar_engine::flow_warp (one kernel, flow_warp.cu) ---------------------


def _launch_flow_warp(
    feature: Tensor | None, mask_logits: Tensor, kp_driving: Tensor, kp_source: Tensor, with_deformation: bool
) -> tuple[Tensor | None, Tensor | None]:
    mask_logits = mask_logits.contiguous()
    b, k1, d, h, w = mask_logits.shape
    out = deformation = None
    if feature is not None:
        feature = feature.contiguous()
        c, df, hf, wf = feature.shape[1:]
        out = feature.new_empty((b, c, d, h, w))
    else:
        c, df, hf, wf = 0, 1, 1, 1  # no channels: the kernel only computes the deformation
    if with_deformation:
        deformation = mask_logits.new_empty((b, d, h, w, 3))
    args: list[nvrtc.KernelArg] = [feature, mask_logits, _keypoints_f32(kp_driving), _keypoints_f32(kp_source)]
    args += [out, deformation, b, c, df, hf, wf, k1 - 1, d, h, w]
    kernel = f"avatar_flow_warp_{_suffix(mask_logits)}"
    nvrtc.launch("flow_warp.cu", kernel, b * d * h * w, args, mask_logits.device)
    return out, deformation


@torch.library.custom_op("avatar_engine::mask_deformation", mutates_args=())
def _mask_deformation_op(mask_logits: Tensor, kp_driving: Tensor, kp_source: Tensor) -> Tensor:
    return reference.mask_deformation(mask_logits, kp_driving, kp_source)


@_mask_deformation_op.register_kernel("cuda")
def _mask_deformation_cuda(mask_logits: Tensor, kp_driving: Tensor, kp_source: Tensor) -> Tensor:
    _, deformation = _launch_flow_warp(None, mask_logits, kp_driving, kp_source, with_deformation=True)
    assert deformation is not None
    return deformation


@_mask_deformation_op.register_fake
def _mask_deformation_fake(mask_logits: Tensor, kp_driving: Tensor, kp_source: Tensor) -> Tensor:
    b, _, d, h, w = mask_logits.shape
    return mask_logits.new_empty((b, d, h, w, 3))


def _check_mask(mask_logits: Tensor, kp_driving: Tensor, kp_source: Tensor) -> None:
    _check_volume("mask_logits", mask_logits)
    _check_grid_axes("mask_logits", *mask_logits.shape[2:])
    k = _check_keypoints(kp_driving, kp_source, mask_logits.shape[0], mask_logits)
    if mask_logits.shape[1] != k + 1:
        raise ValueError(f"mask_logits needs K+1 = {k + 1} channels for {k} keypoints, got {mask_logits.shape[1]}")


def mask_deformation(mask_logits: Tensor, kp_driving: Tensor, kp_source: Tensor, *, impl: Impl | None = None) -> Tensor:
    """Deformation ``[B, D, H, W, 3]`` from ``mask_logits [B, K+1, D, H, W]`` and keypoints ``[B, K, 3]``."""
    _check_mask(mask_logits, kp_driving, kp_source)
    if use_fused(impl, mask_logits):
        return _mask_deformation_op(mask_logits, kp_driving, kp_source)
    return reference.mask_deformation(mask_logits, kp_driving, kp_source)


@torch.library.custom_op("avatar_engine::flow_warp", mutates_args=())
def _flow_warp_op(
    feature: Tensor, mask_logits: Tensor, kp_driving: Tensor, kp_source: Tensor, return_deformation: bool
) -> tuple[Tensor, Tensor]:
    out, deformation = reference.flow_warp(feature, mask_logits, kp_driving, kp_source)
    return out, deformation if return_deformation else deformation.new_empty((0,))


@_flow_warp_op.register_kernel("cuda")
def _flow_warp_cuda(
    feature: Tensor, mask_logits: Tensor, kp_driving: Tensor, kp_source: Tensor, return_deformation: bool
) -> tuple[Tensor, Tensor]:
    out, deformation = _launch_flow_warp(feature, mask_logits, kp_driving, kp_source, return_deformation)
    assert out is not None
    return out, deformation if deformation is not None else mask_logits.new_empty((0,))


@_flow_warp_op.register_fake
def _flow_warp_fake(
    feature: Tensor, mask_logits: Tensor, kp_driving: Tensor, kp_source: Tensor, return_deformation: bool
) -> tuple[Tensor, Tensor]:
    b, _, d, h, w = mask_logits.shape
    out = feature.new_empty((b, feature.shape[1], d, h, w))
    return out, mask_logits.new_empty((b, d, h, w, 3) if return_deformation else (0,))


def flow_warp(
    feature: Tensor,
    mask_logits: Tensor,
    kp_driving: Tensor,
    kp_source: Tensor,
    *,
    return_deformation: bool = False,
    impl: Impl | None = None,
) -> FlowWarpOutput:
    """Softmax-weighted motion of ``mask_logits`` applied to ``feature [B, C, Df, Hf, Wf]`` in one pass.

    Equals ``grid_sample_3d(feature, mask_deformation(mask_logits, kp_driving, kp_source))``; the output has the
    mask's spatial size ``[B, C, D, H, W]``.
    """
    _check_volume("feature", feature)
    _check_mask(mask_logits, kp_driving, kp_source)
    _check_same("mask_logits", mask_logits, feature, "feature")
    if feature.shape[0] != mask_logits.shape[0]:
        raise ValueError(f"feature batch {feature.shape[0]} != mask_logits batch {mask_logits.shape[0]}")
    if use_fused(impl, feature, mask_logits):
        out, deformation = _flow_warp_op(feature, mask_logits, kp_driving, kp_source, return_deformation)
        return FlowWarpOutput(out, deformation if return_deformation else None)
    out, deformation = reference.flow_warp(feature, mask_logits, kp_driving, kp_source)
    return FlowWarpOutput(out, deformation if return_deformation else None)


# ---- avatar_engine::sparse_motion_features ---------------------------------------------------------------------


@torch.library.custom_op("avatar_engine::sparse_motion_features", mutates_args=())
def _sparse_motion_op(compressed: Tensor, kp_driving: Tensor, kp_source: Tensor) -> Tensor:
    return reference.sparse_motion_features(compressed, kp_driving, kp_source)


@_sparse_motion_op.register_kernel("cuda")
def _sparse_motion_cuda(compressed: Tensor, kp_driving: Tensor, kp_source: Tensor) -> Tensor:
    compressed = compressed.contiguous()
    b, c, d, h, w = compressed.shape
    k = kp_driving.shape[1]
    out = compressed.new_empty((b, (k + 1) * (c + 1), d, h, w))
    args: list[nvrtc.KernelArg] = [compressed, _keypoints_f32(kp_driving), _keypoints_f32(kp_source), out]
    args += [b, c, k, d, h, w]
    kernel = f"avatar_sparse_motion_{_suffix(compressed)}"
    nvrtc.launch("sparse_motion.cu", kernel, b * (k + 1) * d * h * w, args, out.device)
    return out


@_sparse_motion_op.register_fake
def _sparse_motion_fake(compressed: Tensor, kp_driving: Tensor, kp_source: Tensor) -> Tensor:
    b, c, d, h, w = compressed.shape
    return compressed.new_empty((b, (kp_driving.shape[1] + 1) * (c + 1), d, h, w))


def sparse_motion_features(
    compressed: Tensor, kp_driving: Tensor, kp_source: Tensor, *, impl: Impl | None = None
) -> Tensor:
    """Hourglass input ``[B, (K+1)*(C+1), D, H, W]``: per motion its heatmap difference, then C deformed channels."""
    _check_volume("compressed", compressed)
    _check_grid_axes("compressed", *compressed.shape[2:])
    _check_keypoints(kp_driving, kp_source, compressed.shape[0], compressed)
    if use_fused(impl, compressed):
        return _sparse_motion_op(compressed, kp_driving, kp_source)
    return reference.sparse_motion_features(compressed, kp_driving, kp_source)


# every custom op this module registers, by name: the exporter must translate each one (export.custom_ops)
CUSTOM_OPS: dict[str, Any] = {
    "grid_sample_3d": torch.ops.avatar_engine.grid_sample_3d,
    "mask_deformation": torch.ops.avatar_engine.mask_deformation,
    "flow_warp": torch.ops.avatar_engine.flow_warp,
    "sparse_motion_features": torch.ops.avatar_engine.sparse_motion_features,
}
