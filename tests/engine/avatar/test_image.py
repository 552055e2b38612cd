"""Portrait validation: formats, limits, decompression bombs, truncation, modes, EXIF orientation."""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.avatar.image import AvatarError, load_image


def _gradient(w: int = 200, h: int = 160) -> np.ndarray:
    y, x = np.mgrid[:h, :w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) % 256], axis=2).astype(np.uint8)


def _png_header_only(path: Path, w: int, h: int) -> None:
    """A PNG that claims ``w x h`` pixels (8-bit gray) but holds a single empty IDAT: a bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("fmt,suffix", [("PNG", ".png"), ("BMP", ".bmp"), ("TIFF", ".tif"), ("WEBP", ".webp")])
def test_lossless_formats_round_trip(tmp_path: Path, fmt: str, suffix: str) -> None:
    rgb = _gradient()
    path = tmp_path / f"p{suffix}"
    save_kwargs = {"lossless": True} if fmt == "WEBP" else {}
    Image.fromarray(rgb).save(path, format=fmt, **save_kwargs)
    loaded = load_image(path)
    assert loaded.format == fmt
    assert loaded.rgb.dtype == np.uint8 and loaded.rgb.shape == (160, 200, 3)
    np.testing.assert_array_equal(loaded.rgb, rgb)
    assert loaded.content_hash == hashlib.sha256(path.read_bytes()).hexdigest()


def test_jpeg_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "p.jpg"
    Image.fromarray(_gradient()).save(path, format="JPEG", quality=95)
    loaded = load_image(path)
    assert loaded.format == "JPEG"
    assert np.abs(loaded.rgb.astype(int) - _gradient().astype(int)).mean() < 6


def test_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture\n" * 20)
    with pytest.raises(AvatarError, match=r"notes\.png: not a supported image"):
        load_image(path)


def test_disallowed_format(tmp_path: Path) -> None:
    path = tmp_path / "anim.gif"
    Image.fromarray(_gradient()).save(path, format="GIF")
    with pytest.raises(AvatarError, match="not a supported image"):
        load_image(path)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(AvatarError, match="not found"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(AvatarError, match="empty"):
        load_image(tmp_path / "empty.png")


def test_truncated_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    full = tmp_path / "full.png"
    Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)).save(full)
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(AvatarError, match=r"cut\.png: image data is truncated or corrupt"):
        load_image(cut)


def test_file_too_large(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.fromarray(_gradient()).save(path)
    with pytest.raises(AvatarError, match="bytes, more than the limit"):
        load_image(path, max_bytes=path.stat().st_size - 1)


def test_too_many_pixels_refused_from_header(tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    _png_header_only(path, 3000, 2000)
    with pytest.raises(AvatarError, match=r"more than the limit of 1000000.*decompression bomb"):
        load_image(path, max_pixels=1_000_000)


def test_pillow_bomb_guard_is_an_error(tmp_path: Path) -> None:
    # 400 M pixels: beyond twice Pillow's own limit, so Pillow itself raises while reading the header
    path = tmp_path / "bomb.png"
    _png_header_only(path, 20000, 20000)
    with pytest.raises(AvatarError, match="decompression bomb"):
        load_image(path, max_pixels=10**12)


def test_too_small(tmp_path: Path) -> None:
    path = tmp_path / "tiny.png"
    Image.fromarray(_gradient(120, 300)).save(path)
    with pytest.raises(AvatarError, match=r"120x300; the shorter side must be at least 128"):
        load_image(path)


def test_cmyk_becomes_rgb(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    cmyk = np.zeros((160, 160, 4), dtype=np.uint8)
    cmyk[:, :80] = (0, 255, 255, 0)  # red
    cmyk[:, 80:] = (0, 0, 0, 255)  # black
    Image.fromarray(cmyk, mode="CMYK").save(path, format="JPEG", quality=100)
    rgb = load_image(path).rgb
    assert rgb.shape == (160, 160, 3)
    np.testing.assert_allclose(rgb[80, 20], (255, 0, 0), atol=12)
    np.testing.assert_allclose(rgb[80, 140], (0, 0, 0), atol=12)


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((150, 150, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red channel everywhere
    rgba[:, :50, 3] = 0  # transparent -> white
    rgba[:, 50:100, 3] = 255  # opaque -> (200, 0, 0)
    rgba[:, 100:, 3] = 128  # half -> halfway to white
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    rgb = load_image(path).rgb.astype(int)
    np.testing.assert_array_equal(rgb[10, 10], (255, 255, 255))
    np.testing.assert_array_equal(rgb[10, 75], (200, 0, 0))
    a = 128 / 255
    np.testing.assert_allclose(rgb[10, 125], (200 * a + 255 * (1 - a), 255 * (1 - a), 255 * (1 - a)), atol=1.5)


def test_palette_with_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (140, 140), 0)
    img.putpalette([0, 0, 255] + [0, 255, 0] + [0] * 762)
    img.paste(1, (70, 0, 140, 140))
    path = tmp_path / "pal.png"
    img.save(path, transparency=0)
    rgb = load_image(path).rgb
    np.testing.assert_array_equal(rgb[5, 5], (255, 255, 255))  # index 0 is transparent
    np.testing.assert_array_equal(rgb[5, 100], (0, 255, 0))


def test_sixteen_bit_gray_is_scaled(tmp_path: Path) -> None:
    gray16 = np.zeros((140, 140), dtype=np.uint16)
    gray16[:, :70] = 65535
    gray16[:, 70:] = 32896  # 128 * 257
    path = tmp_path / "g16.png"
    Image.fromarray(gray16).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = load_image(path).rgb
    np.testing.assert_array_equal(rgb[0, 0], (255, 255, 255))
    np.testing.assert_array_equal(rgb[0, 100], (128, 128, 128))


def test_grayscale_and_la(tmp_path: Path) -> None:
    path = tmp_path / "g.png"
    Image.fromarray(np.full((130, 130), 77, np.uint8), mode="L").save(path)
    np.testing.assert_array_equal(load_image(path).rgb[0, 0], (77, 77, 77))
    la = np.zeros((130, 130, 2), np.uint8)
    la[..., 0] = 10
    la[..., 1] = 0  # fully transparent
    path = tmp_path / "la.png"
    Image.fromarray(la, mode="LA").save(path)
    np.testing.assert_array_equal(load_image(path).rgb[0, 0], (255, 255, 255))


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    stored = np.zeros((150, 200, 3), dtype=np.uint8)
    stored[:10, :10] = (255, 0, 0)  # stored top-left marker
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    img.save(path, format="JPEG", exif=exif, quality=100)
    rgb = load_image(path).rgb
    assert rgb.shape == (200, 150, 3)
    expected = np.rot90(stored, k=-1)  # clockwise
    assert expected[:10, -10:, 0].min() == 255  # the marker ends at the top-right
    assert rgb[:8, -8:, 0].mean() > 200 and rgb[:8, -8:, 1].mean() < 60
    assert rgb[-8:, :8, 0].mean() < 60
