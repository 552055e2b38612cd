"""Face detection and cropping: the SCRFD / 2d106det / landmark.onnx decoding checked against small ONNX models
built here with known outputs, the crop geometry, the manual crop and the Haar fallback."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from engine.avatar.default import default_portrait
from engine.avatar.face import (
    BOX_FRAMING,
    FaceBox,
    FaceLocator,
    Landmark106,
    Landmark203,
    ScrfdDetector,
    haar_cascade_path,
    parse_crop,
)
from engine.avatar.geometry import CropRect, apply_affine, invert_affine, rect_from_box, rect_from_points, warp_crop
from engine.avatar.image import AvatarError
from engine.avatar.prepare import prepare_avatar

# ---------------------------------------------------------------- fake SCRFD: two faces and one duplicate

SCALE = 0.8  # 800x600 photo -> letterboxed 640x480 in the 640 input


def _row(stride: int, gx: int, gy: int, anchor: int) -> int:
    return (gy * (640 // stride) + gx) * 2 + anchor


# (stride, gx, gy, anchor, score, distances l/t/r/b in model pixels, 5 key points in model pixels)
FACE_A = (16, 20, 12, 1, 0.9, (60.0, 80.0, 64.0, 88.0))
FACE_A_KPS = np.array([[300, 170], [340, 176], [322, 200], [304, 236], [334, 240]], dtype=np.float64)
FACE_A_DUP = (8, 40, 24, 0, 0.7, (58.0, 78.0, 62.0, 86.0))  # same face, lower score: removed by NMS
FACE_B = (32, 3, 3, 0, 0.8, (20.0, 20.0, 20.0, 20.0))


def _center(face: tuple) -> np.ndarray:
    stride, gx, gy = face[0], face[1], face[2]
    return np.array([gx * stride, gy * stride], dtype=np.float64)


def _expected_box(face: tuple) -> np.ndarray:
    c = _center(face)
    lft, top, rgt, bot = face[5]
    return np.array([c[0] - lft, c[1] - top, c[0] + rgt, c[1] + bot]) / SCALE


def _scrfd_outputs(batch_dim: bool) -> list[tuple[str, np.ndarray]]:
    outs: dict[str, np.ndarray] = {}
    for stride in (8, 16, 32):
        n = (640 // stride) ** 2 * 2
        outs[f"score_{stride}"] = np.full((n, 1), 0.01, np.float32)
        outs[f"bbox_{stride}"] = np.ones((n, 4), np.float32)
        outs[f"kps_{stride}"] = np.zeros((n, 10), np.float32)
    for face in (FACE_A, FACE_A_DUP, FACE_B):
        stride, gx, gy, anchor, score, dist = face
        r = _row(stride, gx, gy, anchor)
        outs[f"score_{stride}"][r, 0] = score
        outs[f"bbox_{stride}"][r] = np.asarray(dist) / stride
        kps = FACE_A_KPS if face is not FACE_B else np.tile(_center(face), (5, 1))
        outs[f"kps_{stride}"][r] = ((kps - _center(face)) / stride).ravel()
    items = list(outs.items())
    return [(k, v[None] if batch_dim else v) for k, v in items]


def _constant_model(path: Path, input_name: str, input_shape: list[int], outputs: list[tuple[str, np.ndarray]]) -> None:
    nodes, infos = [], []
    for name, value in outputs:
        nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name + "_c")))
        infos.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape)))
    graph = helper.make_graph(
        nodes, "fake", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, input_shape)], infos
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def _write_scrfd(path: Path, order: str = "insightface", batch_dim: bool = False) -> None:
    outs = _scrfd_outputs(batch_dim)
    if order == "shuffled":
        outs = outs[::-1]
    else:  # insightface order: scores 8/16/32, boxes 8/16/32, key points 8/16/32
        outs = sorted(
            outs, key=lambda kv: (["score", "bbox", "kps"].index(kv[0].split("_")[0]), int(kv[0].split("_")[1]))
        )
    _constant_model(path, "input.1", [1, 3, 640, 640], outs)


# ---------------------------------------------------------------- fake landmark models


def _landmark_model(
    path: Path, input_name: str, size: int, base: np.ndarray, direction: np.ndarray, self_normalise: bool, extra: int
) -> None:
    """out = base + (mean(channel 0) - mean(channel 2)) * direction, via ReduceMean -> MatMul -> Add (no Sub/Mul
    at the graph start unless ``self_normalise``, which prepends insightface's (x - 127.5) * (1/128))."""
    k = base.size
    weight = np.zeros((3, k), np.float32)
    weight[0], weight[2] = direction.ravel(), -direction.ravel()
    inits = [
        numpy_helper.from_array(weight, "w"),
        numpy_helper.from_array(base.reshape(1, k).astype(np.float32), "b"),
        numpy_helper.from_array(np.array([127.5], np.float32), "m"),
        numpy_helper.from_array(np.array([1 / 128], np.float32), "s"),
    ]
    nodes = []
    src = input_name
    if self_normalise:
        nodes += [helper.make_node("Sub", [src, "m"], ["x0"]), helper.make_node("Mul", ["x0", "s"], ["x1"])]
        src = "x1"
    nodes += [
        helper.make_node("ReduceMean", [src], ["means"], axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["means", "w"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["pts"]),
    ]
    outputs = []
    for i in range(extra):  # LivePortrait's model has other outputs before the points
        name = f"aux{i}"
        nodes.append(
            helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.zeros((1, 7), np.float32)))
        )
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 7]))
    outputs.append(helper.make_tensor_value_info("pts", TensorProto.FLOAT, [1, k]))
    graph = helper.make_graph(
        nodes,
        "fake_landmarks",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [1, 3, size, size])],
        outputs,
        initializer=inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


RNG = np.random.default_rng(7)
BASE106 = RNG.uniform(-0.6, 0.6, (106, 2))
DIR106 = RNG.uniform(-0.05, 0.05, (106, 2))
BASE203 = RNG.uniform(0.2, 0.8, (203, 2))
DIR203 = RNG.uniform(-0.05, 0.05, (203, 2))
COLOR = (255, 128, 0)  # uniform photo: channel 0 minus channel 2 is 255 raw, 1 in [0, 1], 255/128 normalised


def _photo() -> np.ndarray:
    return np.broadcast_to(np.array(COLOR, np.uint8), (600, 800, 3)).copy()


def _to_image(center: tuple[float, float], side: float, angle: float, dsize: int, pts: np.ndarray) -> np.ndarray:
    """Independent crop -> image mapping for a square of ``side`` around ``center`` rotated by ``angle``."""
    ux = np.array([math.cos(angle), math.sin(angle)])
    uy = np.array([-math.sin(angle), math.cos(angle)])
    local = (pts - (dsize / 2 - 0.5)) * (side / dsize)
    return np.asarray(center) + local[:, :1] * ux + local[:, 1:] * uy


@pytest.fixture
def detectors(tmp_path: Path) -> Path:
    d = tmp_path / "detectors"
    d.mkdir()
    _write_scrfd(d / "det_10g.onnx")
    _landmark_model(d / "2d106det.onnx", "data", 192, BASE106, DIR106, self_normalise=False, extra=0)
    _landmark_model(d / "landmark.onnx", "input", 224, BASE203, DIR203, self_normalise=False, extra=2)
    return d


# ---------------------------------------------------------------- tests


def test_scrfd_letterbox_is_rgb_normalised(tmp_path: Path) -> None:
    _write_scrfd(tmp_path / "det.onnx")
    det = ScrfdDetector(tmp_path / "det.onnx")
    blob, scale = det._letterbox(_photo())
    assert blob.shape == (1, 3, 640, 640) and scale == pytest.approx(SCALE)
    for ch, value in enumerate(COLOR):
        assert blob[0, ch, :480, :640] == pytest.approx((value - 127.5) / 128)
    assert blob[0, :, 480:, :] == pytest.approx(-127.5 / 128)  # padding is black


@pytest.mark.parametrize("order,batch_dim", [("insightface", False), ("shuffled", True)])
def test_scrfd_decoding_and_nms(tmp_path: Path, order: str, batch_dim: bool) -> None:
    _write_scrfd(tmp_path / "det.onnx", order, batch_dim)
    faces = ScrfdDetector(tmp_path / "det.onnx").detect(_photo())
    assert len(faces) == 2  # the duplicate of A is suppressed, the 0.01 scores are below threshold
    a, b = faces  # best score first
    assert a.score == pytest.approx(0.9) and b.score == pytest.approx(0.8)
    np.testing.assert_allclose(a.box, _expected_box(FACE_A), atol=1e-3)
    np.testing.assert_allclose(b.box, _expected_box(FACE_B), atol=1e-3)
    assert a.kps is not None
    np.testing.assert_allclose(a.kps, FACE_A_KPS / SCALE, atol=1e-3)


def test_landmark106_decoding(tmp_path: Path) -> None:
    for self_normalise in (False, True):
        path = tmp_path / f"lmk106_{self_normalise}.onnx"
        _landmark_model(path, "data", 192, BASE106, DIR106, self_normalise=self_normalise, extra=0)
        model = Landmark106(path)
        box = (300.0, 150.0, 460.0, 330.0)
        pts = model.predict(_photo(), box)
        # the model sees (x - 127.5) / 128 either way: fed normalised, or raw and normalising itself
        norm = BASE106 + DIR106 * (255 / 128)
        side = 1.5 * 180.0
        center = (380.0 - 0.5, 240.0 - 0.5)
        expected = _to_image(center, side, 0.0, 192, (norm + 1) * 96)
        np.testing.assert_allclose(pts, expected, atol=1e-3)


def test_landmark203_decoding_rotated(tmp_path: Path) -> None:
    path = tmp_path / "landmark.onnx"
    _landmark_model(path, "input", 224, BASE203, DIR203, self_normalise=False, extra=2)
    rect = CropRect((410.0, 260.0), 300.0, 0.25)
    pts = Landmark203(path).predict_in_rect(_photo(), rect)
    norm = BASE203 + DIR203 * 1.0  # RGB in [0, 1]: red minus blue = 1
    np.testing.assert_allclose(pts, _to_image(rect.center, rect.size, rect.angle, 224, norm * 224), atol=1e-3)


def test_locator_full_pipeline(detectors: Path) -> None:
    locator = FaceLocator(detectors, use_haar=False)
    photo = _photo()
    face = locator.locate(photo)
    assert face.method == "scrfd" and face.landmark_scheme == "lp203"
    assert face.crop.shape == (512, 512, 3)
    # the face is upright-corrected by the eye -> mouth direction of face A's key points
    eyes, mouth = FACE_A_KPS[:2].mean(0), FACE_A_KPS[3:].mean(0)
    down = mouth - eyes
    assert face.rect.angle == pytest.approx(math.atan2(-down[0], down[1]))
    # the crop's landmarks are the 203 points of the landmark model, mapped through the crop
    assert face.landmarks is not None and face.landmarks.shape == (203, 2)
    back = apply_affine(face.crop_to_image, face.landmarks)
    det = locator.scrfd
    assert det is not None
    best = det.detect(photo)[0]
    assert locator.lmk106 is not None and locator.lmk203 is not None
    pts106 = locator.lmk106.predict(photo, best.box)

    around = rect_from_points(pts106, face.rect.angle, scale=1.5, vy=-0.1)
    np.testing.assert_allclose(back, locator.lmk203.predict_in_rect(photo, around), atol=1e-2)
    # the crop encloses the landmarks with LivePortrait's margin (extent x 2.3)
    assert (face.landmarks > 0).all() and (face.landmarks < 512).all()


def test_crop_geometry_maps_pixels_both_ways() -> None:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    # pixels 72..327 x 22..277: their centre is at (199.5, 149.5) in pixel-centre coordinates
    rect = CropRect((199.5, 149.5), 256.0, 0.0)
    crop, c2i = warp_crop(image, rect, 256)  # 1:1 scale, upright: an exact copy
    np.testing.assert_array_equal(crop, image[22:278, 72:328])
    np.testing.assert_allclose(apply_affine(c2i, np.array([[0.0, 0.0]])), [[72.0, 22.0]])


def test_manual_crop_is_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (700, 700, 3), dtype=np.uint8)
    face = FaceLocator(None, use_haar=False).locate(image, crop=parse_crop("10, 20, 512, 512"))
    assert face.method == "manual" and face.landmarks is None
    np.testing.assert_array_equal(face.crop, image[20:532, 10:522])


def test_manual_crop_errors() -> None:
    with pytest.raises(AvatarError, match="four integers"):
        parse_crop("1,2,3")
    with pytest.raises(AvatarError, match="positive"):
        parse_crop("1,2,0,5")
    image = np.zeros((200, 200, 3), np.uint8)
    with pytest.raises(AvatarError, match="outside"):
        FaceLocator(None, use_haar=False).locate(image, crop=(300, 0, 50, 50))


def test_no_face_asks_for_crop() -> None:
    image = np.full((256, 256, 3), 90, np.uint8)
    with pytest.raises(AvatarError, match=r"no face found.*--crop x,y,w,h"):
        FaceLocator(None, use_haar=False).locate(image, source="flat.png")


def test_largest_face_is_chosen() -> None:
    class Fixed:
        def detect(self, rgb: np.ndarray) -> list[FaceBox]:
            return [FaceBox((10, 10, 40, 40), 0.99, None), FaceBox((100, 60, 180, 160), 0.6, None)]

    locator = FaceLocator(None, use_haar=False)
    locator.haar = Fixed()  # type: ignore[assignment]
    image = np.zeros((300, 300, 3), np.uint8)
    face = locator.locate(image)
    assert face.method == "haar"
    scale, vy = BOX_FRAMING["haar"]
    assert face.rect == rect_from_box((100, 60, 180, 160), scale=scale, vy=vy)


def test_box_only_framing(tmp_path: Path) -> None:
    _write_scrfd(tmp_path / "det_10g.onnx")
    # without the template fit (it would place 68 points on SCRFD's five): the box alone frames the crop
    face = FaceLocator(tmp_path, use_haar=False, use_template=False).locate(_photo())
    assert face.method == "scrfd" and face.landmarks is None and face.landmark_scheme == ""
    x0, y0, x1, y1 = _expected_box(FACE_A)
    side = max(x1 - x0, y1 - y0) * BOX_FRAMING["scrfd"][0]
    assert face.rect.size == pytest.approx(side)
    # the crop centre sits above the box centre, along the face's (tilted) up axis
    centre = np.array([(x0 + x1) / 2 - 0.5, (y0 + y1) / 2 - 0.5])
    shift = np.asarray(face.rect.center) - centre
    a = face.rect.angle
    up = np.array([math.sin(a), -math.cos(a)])
    np.testing.assert_allclose(shift, up * (-BOX_FRAMING["scrfd"][1] * side), atol=1e-6)


@pytest.mark.skipif(haar_cascade_path() is None, reason="installed OpenCV ships no Haar cascade (OpenCV >= 5)")
def test_haar_frames_the_default_portrait() -> None:
    import cv2

    portrait, landmarks, _ = default_portrait()
    image = cv2.copyMakeBorder(portrait, 150, 150, 250, 100, cv2.BORDER_REPLICATE)  # face off-centre
    face = FaceLocator(None).locate(image)
    assert face.method == "haar"
    inside = apply_affine(invert_affine(face.crop_to_image), landmarks + np.array([250.0, 150.0]))
    assert (inside > 0).all() and (inside < 512).all()
    extent = float((inside.max(0) - inside.min(0)).max())
    assert 512 / 2.3 * 0.75 < extent < 512 / 2.3 * 1.3  # framed like LivePortrait (extent x 2.3 = side)


def test_prepare_uses_detectors_from_the_engine_home(tmp_path: Path, engine_home: Path, detectors: Path) -> None:
    import shutil

    from PIL import Image

    shutil.copytree(detectors, engine_home / "weights" / "liveportrait" / "detectors")
    path = tmp_path / "photo.png"
    Image.fromarray(_photo()).save(path)
    avatar = prepare_avatar(path, "x")
    assert avatar.landmark_scheme == "lp203"
    assert avatar.landmarks is not None and avatar.landmarks.shape == (203, 2)
