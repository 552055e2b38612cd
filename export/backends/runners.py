"""The renderer's and the denoiser's networks run through a backend, with the eager modules' call signatures.

:class:`RendererRuntime` is what :class:`engine.render.neural.NeuralRenderer` runs its networks through
(``engine.render.neural.RendererNetworks``); :class:`DenoiserRuntime` is a drop-in for the LMDM denoiser in the
motion scheduler. The ``eager`` backend is one backend among the others here, not a special case above.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from engine.models.liveportrait import LivePortraitNets
from engine.models.motion_extractor import MotionOutput
from engine.motion.lmdm import LMDMConfig, MotionDecoder
from engine.motion.samplers.guidance import per_sample_drop
from export.backends.base import BATCH_BUCKETS, Backend, Runner
from export.graphs import denoiser_graph, renderer_graphs


class RendererRuntime:
    """Appearance and motion (once per avatar), fused warp + decode and stitching (per frame) on ``backend``."""

    GRAPHS = ("appearance", "motion", "warping_decoder", "stitching")

    def __init__(self, nets: LivePortraitNets, backend: Backend, *, batch: int = 1):
        self.nets = nets
        self.backend = backend
        graphs = renderer_graphs(nets, names=self.GRAPHS, ops=backend.warp_ops)
        self.runners: dict[str, Runner] = {name: backend.load(g, batch=batch) for name, g in graphs.items()}
        # the per-frame graph sees the batch sizes a live worker forms: bucketed, so each shape is built once
        self.runners["warping_decoder"].buckets = BATCH_BUCKETS

    @property
    def device(self) -> torch.device:
        return self.backend.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backend.dtype

    def appearance(self, image: Tensor) -> Tensor:
        """``[B, 3, N, N]`` in [0, 1] -> feature volume ``[B, C, D, H, W]``."""
        return self.runners["appearance"](image)[0]

    def motion(self, image: Tensor) -> MotionOutput:
        return MotionOutput(*self.runners["motion"](image))

    def warp_decode(self, feature_3d: Tensor, kp_driving: Tensor, kp_source: Tensor) -> Tensor:
        """Feature volume and keypoints ``[B, 21, 3]`` -> image ``[B, 3, S, S]`` in (0, 1)."""
        return self.runners["warping_decoder"](feature_3d, kp_driving, kp_source)[0]

    def stitching(self, x: Tensor) -> Tensor:
        return self.runners["stitching"](x)[0]


class DenoiserRuntime:
    """The LMDM denoiser on ``backend``; called like :class:`engine.motion.lmdm.MotionDecoder`."""

    def __init__(self, denoiser: MotionDecoder, backend: Backend, *, batch: int = 2):
        self.config: LMDMConfig = denoiser.config
        self.untrained = denoiser.untrained
        self.backend = backend
        self.runner = backend.load(denoiser_graph(denoiser), batch=batch)

    def __call__(
        self,
        x_t: Tensor,
        cond_frame: Tensor,
        cond: Tensor,
        t: Tensor,
        drop_cond: bool = False,
        drop_mask: Tensor | None = None,
        **_: Any,
    ) -> Tensor:
        drop_mask = per_sample_drop(x_t.shape[0], drop_cond, drop_mask, x_t.device)
        return self.runner(x_t, cond_frame, cond, t, drop_mask)[0].to(x_t.device, x_t.dtype)
