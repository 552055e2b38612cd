"""Avatar preparation, the on-disk store, and paste-back geometry."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import engine.avatar.store as store_module
from engine.avatar.default import default_portrait
from engine.avatar.geometry import CropRect, apply_affine, warp_crop
from engine.avatar.image import AvatarError
from engine.avatar.pasteback import PasteBack, feather_mask, paste_back
from engine.avatar.prepare import prepare_avatar, read_landmarks
from engine.avatar.record import Avatar
from engine.avatar.store import AvatarStore, validate_name
from engine.models import liveportrait
from streaming.testing import eager_renderer


@pytest.fixture(scope="module")
def tiny_nets() -> liveportrait.LivePortraitNets:
    return liveportrait.build("tiny")


def _with_features(avatar: Avatar, nets: liveportrait.LivePortraitNets) -> Avatar:
    """The avatar with the neural features ``engine avatar add`` caches (computed by the neural renderer)."""
    renderer = eager_renderer(nets)
    return dataclasses.replace(avatar, features={nets.weights_id: renderer.compute_features(avatar)})


def _photo(path: Path, seed: int = 0, size: tuple[int, int] = (360, 480)) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def _avatar(seed: int = 0, angle: float = 0.3, name: str = "a") -> Avatar:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (400, 500, 3), dtype=np.uint8)
    crop, c2i = warp_crop(image, CropRect((260.0, 190.0), 300.0, angle), 512)
    return Avatar(name, f"{seed:064x}", image, crop, c2i)


# ---------------------------------------------------------------- preparation


def test_renderer_features_are_the_networks_outputs_on_the_crop(tmp_path: Path, tiny_nets) -> None:
    path = _photo(tmp_path / "p.png")
    avatar = _with_features(prepare_avatar(path, "p", crop=(100, 50, 256, 256)), tiny_nets)
    assert avatar.crop.shape == (512, 512, 3)
    feats = avatar.features[tiny_nets.weights_id]
    size = tiny_nets.config.input_size
    # what the renderer would compute from the crop itself: bilinear resize to the nets' input, /255
    x = torch.from_numpy(cv2.resize(avatar.crop, (size, size), interpolation=cv2.INTER_LINEAR)).permute(2, 0, 1)
    x = x[None].float() / 255
    with torch.no_grad():
        volume = tiny_nets.appearance(x)[0].numpy()
        motion = tiny_nets.motion(x)
    np.testing.assert_allclose(feats["feature_3d"], volume, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(feats["exp"], motion.exp[0].numpy(), rtol=1e-5, atol=1e-6)
    assert feats["pitch"].shape == (66,) and feats["kp"].shape == (63,) and feats["scale"].shape == (1,)


def test_prepare_without_nets_has_no_features(tmp_path: Path) -> None:
    avatar = prepare_avatar(_photo(tmp_path / "p.png"), "p", crop=(0, 0, 200, 200))
    assert avatar.features == {} and avatar.landmarks is None


def test_user_landmarks_are_mapped_into_the_crop(tmp_path: Path) -> None:
    pts = np.array([[150.0, 120.0], [210.0, 118.0], [180.0, 170.0], [160.0, 200.0], [200.0, 201.0]])
    (tmp_path / "l.json").write_text(json.dumps({"points": pts.tolist(), "scheme": "five"}))
    np.save(tmp_path / "l.npy", pts)
    for file, scheme in (("l.json", "five"), ("l.npy", "user5")):
        avatar = prepare_avatar(
            _photo(tmp_path / "p.png"), "p", crop=(80, 40, 240, 240), landmarks_file=tmp_path / file
        )
        assert avatar.landmark_scheme == scheme
        assert avatar.landmarks is not None
        # crop (80, 40, 240, 240) -> 512: scale 512/240 about the region's corner (pixel-centre convention)
        k = 512 / 240
        np.testing.assert_allclose(avatar.landmarks, (pts - [80, 40] + 0.5) * k - 0.5, atol=1e-3)


def test_user_landmarks_place_the_crop_without_detector(tmp_path: Path) -> None:
    pts = np.array([[200.0, 150.0], [260.0, 150.0], [230.0, 230.0]])
    np.save(tmp_path / "l.npy", pts)
    avatar = prepare_avatar(_photo(tmp_path / "p.png"), "p", landmarks_file=tmp_path / "l.npy")
    assert avatar.landmarks is not None
    back = apply_affine(avatar.crop_to_image, avatar.landmarks)
    np.testing.assert_allclose(back, pts, atol=1e-3)
    # LivePortrait framing: side = extent (80) x 2.3, centre = extent centre (230, 190) moved up 0.125 sides
    side = 80 * 2.3
    center = np.array([230.0, 190.0 - 0.125 * side])
    np.testing.assert_allclose(avatar.landmarks, (pts - center) * 512 / side + 255.5, atol=1e-3)


def test_bad_landmark_files(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("[[1, 2, 3]]")
    with pytest.raises(AvatarError, match=r"\[N, 2\]"):
        read_landmarks(tmp_path / "bad.json")
    (tmp_path / "nan.json").write_text("[[1, 2], [NaN, 3]]")
    with pytest.raises(AvatarError, match="NaN"):
        read_landmarks(tmp_path / "nan.json")
    (tmp_path / "x.txt").write_text("1 2")
    with pytest.raises(AvatarError, match=r"\.npy or \.json"):
        read_landmarks(tmp_path / "x.txt")


def test_prepare_without_face_source_asks_for_crop(tmp_path: Path) -> None:
    flat = tmp_path / "flat.png"
    Image.fromarray(np.full((300, 300, 3), 128, np.uint8)).save(flat)
    with pytest.raises(AvatarError, match="--crop"):
        prepare_avatar(flat, "flat")


# ---------------------------------------------------------------- store


def test_store_round_trip(tmp_path: Path, tiny_nets) -> None:
    store = AvatarStore()
    avatar = _with_features(prepare_avatar(_photo(tmp_path / "p.png"), "alice", crop=(10, 10, 300, 300)), tiny_nets)
    avatar = Avatar(**{**avatar.__dict__, "landmarks": np.ones((5, 2), np.float32), "landmark_scheme": "five"})
    stored = store.add(avatar)
    assert store.names() == ["alice"]
    got = store.get("alice")
    assert got.content_hash == avatar.content_hash == stored.content_hash
    np.testing.assert_array_equal(got.image, avatar.image)
    np.testing.assert_array_equal(got.crop, avatar.crop)
    np.testing.assert_allclose(got.crop_to_image, avatar.crop_to_image)
    assert got.landmark_scheme == "five" and got.landmarks is not None
    np.testing.assert_array_equal(got.landmarks, avatar.landmarks)
    wid = tiny_nets.weights_id
    assert set(got.features) == {wid}
    for key, value in avatar.features[wid].items():
        np.testing.assert_array_equal(got.features[wid][key], value)
    [info] = store.list()
    assert info.name == "alice" and info.weights_ids == (wid,) and info.meta["image_size"] == [480, 360]
    store.remove("alice")
    assert store.names() == [] and not (store.root / "entries" / avatar.content_hash).exists()
    with pytest.raises(AvatarError, match="no avatar named 'alice'"):
        store.get("alice")


def test_same_image_twice_shares_one_entry(tmp_path: Path) -> None:
    store = AvatarStore()
    p1 = _photo(tmp_path / "one.png", seed=5)
    p2 = tmp_path / "copy.png"
    p2.write_bytes(p1.read_bytes())
    a = store.add(prepare_avatar(p1, "one", crop=(0, 0, 200, 200)))
    b = store.add(prepare_avatar(p2, "two", crop=(0, 0, 200, 200)))
    assert a.content_hash == b.content_hash
    assert len(list((store.root / "entries").iterdir())) == 1
    store.remove("one")
    assert store.get("two").content_hash == a.content_hash  # still referenced
    store.remove("two")
    assert list((store.root / "entries").iterdir()) == []


def test_re_adding_a_photo_with_new_landmarks_or_crop_is_not_ignored(tmp_path: Path) -> None:
    store = AvatarStore()
    photo = _photo(tmp_path / "one.png", seed=6)
    store.add(prepare_avatar(photo, "plain", crop=(0, 0, 200, 200)))
    assert store.get("plain").landmarks is None
    points = tmp_path / "points.json"
    points.write_text(json.dumps([[20.0 + 2 * i, 40.0 + i] for i in range(68)]))
    with_points = store.add(prepare_avatar(photo, "marked", crop=(0, 0, 200, 200), landmarks_file=points))
    assert with_points.landmarks is not None and with_points.landmark_scheme == "ibug68"
    assert store.get("plain").landmarks is not None  # same photo: one entry, prepared anew
    recropped = store.add(prepare_avatar(photo, "marked", crop=(10, 10, 150, 150), landmarks_file=points))
    assert not np.allclose(recropped.crop_to_image, with_points.crop_to_image)
    assert len(list((store.root / "entries").iterdir())) == 1


def test_name_conflicts_and_overwrite(tmp_path: Path) -> None:
    store = AvatarStore()
    store.add(prepare_avatar(_photo(tmp_path / "a.png", seed=1), "me", crop=(0, 0, 200, 200)))
    other = prepare_avatar(_photo(tmp_path / "b.png", seed=2), "me", crop=(0, 0, 200, 200))
    with pytest.raises(AvatarError, match="already exists"):
        store.add(other)
    store.add(other, overwrite=True)
    assert store.get("me").content_hash == other.content_hash
    assert len(list((store.root / "entries").iterdir())) == 1  # the replaced photo's entry is gone


@pytest.mark.parametrize("bad", ["", "../etc", "a/b", ".hidden", "x" * 65, "a\\b", "name.", "sp ace", "ü"])
def test_invalid_names(bad: str) -> None:
    with pytest.raises(AvatarError, match="invalid avatar name"):
        validate_name(bad)
    with pytest.raises(AvatarError, match="invalid avatar name"):
        AvatarStore().get(bad)


def test_add_is_atomic_on_failure(tmp_path: Path, tiny_nets, monkeypatch: pytest.MonkeyPatch) -> None:

    store = AvatarStore()
    avatar = _with_features(prepare_avatar(_photo(tmp_path / "p.png"), "p", crop=(0, 0, 200, 200)), tiny_nets)

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(store_module, "_write_features", boom)
    with pytest.raises(OSError, match="disk full"):
        store.add(avatar)
    assert store.names() == []
    entries = store.root / "entries"
    assert not entries.exists() or list(entries.iterdir()) == []  # no entry, no temporary directory


def test_features_for_more_weights_are_added(tmp_path: Path) -> None:
    store = AvatarStore()
    store.add(prepare_avatar(_photo(tmp_path / "p.png"), "p", crop=(0, 0, 200, 200)))
    odd_id = "lp/imported weights:v1"  # not a file name: stored under a hashed name, id kept in the header
    store.put_features("p", odd_id, {"exp": np.arange(63, dtype=np.float32)})
    got = store.get("p")
    assert list(got.features) == [odd_id]
    np.testing.assert_array_equal(got.features[odd_id]["exp"], np.arange(63, dtype=np.float32))
    assert all("/" not in p.name for p in (store.root / "entries").rglob("*"))


def test_default_avatar_is_created_on_demand() -> None:
    store = AvatarStore()
    assert store.names() == []
    avatar = store.get("default")
    assert store.names() == ["default"]
    assert avatar.crop.shape == (512, 512, 3) and avatar.landmark_scheme
    assert avatar.landmarks is not None and avatar.landmarks.shape[1] == 2

    image, landmarks, _ = default_portrait()
    np.testing.assert_array_equal(avatar.image, image)
    np.testing.assert_allclose(apply_affine(avatar.crop_to_image, avatar.landmarks), landmarks, atol=1e-3)


# ---------------------------------------------------------------- paste-back


def test_paste_back_returns_a_marked_pixel_to_its_origin() -> None:
    avatar = _avatar(angle=0.3)
    frame = avatar.crop.copy()
    u, v = 300, 220
    frame[v - 2 : v + 3, u - 2 : u + 3] = (255, 0, 255)
    out = paste_back(frame, avatar)
    x, y = apply_affine(avatar.crop_to_image, np.array([[u, v]], float))[0]
    assert tuple(out[round(y), round(x)]) == (255, 0, 255)
    # far away from the crop the photo is untouched; inside, pasting the unchanged crop reproduces the photo
    assert (out[:, :40] == avatar.image[:, :40]).all()
    plain = paste_back(avatar.crop, avatar).astype(int)
    assert np.abs(plain[180:200, 250:270] - avatar.image[180:200, 250:270].astype(int)).mean() < 40
    assert (out[round(y), round(x)] != avatar.image[round(y), round(x)]).any()


def test_paste_back_smaller_frames_and_batches() -> None:
    avatar = _avatar(seed=1, angle=-0.2)
    paster = PasteBack(avatar, 256)
    frames = np.repeat(np.zeros((1, 256, 256, 3), np.uint8), 2, axis=0)
    fv, fu = 100, 140
    frames[1, fv - 1 : fv + 2, fu - 1 : fu + 2] = 255
    out = paster.batch(frames)
    assert out.shape == (2, 400, 500, 3)
    # frame pixel (fu, fv) at half resolution is crop pixel (2 fu + 0.5, 2 fv + 0.5)
    x, y = apply_affine(avatar.crop_to_image, np.array([[2 * fu + 0.5, 2 * fv + 0.5]]))[0]
    assert (out[1, round(y), round(x)] == 255).all()
    assert (out[0, round(y), round(x)] == 0).all()  # the black frame replaced the face there
    with pytest.raises(ValueError, match="frame"):
        paster(np.zeros((512, 512, 3), np.uint8))


def test_feather_mask_fades_to_the_border() -> None:
    m = feather_mask(512)
    assert m[256, 256] == pytest.approx(1.0, abs=1e-3)
    assert m[0, 256] < 0.05 and m[256, 0] < 0.05 and m[0, 0] < 0.01
    row = m[256, :256]
    assert (np.diff(row) >= -1e-6).all()  # monotone fade towards the centre
    assert math.isclose(float(m.max()), 1.0, abs_tol=1e-6)
