"""Reading a user's portrait safely: format allow-list, size limits, decompression-bomb guard, EXIF orientation
and every Pillow mode normalised to RGB uint8.

Limits are arguments with defaults rather than module state, so a caller (or a test) can tighten them without
touching Pillow's process-wide ``Image.MAX_IMAGE_PIXELS``.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF")
MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_PIXELS = 50_000_000  # ~ 8660 x 5770; a portrait never needs more and a bomb is refused before decoding
MIN_SIDE = 128


class AvatarError(ValueError):
    """A portrait, crop, landmark file or store entry that the engine cannot use; the message says why."""


@dataclass(frozen=True)
class LoadedImage:
    rgb: np.ndarray  # [H, W, 3] uint8, EXIF orientation applied
    content_hash: str  # sha256 of the file's bytes (the avatar store's key)
    format: str  # Pillow format name, one of ALLOWED_FORMATS
    path: Path


def load_image(
    path: Path | str,
    *,
    max_bytes: int = MAX_FILE_BYTES,
    max_pixels: int = MAX_PIXELS,
    min_side: int = MIN_SIDE,
) -> LoadedImage:
    """Read, check and normalise a portrait; raise :class:`AvatarError` naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise AvatarError(f"{path}: image file not found")
    size = path.stat().st_size
    if size > max_bytes:
        raise AvatarError(f"{path}: file is {size} bytes, more than the limit of {max_bytes} bytes")
    if size == 0:
        raise AvatarError(f"{path}: file is empty")
    data = path.read_bytes()
    rgb, fmt = decode_image(data, str(path), max_pixels=max_pixels, min_side=min_side)
    return LoadedImage(rgb=rgb, content_hash=hashlib.sha256(data).hexdigest(), format=fmt, path=path)


def decode_image(
    data: bytes, source: str, *, max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE
) -> tuple[np.ndarray, str]:
    """Decode image bytes to ``([H, W, 3] uint8 RGB, format)``; ``source`` names the file in errors."""
    # Pillow warns (and above 2x its own limit raises) on decompression bombs; both are errors here.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
        except UnidentifiedImageError as exc:
            raise AvatarError(
                f"{source}: not a supported image (allowed formats: {', '.join(ALLOWED_FORMATS)})"
            ) from exc
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise AvatarError(f"{source}: refused as a possible decompression bomb ({exc})") from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise AvatarError(f"{source}: unreadable image header ({exc})") from exc
        fmt = str(img.format)
        w, h = img.size
        # checked on the header, before any pixel is decoded
        if w * h > max_pixels:
            raise AvatarError(
                f"{source}: image is {w}x{h} = {w * h} pixels, more than the limit of {max_pixels} "
                "(refused before decoding: possible decompression bomb)"
            )
        if min(w, h) < min_side:
            raise AvatarError(f"{source}: image is {w}x{h}; the shorter side must be at least {min_side} pixels")
        try:
            img.load()
            upright = ImageOps.exif_transpose(img)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise AvatarError(f"{source}: refused as a possible decompression bomb ({exc})") from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise AvatarError(f"{source}: image data is truncated or corrupt ({exc})") from exc
    return to_rgb_uint8(upright, source), fmt


def to_rgb_uint8(img: Image.Image, source: str = "image") -> np.ndarray:
    """Any Pillow mode -> ``[H, W, 3]`` uint8 RGB. Transparent pixels are composited on white (a portrait with
    a cut-out background should not turn black), high-bit-depth data is scaled, not clipped."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        if mode == "F":
            top = 1.0 if arr.size and float(np.nanmax(arr)) <= 1.0 else 255.0
        elif mode == "I" and arr.size and float(arr.max()) <= 255.0:
            top = 255.0
        else:
            top = 65535.0
        gray = np.clip(np.nan_to_num(arr) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "P" or mode == "PA":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    try:
        rgb = img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise AvatarError(f"{source}: cannot convert image mode {mode!r} to RGB ({exc})") from exc
    out = np.asarray(rgb, dtype=np.uint8)
    if out.ndim != 3 or out.shape[2] != 3:
        raise AvatarError(f"{source}: unexpected decoded shape {out.shape} for mode {mode!r}")
    return np.ascontiguousarray(out)
