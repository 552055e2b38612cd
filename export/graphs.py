"""Exportable graphs: every runtime module as an ``nn.Module`` with flat tensor inputs and a tuple of outputs.

The ONNX exporter and every backend (:mod:`export.backends`) work on these :class:`Graph` objects, so "the
warping module" means the same inputs, outputs and example tensors whether it runs eagerly, compiled, in
onnxruntime or in TensorRT.

Two flavours of the grid-sampling modules (``warping`` and ``warping_decoder``), i.e. the warping network's
``ops`` (:mod:`engine.models.warping_ops`):

* ``standard``: ``STANDARD`` ops, the spec-literal PyTorch path (exports to opset-20 5-D ``GridSample``).
* ``tensorrt``: ``FUSED`` ops: the dense-motion input and the final warp go through the fused kernels' custom ops
  (``avatar_engine::sparse_motion_features`` and ``avatar_engine::flow_warp``, kernels/ops.py), which the ONNX
  exporter maps to the TensorRT plugin nodes (:mod:`export.custom_ops`). On CPU the custom ops run the
  kernels' pure-PyTorch twins, so this flavour's torch module stays testable here. Eager and compiled backends on
  a GPU run these ops too (``renderer_graphs(..., ops="fused")``).

Only those two modules differ between flavours; every other graph is identical.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from engine.keypoints import NUM_KP
from engine.models.liveportrait import LivePortraitNets
from engine.models.spade_decoder import SPADEDecoder
from engine.models.warping import WarpingNetwork
from engine.models.warping_ops import FUSED, STANDARD, WarpOps
from engine.motion.heads import EmotionHead, LipHead, PoseHead
from engine.motion.lmdm import MotionDecoder
from engine.weights.deterministic import deterministic_state_dict

Flavour = Literal["standard", "tensorrt"]
FLAVOURS: tuple[str, ...] = ("standard", "tensorrt")
FLAVOUR_OPS: dict[str, WarpOps] = {"standard": STANDARD, "tensorrt": FUSED}
BATCH = "batch"  # symbolic name of the (optionally dynamic) leading axis

RENDERER_GRAPHS: tuple[str, ...] = (
    "appearance",
    "motion",
    "warping",
    "decoder",
    "warping_decoder",
    "stitching",
    "eye",
    "lip",
)
DENOISER_GRAPHS: tuple[str, ...] = ("lmdm",)
HEAD_GRAPHS: tuple[str, ...] = ("lip_head", "emotion_head", "pose_head")
ALL_GRAPHS: tuple[str, ...] = RENDERER_GRAPHS + DENOISER_GRAPHS + HEAD_GRAPHS
# the modules holding grid sampling: TensorRT keeps them in fp32 and the tensorrt flavour swaps in plugins
GRID_SAMPLING_GRAPHS: tuple[str, ...] = ("warping", "warping_decoder")


@dataclass(frozen=True)
class TensorSpec:
    """One graph input: ``shape`` has :data:`BATCH` for the leading axis; ``dtype`` is a torch dtype name."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"

    def concrete_shape(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == BATCH else int(d) for d in self.shape)


@dataclass(frozen=True)
class Graph:
    """A module ready for export / a backend: ``module(*inputs) -> tuple of len(outputs)`` tensors."""

    name: str
    module: nn.Module
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[str, ...]
    make_inputs: Callable[[int, torch.Generator], tuple[Tensor, ...]]

    def example_inputs(self, batch: int = 1, seed: int = 0) -> tuple[Tensor, ...]:
        """Deterministic, plausible inputs (images in [0, 1], keypoints near the unit cube, valid timesteps)."""
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        return self.make_inputs(batch, torch.Generator().manual_seed(seed))

    def run(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        with torch.inference_mode():
            out = self.module(*inputs)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)


# ---- adapters with flat outputs --------------------------------------------------------------------------------


class _Single(nn.Module):
    """Wraps a one-tensor-in / one-tensor-out network so its output is a 1-tuple like every other graph."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> tuple[Tensor]:
        return (self.net(x),)


class MotionGraph(nn.Module):
    def __init__(self, motion: nn.Module):
        super().__init__()
        self.motion = motion

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:  # [B, 3, N, N] -> pitch, yaw, roll, t, exp, scale, kp
        return tuple(self.motion(image))


class WarpingGraph(nn.Module):
    """W with flat outputs, running its two heavy steps with ``ops`` (standard PyTorch or the fused kernels)."""

    def __init__(self, warping: WarpingNetwork, ops: WarpOps = STANDARD):
        super().__init__()
        self.warping = warping
        self.ops = ops

    def forward(self, feature_3d: Tensor, kp_driving: Tensor, kp_source: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        w = self.warping(feature_3d, kp_driving, kp_source, self.ops)
        return w.out, w.occlusion, w.deformation  # [B, 256, 64, 64], [B, 1, 64, 64], [B, 16, 64, 64, 3]


class WarpingDecoderGraph(nn.Module):
    """W then G in one graph: the per-frame hot path, keypoints in, image out."""

    def __init__(self, warping: nn.Module, decoder: SPADEDecoder):
        super().__init__()
        self.warping = warping  # a WarpingGraph
        self.decoder = decoder

    def forward(self, feature_3d: Tensor, kp_driving: Tensor, kp_source: Tensor) -> tuple[Tensor]:
        out = self.warping(feature_3d, kp_driving, kp_source)[0]
        return (self.decoder(out),)  # [B, 3, 512, 512]


class DenoiserGraph(nn.Module):
    """One denoiser call over the fixed window; ``drop_mask`` selects per sample the unconditional branch, so one
    graph serves classifier-free guidance's batched cond / uncond pass."""

    def __init__(self, denoiser: MotionDecoder):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x_t: Tensor, cond_frame: Tensor, cond: Tensor, t: Tensor, drop_mask: Tensor) -> tuple[Tensor]:
        return (self.denoiser(x_t, cond_frame, cond, t, drop_mask=drop_mask),)  # [B, L, M]


class HeadGraph(nn.Module):
    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, features: Tensor) -> tuple[Tensor]:
        return (self.head(features).offsets,)  # [B, 21, 3]


# ---- graph construction ----------------------------------------------------------------------------------------


def _check_flavour(flavour: str) -> None:
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown export flavour {flavour!r}; choose one of {FLAVOURS}")


def _keypoints(batch: int, gen: torch.Generator) -> Tensor:
    return (torch.rand(batch, NUM_KP, 3, generator=gen) * 2 - 1) * 0.6  # [B, 21, 3] well inside the volume


def renderer_graphs(
    nets: LivePortraitNets,
    flavour: Flavour = "standard",
    names: Sequence[str] = RENDERER_GRAPHS,
    *,
    ops: WarpOps | None = None,
) -> dict[str, Graph]:
    """Graphs of the renderer networks (they share the networks' parameters; nothing is copied).

    ``ops`` overrides the flavour's warping ops (a backend that runs the fused kernels without exporting)."""
    _check_flavour(flavour)
    c = nets.config
    n = c.input_size
    vol = c.volume_shape
    fs = c.feature_size
    warp = WarpingGraph(nets.warping, ops if ops is not None else FLAVOUR_OPS[flavour])
    image = TensorSpec("image", (BATCH, 3, n, n))
    feature = TensorSpec("feature_3d", (BATCH, *vol))
    kps = (TensorSpec("kp_driving", (BATCH, NUM_KP, 3)), TensorSpec("kp_source", (BATCH, NUM_KP, 3)))

    def image_in(b: int, g: torch.Generator) -> tuple[Tensor, ...]:
        return (torch.rand(b, 3, n, n, generator=g),)

    def warp_in(b: int, g: torch.Generator) -> tuple[Tensor, ...]:
        return (torch.randn(b, *vol, generator=g), _keypoints(b, g), _keypoints(b, g))

    def decoder_in(b: int, g: torch.Generator) -> tuple[Tensor, ...]:
        return (torch.randn(b, c.warp_channels, fs, fs, generator=g),)

    def mlp_in(width: int) -> Callable[[int, torch.Generator], tuple[Tensor, ...]]:
        return lambda b, g: (torch.randn(b, width, generator=g) * 0.3,)

    def mlp(name: str, net: nn.Module) -> Graph:
        width = net.mlp[0].in_features  # type: ignore[index, union-attr]
        return Graph(name, _Single(net), (TensorSpec("x", (BATCH, width)),), ("y",), mlp_in(width))

    table: dict[str, Callable[[], Graph]] = {
        "appearance": lambda: Graph("appearance", _Single(nets.appearance), (image,), ("feature_3d",), image_in),
        "motion": lambda: Graph(
            "motion", MotionGraph(nets.motion), (image,), ("pitch", "yaw", "roll", "t", "exp", "scale", "kp"), image_in
        ),
        "warping": lambda: Graph("warping", warp, (feature, *kps), ("out", "occlusion", "deformation"), warp_in),
        "decoder": lambda: Graph(
            "decoder",
            _Single(nets.decoder),
            (TensorSpec("feature", (BATCH, c.warp_channels, fs, fs)),),
            ("image",),
            decoder_in,
        ),
        "warping_decoder": lambda: Graph(
            "warping_decoder", WarpingDecoderGraph(warp, nets.decoder), (feature, *kps), ("image",), warp_in
        ),
        "stitching": lambda: mlp("stitching", nets.stitching),
        "eye": lambda: mlp("eye", nets.eye),
        "lip": lambda: mlp("lip", nets.lip),
    }
    unknown = [name for name in names if name not in table]
    if unknown:
        raise ValueError(f"unknown renderer graph(s) {unknown}; choose from {RENDERER_GRAPHS}")
    for module in nets.networks().values():
        module.eval()
    return {name: table[name]() for name in names}


def denoiser_graph(denoiser: MotionDecoder) -> Graph:
    """The LMDM denoiser over its fixed window (``seq_len`` frames)."""
    cfg = denoiser.config
    denoiser.eval()

    def make(b: int, g: torch.Generator) -> tuple[Tensor, ...]:
        return (
            torch.randn(b, cfg.seq_len, cfg.motion_dim, generator=g),
            torch.randn(b, cfg.motion_dim, generator=g) * 0.5,
            torch.randn(b, cfg.seq_len, cfg.cond_dim, generator=g) * 0.5,
            torch.randint(0, 1000, (b,), generator=g, dtype=torch.long),
            torch.arange(b) % 2 == 1,  # alternate cond / uncond like a batched guidance pass
        )

    inputs = (
        TensorSpec("x_t", (BATCH, cfg.seq_len, cfg.motion_dim)),
        TensorSpec("cond_frame", (BATCH, cfg.motion_dim)),
        TensorSpec("cond", (BATCH, cfg.seq_len, cfg.cond_dim)),
        TensorSpec("t", (BATCH,), "int64"),
        TensorSpec("drop_mask", (BATCH,), "bool"),
    )
    return Graph("lmdm", DenoiserGraph(denoiser), inputs, ("x_0",), make)


@dataclass(frozen=True)
class HeadDims:
    """Input widths and window of the displacement heads (defaults: the engine's log-mel stream, 80 mels +
    loudness; one-hot emotions; per-frame pose pitch/yaw/roll/t/scale)."""

    lip_in: int = 81
    emotion_in: int = 8
    pose_in: int = 7
    window: int = 9


def build_heads(dims: HeadDims = HeadDims()) -> dict[str, nn.Module]:
    """The three heads with the documented deterministic init (no trained weights exist for them: noise)."""
    heads: dict[str, nn.Module] = {
        "lip_head": LipHead(dims.lip_in),
        "emotion_head": EmotionHead(dims.emotion_in),
        "pose_head": PoseHead(dims.pose_in),
    }
    for name, head in heads.items():
        entries = [(f"{name}.{k}", tuple(v.shape)) for k, v in head.state_dict().items()]
        state = deterministic_state_dict(entries)
        head.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items()}, strict=True)
        head.eval().requires_grad_(False)
    return heads


def head_graphs(heads: dict[str, nn.Module], window: int = HeadDims.window) -> dict[str, Graph]:
    out = {}
    for name, head in heads.items():
        width = int(head.in_dim)  # type: ignore[arg-type]

        def make(b: int, g: torch.Generator, width: int = width) -> tuple[Tensor, ...]:
            return (torch.randn(b, window, width, generator=g),)

        spec = (TensorSpec("features", (BATCH, window, width)),)
        out[name] = Graph(name, HeadGraph(head), spec, ("offsets",), make)
    return out


def cast_graph(graph: Graph, dtype: torch.dtype) -> Graph:
    """A copy of ``graph`` whose parameters and floating inputs are ``dtype`` (the original is left untouched)."""
    if dtype == torch.float32:
        return graph
    module = copy.deepcopy(graph.module).to(dtype)
    inputs = tuple(
        TensorSpec(s.name, s.shape, str(dtype).removeprefix("torch.")) if s.dtype == "float32" else s
        for s in graph.inputs
    )

    def make(b: int, g: torch.Generator) -> tuple[Tensor, ...]:
        return tuple(t.to(dtype) if t.is_floating_point() else t for t in graph.make_inputs(b, g))

    return Graph(graph.name, module, inputs, graph.outputs, make)
