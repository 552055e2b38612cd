"""The avatar record: what is computed once per portrait and stored, keyed by the image's content hash."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Avatar:
    name: str
    content_hash: str  # sha256 of the original image file's bytes
    image: np.ndarray  # [H, W, 3] uint8 RGB original photo (paste-back target)
    crop: np.ndarray  # [S, S, 3] uint8 RGB face crop (S = 512)
    crop_to_image: np.ndarray  # [2, 3] float64 affine: crop pixel (x, y, 1) -> original image pixel
    landmarks: np.ndarray | None = None  # [N, 2] float32 in crop pixels (None when no landmark source)
    landmark_scheme: str = ""  # "lp203" (LivePortrait 203), "engine68" (the engine's own), ...
    # neural features per weights id (the store caches them; they depend on the weights that made them):
    # {"feature_3d": [32,16,64,64], "kp": [63], "pitch"/"yaw"/"roll": [66], "t": [3], "exp": [63], "scale": [1]}
    features: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    # what made the landmarks: "file" (the user's), "drawn", "2d106det", "landmark203", "template:..."
    landmark_method: str = ""
