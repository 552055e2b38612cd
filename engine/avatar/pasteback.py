"""Putting rendered face crops back into the original photo.

The rendered frame is warped with the avatar's crop -> image affine and blended through a feathered mask, so
the seam fades over a few percent of the crop instead of showing the square's edge. Everything that depends
only on the avatar and the frame size (the warped mask, the photo's untouched part, the region of interest) is
computed once in :class:`PasteBack`; each frame then costs one warp of the region around the face.
"""

from __future__ import annotations

import cv2
import numpy as np

from engine.avatar.geometry import invert_affine
from engine.avatar.record import Avatar

FEATHER = 0.06  # mask blur sigma, as a fraction of the crop side


def feather_mask(size: int, feather: float = FEATHER) -> np.ndarray:
    """[size, size] float32 in [0, 1]: 1 inside, fading to 0 at the crop's border (a blurred inset square)."""
    sigma = max(feather * size, 0.5)
    inset = min(round(2 * sigma), size // 4)
    square = np.zeros((size, size), dtype=np.float32)
    square[inset : size - inset, inset : size - inset] = 1.0
    mask = np.asarray(cv2.GaussianBlur(square, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_CONSTANT))
    return np.clip(mask / max(float(mask.max()), 1e-6), 0.0, 1.0)


def frame_to_image(avatar: Avatar, frame_size: int) -> np.ndarray:
    """[2, 3] affine: pixel of a ``frame_size`` rendered frame -> pixel of the avatar's original photo."""
    crop_size = avatar.crop.shape[0]
    k = crop_size / frame_size
    # frame pixel v and crop pixel u cover the same area: u + 0.5 = (v + 0.5) * k
    frame_to_crop = np.array([[k, 0.0, 0.5 * k - 0.5], [0.0, k, 0.5 * k - 0.5], [0.0, 0.0, 1.0]])
    c2i = np.vstack([np.asarray(avatar.crop_to_image, dtype=np.float64), [0.0, 0.0, 1.0]])
    return (c2i @ frame_to_crop)[:2]


class PasteBack:
    """Paste ``frame_size`` frames of one avatar into its photo (build once per avatar and size)."""

    def __init__(self, avatar: Avatar, frame_size: int, feather: float = FEATHER) -> None:
        image = np.asarray(avatar.image)
        h, w = image.shape[:2]
        self.image = image
        self.frame_size = frame_size
        matrix = frame_to_image(avatar, frame_size)
        # region of the photo the frame can touch: the warped frame corners, clipped to the photo
        corners = np.array([[-0.5, -0.5], [frame_size - 0.5, -0.5], [-0.5, frame_size - 0.5], [frame_size - 0.5] * 2])
        mapped = corners @ matrix[:, :2].T + matrix[:, 2]
        x0, y0 = np.clip(np.floor(mapped.min(axis=0)).astype(int), 0, [w, h])
        x1, y1 = np.clip(np.ceil(mapped.max(axis=0)).astype(int) + 1, 0, [w, h])
        self.roi = (int(x0), int(y0), int(x1), int(y1))
        self.matrix = matrix.copy()
        self.matrix[:, 2] -= (x0, y0)  # warp straight into the region of interest
        size = (int(x1 - x0), int(y1 - y0))
        self.empty = size[0] <= 0 or size[1] <= 0
        if self.empty:
            return
        mask = cv2.warpAffine(feather_mask(frame_size, feather), self.matrix, size, flags=cv2.INTER_LINEAR)
        self.mask = np.ascontiguousarray(mask, dtype=np.float32)  # [h_roi, w_roi]
        self.inverse_mask = np.ascontiguousarray(1.0 - self.mask)
        self.background = np.ascontiguousarray(image[y0:y1, x0:x1])

    def __call__(self, frame: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``frame`` [S, S, 3] uint8 RGB -> the photo [H, W, 3] uint8 with the frame blended in.

        ``out``: a buffer to write into, holding the photo from an earlier call (only the region around the
        face is rewritten, which saves copying the whole photo per frame); a new array when None.
        """
        frame = np.asarray(frame)
        if frame.shape != (self.frame_size, self.frame_size, 3):
            raise ValueError(f"expected a [{self.frame_size}, {self.frame_size}, 3] frame, got {list(frame.shape)}")
        if out is None:
            out = self.image.copy()
        elif out.shape != self.image.shape or out.dtype != np.uint8:
            raise ValueError(f"out must be a uint8 array of shape {list(self.image.shape)}")
        if self.empty:
            return out
        x0, y0, x1, y1 = self.roi
        warped = cv2.warpAffine(
            np.ascontiguousarray(frame, dtype=np.uint8),
            self.matrix,
            (x1 - x0, y1 - y0),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REPLICATE,
        )
        # one fused per-pixel weighted sum in OpenCV (rounds and saturates to uint8)
        out[y0:y1, x0:x1] = cv2.blendLinear(warped, self.background, self.mask, self.inverse_mask)
        return out

    def batch(self, frames: np.ndarray) -> np.ndarray:
        """[B, S, S, 3] uint8 -> [B, H, W, 3] uint8."""
        frames = np.asarray(frames)
        if frames.ndim != 4:
            raise ValueError(f"expected [B, S, S, 3] frames, got {list(frames.shape)}")
        out = np.empty((len(frames), *self.image.shape), dtype=np.uint8)
        out[:] = self.image  # the photo once per slot; each frame then rewrites only its region
        for i, frame in enumerate(frames):
            self(frame, out=out[i])
        return out


def paste_back(frame_rgb: np.ndarray, avatar: Avatar) -> np.ndarray:
    """One-off paste of ``frame_rgb`` [S, S, 3] uint8 into ``avatar.image`` (use :class:`PasteBack` per stream)."""
    return PasteBack(avatar, int(np.asarray(frame_rgb).shape[0]))(frame_rgb)


def image_to_frame(avatar: Avatar, frame_size: int) -> np.ndarray:
    """[2, 3] affine: photo pixel -> rendered-frame pixel (the inverse of :func:`frame_to_image`)."""
    return invert_affine(frame_to_image(avatar, frame_size))
