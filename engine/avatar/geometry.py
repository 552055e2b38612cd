"""Square, optionally rotated face crops and their 2x3 affines (image <-> crop), LivePortrait style.

Pixel convention (the one ``cv2.warpAffine`` uses): integer coordinates are pixel centres, so pixel ``i`` covers
``[i - 0.5, i + 0.5]``. A crop of side ``size`` image pixels around ``center`` maps the square's edges to
``-0.5`` and ``dsize - 0.5`` in the crop.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import cv2
import numpy as np

CROP_SIZE = 512
CROP_SCALE = 2.3  # crop side / face extent (LivePortrait's source crop)
CROP_VY = -0.125  # shift of the crop centre along the face's down axis, in crop sides (negative: up)


class CropRect(NamedTuple):
    center: tuple[float, float]  # image pixels
    size: float  # side of the square, image pixels
    angle: float  # radians; rotation of the face's x axis from the image's x axis (0: upright)


def angle_from_down(down: np.ndarray) -> float:
    """Angle of a face whose down direction (eyes -> mouth) is ``down`` [2] in image coordinates."""
    return math.atan2(-float(down[0]), float(down[1]))


def face_axes(angle: float) -> tuple[np.ndarray, np.ndarray]:
    """(right, down) unit vectors of a face rotated by ``angle``, in image coordinates."""
    ux = np.array([math.cos(angle), math.sin(angle)])  # face right, in image coordinates
    uy = np.array([-math.sin(angle), math.cos(angle)])  # face down
    return ux, uy


def rect_from_points(
    points: np.ndarray, angle: float = 0.0, scale: float = CROP_SCALE, vx: float = 0.0, vy: float = CROP_VY
) -> CropRect:
    """Square around the extent of ``points`` [N, 2] measured in the face's own (rotated) axes, enlarged by
    ``scale`` and shifted by ``(vx, vy)`` crop sides along the face axes."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(pts) < 2 or not np.isfinite(pts).all():
        raise ValueError("need at least two finite points to place a crop")
    ux, uy = face_axes(angle)
    c0 = pts.mean(axis=0)
    local = np.stack([(pts - c0) @ ux, (pts - c0) @ uy], axis=1)  # [N, 2] in face axes
    lo, hi = local.min(axis=0), local.max(axis=0)
    mid = (lo + hi) / 2
    side = float((hi - lo).max()) * scale
    if side <= 0:
        raise ValueError("points have no extent")
    center = c0 + ux * mid[0] + uy * mid[1] + ux * (vx * side) + uy * (vy * side)
    return CropRect((float(center[0]), float(center[1])), side, angle)


def rect_from_box(
    box: tuple[float, float, float, float], angle: float = 0.0, scale: float = CROP_SCALE, vy: float = CROP_VY
) -> CropRect:
    """Square around a face box ``(x0, y0, x1, y1)`` (corner coordinates, pixel edges)."""
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0) * scale
    if side <= 0:
        raise ValueError(f"empty face box {box}")
    _, uy = face_axes(angle)
    # box edges are pixel edges: the centre in pixel-centre coordinates is half a pixel left/up
    center = np.array([(x0 + x1) / 2 - 0.5, (y0 + y1) / 2 - 0.5]) + uy * (vy * side)
    return CropRect((float(center[0]), float(center[1])), side, angle)


def rect_from_region(x: int, y: int, w: int, h: int) -> CropRect:
    """The square (side ``max(w, h)``) centred on the pixel region ``x, y, w, h``, upright."""
    return CropRect((x + w / 2 - 0.5, y + h / 2 - 0.5), float(max(w, h)), 0.0)


def image_to_crop(rect: CropRect, dsize: int) -> np.ndarray:
    """[2, 3] affine taking image pixel (x, y, 1) to crop pixel, for a ``dsize`` x ``dsize`` crop."""
    s = dsize / rect.size
    c, si = math.cos(rect.angle), math.sin(rect.angle)
    cx, cy = rect.center
    half = dsize / 2 - 0.5
    return np.array(
        [
            [s * c, s * si, -s * (c * cx + si * cy) + half],
            [-s * si, s * c, -s * (-si * cx + c * cy) + half],
        ],
        dtype=np.float64,
    )


def invert_affine(m: np.ndarray) -> np.ndarray:
    return np.asarray(cv2.invertAffineTransform(np.asarray(m, dtype=np.float64)), dtype=np.float64)


def apply_affine(m: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``points`` [N, 2] through a [2, 3] affine -> [N, 2]."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return pts @ np.asarray(m)[:, :2].T + np.asarray(m)[:, 2]


def warp_crop(image: np.ndarray, rect: CropRect, dsize: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut ``rect`` out of ``image`` [H, W, C] as a ``dsize`` square; returns (crop, crop_to_image [2, 3]).

    Outside the image the border is replicated: a face near the photo's edge gets plausible pixels, not black.
    """
    m = image_to_crop(rect, dsize)
    crop = cv2.warpAffine(image, m, (dsize, dsize), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return crop, invert_affine(m)
