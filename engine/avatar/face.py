"""Finding the face and cutting the 512x512 crop the renderer works on.

Sources, best first:
  * the user's own detector models, recorded by ``engine weights import liveportrait`` under ``DST/detectors``:
    insightface SCRFD ``det_10g.onnx`` (boxes + 5 key points), insightface ``2d106det.onnx`` (106 landmarks) and
    LivePortrait's ``landmark.onnx`` (203 landmarks), run through onnxruntime;
  * OpenCV's Haar cascade, when the installed OpenCV ships it (opencv-python 4.x does; 5.x dropped it);
  * a region the user gives (``--crop x,y,w,h``).
Nothing is downloaded: without any of these the caller gets an error asking for ``--crop``.
Without a landmark model, 68 landmarks come from the weight-free template fit of ``engine.avatar.landmarks``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np

from engine.avatar.geometry import (
    CROP_SCALE,
    CROP_SIZE,
    CROP_VY,
    CropRect,
    angle_from_down,
    apply_affine,
    face_axes,
    invert_affine,
    rect_from_box,
    rect_from_points,
    rect_from_region,
    warp_crop,
)
from engine.avatar.image import AvatarError
from engine.avatar.landmarks import SCHEME as TEMPLATE_SCHEME
from engine.avatar.landmarks import LandmarkError, TemplateLandmarker

logger = logging.getLogger(__name__)

DETECTOR_FILES = {"scrfd": "det_10g.onnx", "lmk106": "2d106det.onnx", "lmk203": "landmark.onnx"}
# When only a box is known (no landmark model), crop side / box side and the upward shift per detector, so the
# crop frames the face about as LivePortrait's landmark-based crop does (side = 2.3 x landmark extent). Haar
# boxes are larger than the landmark extent and sit higher (measured on the engine's default portrait).
BOX_FRAMING = {"scrfd": (2.1, CROP_VY), "haar": (1.8, -0.075)}


class FaceBox(NamedTuple):
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in image pixels (edges)
    score: float
    kps: np.ndarray | None  # [5, 2] left eye, right eye, nose, left mouth corner, right mouth corner

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.box
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)


@dataclass(frozen=True)
class FaceCrop:
    crop: np.ndarray  # [S, S, 3] uint8 RGB
    crop_to_image: np.ndarray  # [2, 3] float64
    landmarks: np.ndarray | None  # [N, 2] float32 in crop pixels
    landmark_scheme: str  # "lp203", "insightface106", "ibug68", "" (none)
    method: str  # how the face was found: "scrfd", "haar", "manual", "landmarks"
    rect: CropRect
    landmark_method: str = ""  # what made the landmarks: "2d106det", "landmark203", "template:..."
    landmark_note: str = ""  # why there are none, when the template fit was tried and failed


def _session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # detection runs once per avatar; do not compete with the live pipeline
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for corrupt / unsupported files
        raise AvatarError(f"{path}: cannot load detector model ({exc})") from exc


def _nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list[int]:
    """Greedy non-maximum suppression; returns kept indices, best score first."""
    order = np.argsort(-scores, kind="stable")
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        xx0 = np.maximum(boxes[i, 0], boxes[rest, 0])
        yy0 = np.maximum(boxes[i, 1], boxes[rest, 1])
        xx1 = np.minimum(boxes[i, 2], boxes[rest, 2])
        yy1 = np.minimum(boxes[i, 3], boxes[rest, 3])
        inter = np.clip(xx1 - xx0, 0, None) * np.clip(yy1 - yy0, 0, None)
        iou = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-9)
        order = rest[iou <= iou_threshold]
    return keep


class ScrfdDetector:
    """insightface SCRFD (``det_10g.onnx``): RGB input, ``(x - 127.5) / 128``, 640x640 letterboxed top-left;
    per stride 8/16/32 it returns scores [N, 1], box distances [N, 4] and key-point offsets [N, 10] in stride
    units, with ``N = (640 / stride)^2 * anchors`` (2 anchors per cell for det_10g)."""

    strides = (8, 16, 32)

    def __init__(self, path: Path, input_size: int = 640) -> None:
        self.path = path
        self.input_size = input_size
        self.session = _session(path)
        self.input_name = self.session.get_inputs()[0].name

    def _letterbox(self, rgb: np.ndarray) -> tuple[np.ndarray, float]:
        h, w = rgb.shape[:2]
        n = self.input_size
        if h > w:
            new_h, new_w = n, max(1, int(n * w / h))
        else:
            new_w, new_h = n, max(1, int(n * h / w))
        scale = new_h / h
        canvas = np.zeros((n, n, 3), dtype=np.float32)
        canvas[:new_h, :new_w] = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        blob = ((canvas - 127.5) / 128.0).transpose(2, 0, 1)[None]  # [1, 3, n, n]
        return np.ascontiguousarray(blob, dtype=np.float32), scale

    def _group_outputs(self, outputs: Sequence[np.ndarray]) -> dict[int, list[np.ndarray]]:
        """Outputs by kind (last dim 1 = scores, 4 = boxes, 10 = key points), each ordered stride 8, 16, 32.

        Sorting by row count (finest stride has the most anchors) instead of trusting the output order keeps
        re-exported models with shuffled outputs working."""
        groups: dict[int, list[np.ndarray]] = {1: [], 4: [], 10: []}
        for out in outputs:
            arr = np.asarray(out, dtype=np.float32)
            last = arr.shape[-1] if arr.ndim else 0
            if last not in groups:
                raise AvatarError(f"{self.path}: unexpected SCRFD output shape {list(arr.shape)}")
            groups[last].append(arr.reshape(-1, last))
        for key, arrays in groups.items():
            arrays.sort(key=lambda a: -a.shape[0])
            if key != 10 and len(arrays) != len(self.strides):
                raise AvatarError(
                    f"{self.path}: expected {len(self.strides)} SCRFD outputs with last dim {key}, got {len(arrays)}"
                )
        if groups[10] and len(groups[10]) != len(self.strides):
            raise AvatarError(f"{self.path}: expected 0 or 3 key-point outputs, got {len(groups[10])}")
        return groups

    def detect(self, rgb: np.ndarray, threshold: float = 0.5, iou_threshold: float = 0.4) -> list[FaceBox]:
        blob, scale = self._letterbox(rgb)
        outputs = self.session.run(None, {self.input_name: blob})
        groups = self._group_outputs(outputs)
        boxes, scores, kps_all = [], [], []
        for i, stride in enumerate(self.strides):
            cells = (self.input_size // stride) ** 2
            score = groups[1][i][:, 0]
            if score.shape[0] % cells:
                raise AvatarError(f"{self.path}: stride {stride} output has {score.shape[0]} rows, not k*{cells}")
            anchors = score.shape[0] // cells
            side = self.input_size // stride
            ys, xs = np.mgrid[:side, :side]
            centers = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float32) * stride  # [cells, 2]
            centers = np.repeat(centers, anchors, axis=0)  # anchors of one cell are consecutive rows
            keep = score >= threshold
            d = groups[4][i][keep] * stride  # [K, 4] distances left, top, right, bottom
            c = centers[keep]
            boxes.append(np.concatenate([c - d[:, :2], c + d[:, 2:]], axis=1))
            scores.append(score[keep])
            if groups[10]:
                k = groups[10][i][keep].reshape(-1, 5, 2) * stride
                kps_all.append(c[:, None, :] + k)
        all_boxes = np.concatenate(boxes) / scale
        all_scores = np.concatenate(scores)
        all_kps = np.concatenate(kps_all) / scale if kps_all else None
        faces = []
        for j in _nms(all_boxes, all_scores, iou_threshold):
            x0, y0, x1, y1 = (float(v) for v in all_boxes[j])
            faces.append(FaceBox((x0, y0, x1, y1), float(all_scores[j]), None if all_kps is None else all_kps[j]))
        return faces


def _self_normalising(path: Path) -> bool:
    """insightface's rule: a landmark model whose graph starts with Sub and Mul nodes normalises its own input
    (feed raw 0..255); otherwise feed ``(x - 127.5) / 128``."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # onnx raises DecodeError and friends for corrupt files
        raise AvatarError(f"{path}: cannot read ONNX graph ({exc})") from exc
    ops = {node.op_type for node in list(graph.node)[:8]}
    return "Sub" in ops and "Mul" in ops


class Landmark106:
    """insightface ``2d106det.onnx``: a 192x192 RGB crop of side 1.5 x the face box around its centre; the
    first output holds 106 (x, y) in [-1, 1] crop coordinates."""

    def __init__(self, path: Path, input_size: int = 192) -> None:
        self.path = path
        self.input_size = input_size
        self.session = _session(path)
        self.input_name = self.session.get_inputs()[0].name
        self.mean, self.std = (0.0, 1.0) if _self_normalising(path) else (127.5, 128.0)

    def predict(self, rgb: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
        """106 landmarks [106, 2] in image pixels."""
        rect = rect_from_box(box, scale=1.5, vy=0.0)
        crop, crop_to_image = warp_crop(rgb, rect, self.input_size)
        blob = ((crop.astype(np.float32) - self.mean) / self.std).transpose(2, 0, 1)[None]
        out = np.asarray(self.session.run(None, {self.input_name: np.ascontiguousarray(blob)})[0], dtype=np.float32)
        if out.size != 212:
            raise AvatarError(f"{self.path}: expected 212 landmark values, got shape {list(out.shape)}")
        pts = (out.reshape(-1, 2).astype(np.float64) + 1.0) * (self.input_size / 2)
        return apply_affine(crop_to_image, pts)


class Landmark203:
    """LivePortrait ``landmark.onnx``: a 224x224 RGB crop in [0, 1] (side 1.5 x the face extent, shifted up by
    0.1); one output holds 203 (x, y) normalised to [0, 1] of the crop (LivePortrait reads output 2)."""

    def __init__(self, path: Path, input_size: int = 224) -> None:
        self.path = path
        self.input_size = input_size
        self.session = _session(path)
        self.input_name = self.session.get_inputs()[0].name

    def predict_in_rect(self, rgb: np.ndarray, rect: CropRect) -> np.ndarray:
        """203 landmarks [203, 2] in ``rgb``'s pixels, for the face inside ``rect``."""
        crop, crop_to_image = warp_crop(rgb, rect, self.input_size)
        blob = (crop.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]
        outputs = [np.asarray(o) for o in self.session.run(None, {self.input_name: np.ascontiguousarray(blob)})]
        candidates = [o for o in outputs if o.size == 406]
        if not candidates:
            raise AvatarError(f"{self.path}: no output with 203 x 2 values ({[list(o.shape) for o in outputs]})")
        out = outputs[2] if len(outputs) > 2 and outputs[2].size == 406 else candidates[0]
        pts = out.reshape(-1, 2).astype(np.float64) * self.input_size
        return apply_affine(crop_to_image, pts)


def haar_cascade_path() -> Path | None:
    """The frontal-face cascade bundled with the installed OpenCV, or None (OpenCV 5 no longer ships it)."""
    if not hasattr(cv2, "CascadeClassifier"):
        return None
    data = getattr(getattr(cv2, "data", None), "haarcascades", None)
    if not data:
        return None
    path = Path(data) / "haarcascade_frontalface_default.xml"
    return path if path.is_file() else None


class HaarDetector:
    """OpenCV's classic frontal-face cascade: weight-free fallback (upright, frontal faces only)."""

    def __init__(self, path: Path) -> None:
        # OpenCV 5 removed the class (and mypy sees its stubs); haar_cascade_path() checked it exists
        self.classifier = getattr(cv2, "CascadeClassifier")(str(path))  # noqa: B009
        if self.classifier.empty():
            raise AvatarError(f"{path}: OpenCV could not load the Haar cascade")

    def detect(self, rgb: np.ndarray) -> list[FaceBox]:
        gray = cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
        min_side = max(24, min(gray.shape) // 8)
        found = self.classifier.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(min_side, min_side))
        return [FaceBox((float(x), float(y), float(x + w), float(y + h)), 1.0, None) for x, y, w, h in found]


def parse_crop(text: str) -> tuple[int, int, int, int]:
    """``"x,y,w,h"`` -> ints; a clear error otherwise."""
    parts = [p.strip() for p in text.split(",")]
    try:
        x, y, w, h = (int(p) for p in parts)
    except ValueError:
        raise AvatarError(f"--crop must be four integers x,y,w,h; got {text!r}") from None
    if w <= 0 or h <= 0:
        raise AvatarError(f"--crop width and height must be positive; got {text!r}")
    return x, y, w, h


class FaceLocator:
    """Find the face in a portrait and cut the renderer's crop, using whatever detectors are available."""

    def __init__(
        self,
        detectors_dir: Path | None = None,
        use_haar: bool = True,
        crop_size: int = CROP_SIZE,
        use_template: bool = True,
    ) -> None:
        self.crop_size = crop_size
        found = {
            key: detectors_dir / name
            for key, name in DETECTOR_FILES.items()
            if detectors_dir is not None and (detectors_dir / name).is_file()
        }
        self.scrfd = ScrfdDetector(found["scrfd"]) if "scrfd" in found else None
        self.lmk106 = Landmark106(found["lmk106"]) if "lmk106" in found else None
        self.lmk203 = Landmark203(found["lmk203"]) if "lmk203" in found else None
        haar = haar_cascade_path() if use_haar else None
        self.haar = HaarDetector(haar) if haar is not None else None
        # weight-free 68 landmarks when no landmark model is imported (engine.avatar.landmarks)
        self.template = TemplateLandmarker() if use_template else None

    def describe(self) -> str:
        names = [n for n, d in (("scrfd", self.scrfd), ("2d106det", self.lmk106), ("landmark203", self.lmk203)) if d]
        if self.haar:
            names.append("opencv-haar")
        return ", ".join(names) or "none"

    def detect(self, rgb: np.ndarray) -> tuple[FaceBox | None, str]:
        """The largest face (LivePortrait keeps the largest) and the detector that found it."""
        for method, det in (("scrfd", self.scrfd), ("haar", self.haar)):
            if det is None:
                continue
            faces = det.detect(rgb)
            if faces:
                return max(faces, key=lambda f: f.area), method
        return None, ""

    def locate(
        self,
        rgb: np.ndarray,
        crop: tuple[int, int, int, int] | None = None,
        fallback_points: np.ndarray | None = None,
        source: str = "image",
    ) -> FaceCrop:
        """Crop the face. ``crop`` (x, y, w, h) overrides detection; ``fallback_points`` [N, 2] (the user's
        landmarks, image pixels) place the crop when no detector finds a face."""
        h, w = rgb.shape[:2]
        points: np.ndarray | None = None
        scheme = how = note = ""
        if crop is not None:
            x, y, cw, ch = crop
            if x >= w or y >= h or x + cw <= 0 or y + ch <= 0:
                raise AvatarError(f"{source}: --crop {x},{y},{cw},{ch} lies outside the {w}x{h} image")
            rect, method = rect_from_region(x, y, cw, ch), "manual"
            if self.lmk203 is not None:
                points, scheme = self.lmk203.predict_in_rect(rgb, _landmark_rect_in(rect)), "lp203"
                how = "landmark203"
            elif self.template is not None:
                points, how, note = self._template_points(rgb, self._face_in_region(rgb, crop), None)
                scheme = TEMPLATE_SCHEME if points is not None else ""
        else:
            face, method = self.detect(rgb)
            if face is None:
                if fallback_points is None:
                    raise AvatarError(
                        f"{source}: no face found (detectors available: {self.describe()}). Give the face region "
                        "with --crop x,y,w,h (pixels), or import detector models with 'engine weights import'."
                    )
                rect, method = rect_from_points(fallback_points), "landmarks"
            else:
                rect, points, scheme, how, note = self._rect_from_face(rgb, face, method)
        cut, crop_to_image = warp_crop(rgb, rect, self.crop_size)
        landmarks = None
        if points is not None:
            landmarks = apply_affine(invert_affine(crop_to_image), points).astype(np.float32)
        return FaceCrop(cut, crop_to_image, landmarks, scheme, method, rect, how, note)

    def _face_in_region(self, rgb: np.ndarray, region: tuple[int, int, int, int]) -> tuple[float, float, float, float]:
        """The face box for a user's ``--crop``: the largest detected face centred inside it, else the region."""
        x, y, cw, ch = region
        face, _ = self.detect(rgb)
        if face is not None:
            fx, fy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
            if x <= fx < x + cw and y <= fy < y + ch:
                return face.box
        return (float(x), float(y), float(x + cw), float(y + ch))

    def _template_points(
        self, rgb: np.ndarray, box: tuple[float, float, float, float], kps: np.ndarray | None
    ) -> tuple[np.ndarray | None, str, str]:
        """(68 points in image pixels or None, how they were made, why there are none)."""
        if self.template is None:
            return None, "", ""
        try:
            fit = self.template.fit(rgb, box, kps)
        except LandmarkError as exc:
            logger.info("template landmarks: %s", exc)
            return None, "", str(exc)
        return fit.points, fit.method, ""

    def _rect_from_face(
        self, rgb: np.ndarray, face: FaceBox, method: str
    ) -> tuple[CropRect, np.ndarray | None, str, str, str]:
        """(crop rect, landmarks in image pixels or None, scheme, what made them, why there are none)."""
        angle = 0.0
        if face.kps is not None:
            eyes, mouth = face.kps[:2].mean(axis=0), face.kps[3:5].mean(axis=0)
            angle = angle_from_down(mouth - eyes)
        points: np.ndarray | None = None
        scheme = how = note = ""
        if self.lmk106 is not None:
            points, scheme, how = self.lmk106.predict(rgb, face.box), "insightface106", "2d106det"
        if self.lmk203 is not None:
            around = (
                rect_from_points(points, angle, scale=1.5, vy=-0.1)
                if points is not None
                else rect_from_box(face.box, angle, scale=1.5, vy=-0.1)
            )
            points, scheme, how = self.lmk203.predict_in_rect(rgb, around), "lp203", "landmark203"
        if points is None:
            points, how, note = self._template_points(rgb, face.box, face.kps)
            if points is not None:
                scheme = TEMPLATE_SCHEME
                eyes = points[36:48].mean(axis=0)
                angle = angle_from_down(points[[48, 54]].mean(axis=0) - eyes)
        if points is not None:
            return rect_from_points(points, angle), points, scheme, how, note
        scale, vy = BOX_FRAMING.get(method, (CROP_SCALE, CROP_VY))
        return rect_from_box(face.box, angle, scale=scale, vy=vy), None, "", "", note


def _landmark_rect_in(rect: CropRect) -> CropRect:
    """For a user's crop: the tighter square the 203-point model expects, assuming the crop was framed like
    ours (face extent = side / 2.3, centre 0.125 sides above the face centre)."""
    face = rect.size / CROP_SCALE
    _, down = face_axes(rect.angle)
    face_center = np.asarray(rect.center) - down * (CROP_VY * rect.size)
    center = face_center + down * (-0.1 * 1.5 * face)
    return CropRect((float(center[0]), float(center[1])), 1.5 * face, rect.angle)
