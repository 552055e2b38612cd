"""Neural renderer: LivePortrait warp + SPADE decode behind the :class:`engine.render.base.Renderer` protocol.

Per avatar (once): F and M on the face crop resized to the preset's input size -> feature volume and the
portrait's own keypoints (:meth:`NeuralRenderer.compute_features`, the one place they are computed; the avatar
store caches the result per weights id). Per frame: driving keypoints from motion params (+ stitching), then W and
G batched over every avatar in the batch.

The networks run through :class:`RendererNetworks`: a backend's runners (``export.backends.RendererRuntime``:
eager PyTorch, torch.compile, onnxruntime or TensorRT), on that backend's device and precision. Keypoint maths
stays in fp32; the feature volume is kept in the backend's dtype on its device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import cv2
import numpy as np
import torch
from torch import Tensor

from engine.avatar.record import Avatar
from engine.keypoints import NUM_KP, MotionParams, SourceFace, keypoints_from_params, params_from_motion, stitch
from engine.models.liveportrait import LivePortraitNets
from engine.models.motion_extractor import MotionOutput
from engine.render.base import PreparedAvatar

FEATURE_KEYS = ("feature_3d", "kp", "pitch", "yaw", "roll", "t", "exp", "scale")


class RendererNetworks(Protocol):
    """The renderer's networks as some backend runs them (``export.backends.RendererRuntime``)."""

    nets: LivePortraitNets  # configuration, weights id, untrained flag

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def appearance(self, image: Tensor) -> Tensor:
        """``[B, 3, N, N]`` in [0, 1] -> feature volume ``[B, C, D, H, W]``."""
        ...

    def motion(self, image: Tensor) -> MotionOutput: ...

    def warp_decode(self, feature_3d: Tensor, kp_driving: Tensor, kp_source: Tensor) -> Tensor:
        """Feature volume and keypoints ``[B, 21, 3]`` -> image ``[B, 3, S, S]``."""
        ...

    def stitching(self, x: Tensor) -> Tensor: ...


class NeuralRenderer:
    """Renders ``config.output_size``^2 frames; ``untrained`` mirrors the networks' (noise when True)."""

    name = "neural"

    def __init__(self, networks: RendererNetworks, *, use_stitching: bool = True):
        self.networks = networks
        self.nets = networks.nets
        self.size = self.nets.config.output_size
        self.untrained = self.nets.untrained
        self.use_stitching = use_stitching
        self.device = networks.device
        self.dtype = networks.dtype

    def portrait_tensor(self, crop: np.ndarray) -> Tensor:
        """``[S, S, 3]`` uint8 RGB crop -> ``[1, 3, N, N]`` float in [0, 1] at the preset's input size."""
        if crop.ndim != 3 or crop.shape[2] != 3 or crop.dtype != np.uint8:
            raise ValueError(f"avatar crop must be [S, S, 3] uint8 RGB, got {crop.shape} {crop.dtype}")
        n = self.nets.config.input_size
        # cv2 bilinear as in the reference's input preparation
        img = cv2.resize(crop, (n, n), interpolation=cv2.INTER_LINEAR) if crop.shape[:2] != (n, n) else crop
        x = torch.from_numpy(np.ascontiguousarray(img)).to(self.device, torch.float32) / 255.0
        return x.clamp(0, 1).permute(2, 0, 1)[None]

    def compute_features(self, avatar: Avatar) -> dict[str, np.ndarray]:
        """The per-avatar neural features (what ``Avatar.features[weights_id]`` caches): ``{"feature_3d":
        [C, D, H, W], "kp", "pitch", "yaw", "roll", "t", "exp", "scale"}`` (raw M outputs, batch dropped), fp32."""
        x = self.portrait_tensor(avatar.crop)
        with torch.inference_mode():
            feature, motion = self.networks.appearance(x), self.networks.motion(x)
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
        volume = feats["feature_3d"][None].to(self.dtype)  # [1, C, D, H, W] on the device, in the backend's dtype
        return PreparedAvatar(avatar=avatar, source=source, state=volume)

    def drive(self, prepared: PreparedAvatar, params: MotionParams) -> Tensor:
        b = params.scale.shape[0]
        with torch.no_grad():
            kp_c = prepared.source.kp_canonical.expand(b, NUM_KP, 3)
            x_d = keypoints_from_params(kp_c, params)  # [B, 21, 3]
            if self.use_stitching:
                x_s = prepared.source.kp_source.expand(b, NUM_KP, 3)
                x_d = stitch(self.networks.stitching, x_s, x_d)
        return x_d

    def render(self, prepared: Sequence[PreparedAvatar], kp_driving: Tensor) -> Tensor:
        if len(prepared) != kp_driving.shape[0]:
            raise ValueError(f"{len(prepared)} prepared avatars but {kp_driving.shape[0]} driving keypoint sets")
        if not prepared:
            return torch.zeros(0, 3, self.size, self.size)
        feature = torch.cat([p.state for p in prepared])  # [B, C, D, H, W]
        kp_source = torch.stack([p.source.kp_source for p in prepared])  # [B, 21, 3]
        with torch.inference_mode():
            image = self.networks.warp_decode(feature, kp_driving.to(kp_source), kp_source)
        return image.float().clamp(0, 1)
