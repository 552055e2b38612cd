"""``engine render`` pastes the talking face back into the avatar's original photo (``--paste-back``, the
default), at the photo's size with an odd side padded to even; ``--no-paste-back`` keeps the square crop."""

from __future__ import annotations

import hashlib
import wave
from pathlib import Path

import av
import numpy as np
import pytest
from click.testing import CliRunner, Result

from engine.avatar.default import default_avatar, default_portrait
from engine.avatar.record import Avatar
from engine.avatar.store import AvatarStore
from engine.media import VideoWriter
from streaming.cli import main
from streaming.transports.offline import crop_is_photo

PHOTO_W, PHOTO_H = 701, 600  # odd width: the encoded video must be 702 wide
FACE_X, FACE_Y = 120, 44  # where the 512 portrait (the crop) sits in the photo
SECONDS = 0.3


def photo_avatar() -> Avatar:
    """The default portrait inside a larger textured photo, stored with its crop placement and landmarks."""
    face, landmarks, scheme = default_portrait()
    yy, xx = np.mgrid[:PHOTO_H, :PHOTO_W]
    photo = np.stack([40 + xx * 160 // PHOTO_W, 60 + yy * 150 // PHOTO_H, np.full_like(xx, 140)], axis=-1)
    photo = photo.astype(np.uint8)
    photo[FACE_Y : FACE_Y + 512, FACE_X : FACE_X + 512] = face
    crop_to_image = np.array([[1.0, 0.0, FACE_X], [0.0, 1.0, FACE_Y]])
    digest = hashlib.sha256(photo.tobytes()).hexdigest()
    return Avatar("framed", digest, photo, face, crop_to_image, landmarks, scheme)


def write_wav(path: Path, seconds: float, rate: int = 16_000) -> None:
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * 180 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def decode(path: Path) -> np.ndarray:
    """All video frames ``[N, H, W, 3]`` uint8 RGB."""
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def render(args: list[str]) -> Result:
    return CliRunner().invoke(main, ["render", "--no-progress", *args], catch_exceptions=False)


@pytest.fixture
def framed_render(tmp_path: Path) -> tuple[Avatar, Path, Path]:
    """The framed avatar rendered twice in classic mode: pasted back (default) and as the crop."""
    avatar = AvatarStore().add(photo_avatar())
    wav = tmp_path / "v.wav"
    write_wav(wav, SECONDS)
    pasted, crop = tmp_path / "pasted.mp4", tmp_path / "crop.mp4"
    result = render(["--avatar", "framed", "--audio", str(wav), "--out", str(pasted), "--mode", "classic"])
    assert result.exit_code == 0, result.output
    assert f"{PHOTO_W + 1}x{PHOTO_H}" in result.output and "pasted into the photo" in result.output
    result = render(["--avatar", "framed", "--audio", str(wav), "--out", str(crop), "--no-paste-back"])
    assert result.exit_code == 0, result.output
    assert "512x512" in result.output
    return avatar, pasted, crop


def test_paste_back_gives_the_photo_with_the_talking_face(framed_render: tuple[Avatar, Path, Path]) -> None:
    avatar, pasted_path, crop_path = framed_render
    pasted, crop = decode(pasted_path), decode(crop_path)
    assert len(pasted) == len(crop) == int(np.ceil(SECONDS * 25))
    assert pasted.shape[1:] == (PHOTO_H, PHOTO_W + 1, 3)  # the photo's size, width padded to even
    assert crop.shape[1:] == (512, 512, 3)  # --no-paste-back: the crop, as before
    photo = avatar.image.astype(np.float32)
    video = pasted.astype(np.float32)
    # far from the face the video is the photo (up to H.264), left and right of the crop, in every frame
    for x0, x1 in ((0, FACE_X - 40), (FACE_X + 512 + 30, PHOTO_W)):
        err = np.abs(video[:, :, x0:x1] - photo[None, :, x0:x1])
        assert err.mean() < 2.0 and np.percentile(err, 99) < 8, (x0, x1, err.mean())
    # the padding column repeats the photo's last column
    assert np.abs(video[:, :, PHOTO_W] - video[:, :, PHOTO_W - 1]).mean() < 2.0
    # inside (where the feathered mask is 1) the photo shows the rendered face, frame by frame, at its place
    inner = slice(160, 352)
    face_in_photo = video[:, FACE_Y + 160 : FACE_Y + 352, FACE_X + 160 : FACE_X + 352]
    face_rendered = crop[:, inner, inner].astype(np.float32)
    assert np.abs(face_in_photo - face_rendered).mean() < 2.0
    # and that face moves (the check above compares talking frames, not a still photo)
    assert np.abs(face_rendered[1:] - face_rendered[:1]).max() > 20


def test_crop_that_is_the_photo_is_not_pasted() -> None:
    # the default avatar's crop is its whole photo: frames are written as rendered, at the renderer's size
    assert crop_is_photo(default_avatar())
    assert crop_is_photo(AvatarStore().get("default"))
    assert not crop_is_photo(photo_avatar())


def test_writer_pads_odd_sides_by_replicating(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    frame = np.repeat(np.repeat(rng.integers(0, 255, (5, 9, 3), dtype=np.uint8), 8, 0), 8, 1)[:39, :71]
    out = tmp_path / "odd.mp4"
    with VideoWriter(out, 25, (71, 39)) as w:
        assert (w.width, w.height) == (72, 40)
        for _ in range(3):
            w.video(frame)
        with pytest.raises(ValueError, match=r"\[39, 71, 3\]"):
            w.video(frame[:, :70])
    frames = decode(out)
    assert frames.shape == (3, 40, 72, 3)
    got = frames.astype(np.float32)
    assert np.abs(got[:, :, 71] - got[:, :, 70]).mean() < 3 and np.abs(got[:, 39] - got[:, 38]).mean() < 3
