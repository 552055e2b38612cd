"""Neural renderer: LivePortrait warp + SPADE decode behind the :class:`engine.render.base.Renderer` protocol.

Per avatar (once): F and M on the face crop resized to the preset's input size -> feature volume and the
portrait's own keypoints. Per frame: driving keypoints from motion params (+ stitching), then W and G batched
over every avatar in the batch.

The networks run as PyTorch modules (the ``eager`` reference) unless a backend is given
(:mod:`engine.backends`: ``onnxruntime``, ``compile``, ``tensorrt``): then F, M, stitching and the fused W + G run
through that backend's runners (:class:`engine.backends.RendererRuntime`), the rest of the maths stays the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch

from engine.avatar.record import Avatar
from engine.keypoints import NUM_KP, MotionParams, keypoints_from_params, params_from_motion, stitch
from engine.models.liveportrait import LivePortraitNets
from engine.render.base import PreparedAvatar, SourceFace

if TYPE_CHECKING:
    from engine.backends import Backend, RendererRuntime

FEATURE_KEYS = ("feature_3d", "kp", "pitch", "yaw", "roll", "t", "exp", "scale")


class NeuralRenderer:
    """Renders ``config.output_size``^2 frames; ``untrained`` mirrors the networks' (noise when True).

    ``backend``: ``None`` calls the modules directly (today's eager path, bit for bit); a
    :class:`engine.backends.Backend` (loaded here, on the networks' device) or a ready
    :class:`engine.backends.RendererRuntime` of these networks runs them through that backend.
    """

    name = "neural"

    def __init__(
        self,
        nets: LivePortraitNets,
        *,
        use_stitching: bool = True,
        backend: Backend | RendererRuntime | None = None,
    ):
        self.nets = nets
        self.size = nets.config.output_size
        self.untrained = nets.untrained
        self.use_stitching = use_stitching
        self.device = next(nets.appearance.parameters()).device
        self.runtime = _renderer_runtime(nets, backend)
        self.backend_name = self.runtime.backend.name if self.runtime is not None else "eager"

    def portrait_tensor(self, crop: np.ndarray) -> torch.Tensor:
        """``[S, S, 3]`` uint8 RGB crop -> ``[1, 3, N, N]`` float in [0, 1] at the preset's input size."""
        if crop.ndim != 3 or crop.shape[2] != 3 or crop.dtype != np.uint8:
            raise ValueError(f"avatar crop must be [S, S, 3] uint8 RGB, got {crop.shape} {crop.dtype}")
        n = self.nets.config.input_size
        # cv2 bilinear as in the reference's input preparation
        img = cv2.resize(crop, (n, n), interpolation=cv2.INTER_LINEAR) if crop.shape[:2] != (n, n) else crop
        x = torch.from_numpy(np.ascontiguousarray(img)).to(self.device, torch.float32) / 255.0
        return x.clamp(0, 1).permute(2, 0, 1)[None]

    def compute_features(self, avatar: Avatar) -> dict[str, np.ndarray]:
        """The per-avatar neural features (what ``Avatar.features[weights_id]`` caches)."""
        x = self.portrait_tensor(avatar.crop)
        with torch.inference_mode():
            if self.runtime is not None:
                feature, motion = self.runtime.appearance(x), self.runtime.motion(x)
            else:
                feature = self.nets.appearance(x)  # [1, C, D, H, W]
                motion = self.nets.motion(x)
        out = {"feature_3d": feature[0]}
        out.update({k: getattr(motion, k)[0] for k in FEATURE_KEYS[1:]})
        return {k: v.float().cpu().numpy() for k, v in out.items()}

    def features_for(self, avatar: Avatar) -> dict[str, np.ndarray]:
        """Cached features for these weights when present and well-formed, else freshly computed."""
        cached = avatar.features.get(self.nets.weights_id)
        if (
            cached is not None
            and set(FEATURE_KEYS) <= set(cached)
            and tuple(cached["feature_3d"].shape) == self.nets.config.volume_shape
        ):
            return cached
        return self.compute_features(avatar)

    def prepare(self, avatar: Avatar) -> PreparedAvatar:
        feats = {
            k: torch.from_numpy(np.asarray(v, dtype=np.float32)).to(self.device)
            for k, v in self.features_for(avatar).items()
        }
        params = params_from_motion(
            feats["pitch"][None],
            feats["yaw"][None],
            feats["roll"][None],
            feats["t"][None],
            feats["exp"][None],
            feats["scale"][None],
        )
        kp_canonical = feats["kp"].reshape(NUM_KP, 3)
        kp_source = keypoints_from_params(kp_canonical[None], params)[0]  # [21, 3]
        source = SourceFace(kp_canonical=kp_canonical, params=params, kp_source=kp_source)
        return PreparedAvatar(avatar=avatar, source=source, state=feats["feature_3d"][None])  # [1, C, D, H, W]

    def drive(self, prepared: PreparedAvatar, params: MotionParams) -> torch.Tensor:
        b = params.scale.shape[0]
        with torch.no_grad():
            kp_c = prepared.source.kp_canonical.expand(b, NUM_KP, 3)
            x_d = keypoints_from_params(kp_c, params)  # [B, 21, 3]
            if self.use_stitching:
                x_s = prepared.source.kp_source.expand(b, NUM_KP, 3)
                net = self.runtime.stitching if self.runtime is not None else self.nets.stitching
                x_d = stitch(net, x_s, x_d)
        return x_d

    def render(self, prepared: Sequence[PreparedAvatar], kp_driving: torch.Tensor) -> torch.Tensor:
        if len(prepared) != kp_driving.shape[0]:
            raise ValueError(f"{len(prepared)} prepared avatars but {kp_driving.shape[0]} driving keypoint sets")
        if not prepared:
            return torch.zeros(0, 3, self.size, self.size)
        feature = torch.cat([p.state for p in prepared])  # [B, C, D, H, W]
        kp_source = torch.stack([p.source.kp_source for p in prepared])  # [B, 21, 3]
        with torch.inference_mode():
            if self.runtime is not None:
                image = self.runtime.warp_decode(feature, kp_driving.to(feature), kp_source).to(feature)
            else:
                warped = self.nets.warping(feature, kp_driving.to(feature), kp_source)
                image = self.nets.decoder(warped.out)  # [B, 3, size, size]
        return image.clamp(0, 1)


def _renderer_runtime(nets: LivePortraitNets, backend: Backend | RendererRuntime | None) -> RendererRuntime | None:
    if backend is None:
        return None
    from engine.backends import Backend, RendererRuntime

    if isinstance(backend, RendererRuntime):
        if backend.nets is not nets:
            raise ValueError("the RendererRuntime was built from other networks than the renderer's")
        return backend
    if not isinstance(backend, Backend):
        raise TypeError(f"backend must be an engine.backends.Backend or RendererRuntime, got {type(backend).__name__}")
    return RendererRuntime(nets, backend)
