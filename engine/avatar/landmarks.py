"""Weight-free 68-point face landmarks: a mean-face template fitted to five points found by image analysis.

Why this and not a learned model (checked with ``pip download --no-deps`` and ``unzip -l``, cp311/cp312
manylinux x86_64 wheels):

* ``mediapipe`` (Apache-2.0) up to 0.10.21 ships ``face_landmark.tflite`` and ``face_detection_*.tflite``
  inside the wheel, but pins ``protobuf<5`` while the ``onnx`` we depend on needs ``protobuf>=6.31``; 0.10.21
  also pins ``numpy<2``; both pull ``jax``/``jaxlib`` and, worst, ``opencv-contrib-python``: a second OpenCV
  distribution in the venv overwrites the ``cv2`` package of our ``opencv-python-headless<5``. The next
  release, 0.10.30, and everything after it (0.10.32, 0.10.35, 1.2.3 checked) carry no face model at all (the
  Tasks API loads ``.task`` files that must be downloaded). Not even an opt-in extra installs without breaking
  the base install, so there is none.
* OpenCV's own learned landmarkers (``cv2.face`` Facemark LBF/AAM/Kazemi, ``FaceDetectorYN``) live in
  opencv-contrib or need model files that must be downloaded.

What ships with the default install is OpenCV's bundled Haar cascades (``cv2.data.haarcascades``, BSD-3 /
Intel licence). So the fit here is:

1. eyes: the ``haarcascade_eye`` / ``haarcascade_eye_tree_eyeglasses`` pair that fits the face box best (or
   the box's statistical eye positions when the cascades miss), refined to the iris centre by a dark-disk
   search (the iris is the darkest round blob of about a fifth of the eye distance);
2. the face is resampled upright with a fixed eye distance (``_IOD`` px), so every later step works at one scale;
3. mouth: the lip seam is the longest dark horizontal valley in the lower face, scored by valley depth over a
   span as wide as a mouth (the shadow under the nose is narrower) times a prior on its height; the corners are
   where the traced valley fades out;
4. nose tip: just above the shadow under the nose (the darkest short valley between the eyes and the seam);
   chin: the first strong bright-to-dark edge below the mouth (optional; else the template's proportion);
5. the mean-face template below (units of the eye distance; drawn here from typical adult proportions) is fitted
   to those five points by least-squares affine, then each part is moved onto its own anchor, so the eye
   centres, nose tip and mouth corners land exactly on what was found.

When imported SCRFD models give five key points, they replace steps 1-4. The fit refuses (``LandmarkError``)
when the eyes or the mouth cannot be found or the five points are not a plausible face, so a caller never gets
invented landmarks. Accuracy on real photos is measured in ``tests/test_landmarks_fit.py``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from engine.avatar.image import AvatarError

SCHEME = "ibug68"  # iBUG 300-W point order, the layout classic mode reads
CLASSIC_SCHEMES = ("engine68", SCHEME)  # 68-point layouts the classic renderer reads (same point order)

# The mean face, iBUG order, in units of the inter-ocular (pupil) distance: eye centres at (-0.5, 0) and
# (0.5, 0), x to the image's right, y down; mouth corners on y = 1. Typical adult proportions: eye fissure
# 0.46 wide, brows 0.35-0.42 above the pupils, nose tip 0.6 and the lip seam 1.0 below them, mouth 0.8 wide,
# chin 1.8 below, face contour 2 wide at eye level.
_HALF_JAW = [(-0.98, 0.10), (-0.96, 0.35), (-0.92, 0.60), (-0.86, 0.85), (-0.77, 1.08), (-0.64, 1.30), (-0.48, 1.50)]
_HALF_JAW += [(-0.27, 1.68)]
_LEFT_BROW = [(-0.85, -0.28), (-0.72, -0.38), (-0.56, -0.42), (-0.40, -0.41), (-0.18, -0.35)]
_LEFT_EYE = [(-0.73, 0.02), (-0.60, -0.07), (-0.40, -0.075), (-0.27, 0.02), (-0.40, 0.06), (-0.60, 0.06)]
_NOSE = [(0.0, 0.0), (0.0, 0.2), (0.0, 0.4), (0.0, 0.6), (-0.2, 0.68), (-0.1, 0.72), (0.0, 0.74), (0.1, 0.72)]
_NOSE += [(0.2, 0.68)]
_OUTER_LIP = [(-0.4, 1.0), (-0.26, 0.92), (-0.1, 0.87), (0.0, 0.89), (0.1, 0.87), (0.26, 0.92), (0.4, 1.0)]
_OUTER_LIP += [(0.27, 1.1), (0.12, 1.15), (0.0, 1.16), (-0.12, 1.15), (-0.27, 1.1)]
_INNER_LIP = [(-0.33, 1.0), (-0.12, 0.99), (0.0, 0.995), (0.12, 0.99), (0.33, 1.0), (0.12, 1.005), (0.0, 1.005)]
_INNER_LIP += [(-0.12, 1.005)]


def _template() -> np.ndarray:
    pts = np.zeros((68, 2))
    for i, (x, y) in enumerate(_HALF_JAW):
        pts[i], pts[16 - i] = (x, y), (-x, y)
    pts[8] = (0.0, 1.8)
    for i, (x, y) in enumerate(_LEFT_BROW):
        pts[17 + i], pts[26 - i] = (x, y), (-x, y)
    pts[27:36] = _NOSE
    pts[36:42] = _LEFT_EYE
    # the right eye starts at its inner corner and runs over the top to the outer one (iBUG order)
    for dst, src in {42: 39, 43: 38, 44: 37, 45: 36, 46: 41, 47: 40}.items():
        pts[dst] = (-pts[src, 0], pts[src, 1])
    pts[48:60] = _OUTER_LIP
    pts[60:68] = _INNER_LIP
    return pts


TEMPLATE = _template()  # [68, 2]
LEFT_EYE, RIGHT_EYE = list(range(36, 42)), list(range(42, 48))
NOSE_TIP, MOUTH_LEFT, MOUTH_RIGHT = 30, 48, 54

# the canonical (upright) face patch the analysis runs on: eye distance _IOD px, eye midpoint at _MID
_IOD = 64.0
_MID = (96.0, 64.0)
_PATCH = (192, 208)  # width, height: 1.5 eye distances each side, 2.25 below the eyes
# eye centres inside a frontal-face Haar box, as fractions of its side (measured on the three test photos,
# which agree to 0.03; the refinement below searches around these)
_BOX_EYES = ((0.29, 0.385), (0.71, 0.385))
# a mouth corner is where the traced lip seam fades below this fraction of its depth at the centre; lower values
# follow a smile's crease up the cheek (0.3 overshot by 7 % of the eye distance on the astronaut photo)
_CORNER_FADE = 0.4
# evidence needed before a part counts as found (grey levels; ratios to the typical response around it)
_IRIS_MIN, _IRIS_RATIO = 15.0, 2.8
_SEAM_MIN, _SEAM_RATIO = 6.0, 4.0
_CHIN_MIN = 15.0  # grey levels between the 3 rows above and below the chin's edge (photos: 22-48)


class LandmarkError(AvatarError):
    """The face was found but its landmarks were not (the reason says which part)."""


class FivePoints(NamedTuple):
    eyes: np.ndarray  # [2, 2] image-left eye centre, image-right eye centre
    nose: np.ndarray  # [2] nose tip
    mouth: np.ndarray  # [2, 2] image-left mouth corner, image-right mouth corner

    def array(self) -> np.ndarray:
        return np.concatenate([self.eyes, self.nose[None], self.mouth])  # [5, 2]


class LandmarkFit(NamedTuple):
    points: np.ndarray  # [68, 2] image pixels, iBUG order
    anchors: FivePoints  # what the template was fitted to
    method: str  # e.g. "template:haar-eyes+mouth-valley+chin-edge", "template:scrfd-5pt"
    chin: np.ndarray | None  # [2] the chin's lower edge when it was found (else the template's proportion)


def five_point_landmarks(points68: np.ndarray) -> np.ndarray:
    """[68, 2] -> [5, 2]: eye centres (mean of each eye's six points), nose tip (30), mouth corners (48, 54)."""
    p = np.asarray(points68, dtype=np.float64)
    return np.stack([p[LEFT_EYE].mean(0), p[RIGHT_EYE].mean(0), p[NOSE_TIP], p[MOUTH_LEFT], p[MOUTH_RIGHT]])


def fit_template(anchors: FivePoints, chin: np.ndarray | None = None) -> np.ndarray:
    """The template placed on five points (and optionally the chin [2]) -> [68, 2] image pixels.

    A least-squares affine (it absorbs scale, roll and the face's own eye-to-mouth proportion) places every
    point; then each part is translated onto its anchor: eyes (and brows) onto their eye, the nose onto the
    tip (the bridge blends from the eye midpoint to the tip), lips onto the corners (blended across the mouth).
    A found chin moves the jaw below the mouth line along the face's down axis, fully at the chin (point 8)."""
    dst = anchors.array()
    src = five_point_landmarks(TEMPLATE)
    a = np.concatenate([src, np.ones((5, 1))], axis=1)  # [5, 3]
    affine, *_ = np.linalg.lstsq(a, dst, rcond=None)  # [3, 2]
    placed = np.concatenate([TEMPLATE, np.ones((68, 1))], axis=1) @ affine  # [68, 2]
    fitted = five_point_landmarks(placed)
    res = dst - fitted  # [5, 2] what the affine left over, per anchor
    out = placed.copy()
    out[LEFT_EYE] += res[0]
    out[RIGHT_EYE] += res[1]
    out[17:22] += res[0]
    out[22:27] += res[1]
    eye_mid = (res[0] + res[1]) / 2
    for i, frac in zip(range(27, 31), (0.0, 1 / 3, 2 / 3, 1.0), strict=True):
        out[i] += (1 - frac) * eye_mid + frac * res[2]
    out[31:36] += res[2]
    # lips: blend the corner residuals by how far across the mouth a point sits (template x in [-0.4, 0.4])
    across = np.clip((TEMPLATE[48:68, 0] + 0.4) / 0.8, 0.0, 1.0)[:, None]  # [20, 1]
    out[48:68] += (1 - across) * res[3] + across * res[4]
    if chin is not None:
        down = dst[3:5].mean(axis=0) - dst[:2].mean(axis=0)
        down /= max(float(np.linalg.norm(down)), 1e-9)
        shift = float((np.asarray(chin, dtype=np.float64) - out[8]) @ down)
        below = np.clip((TEMPLATE[:17, 1] - 1.0) / (TEMPLATE[8, 1] - 1.0), 0.0, 1.0)  # [17] 0 at the mouth line
        out[:17] += below[:, None] * shift * down
    return out


# -- finding the five points ----------------------------------------------------------------------------------


def _cascade(name: str) -> cv2.CascadeClassifier | None:
    data = getattr(getattr(cv2, "data", None), "haarcascades", None)
    if not data or not hasattr(cv2, "CascadeClassifier"):
        return None
    path = Path(data) / name
    if not path.is_file():
        return None
    clf = cv2.CascadeClassifier(str(path))
    return None if clf.empty() else clf


def _to_canonical(eyes: np.ndarray) -> np.ndarray:
    """[2, 3] affine image -> canonical patch (eyes level, ``_IOD`` apart, midpoint at ``_MID``)."""
    v = eyes[1] - eyes[0]
    s = _IOD / max(float(np.hypot(*v)), 1e-6)
    c, si = math.cos(math.atan2(v[1], v[0])) * s, math.sin(math.atan2(v[1], v[0])) * s
    mid = eyes.mean(axis=0)
    rot = np.array([[c, si], [-si, c]])
    t = np.asarray(_MID) - rot @ mid
    return np.concatenate([rot, t[:, None]], axis=1)


def _apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return np.asarray(pts, dtype=np.float64).reshape(-1, 2) @ m[:, :2].T + m[:, 2]


def _disk_kernel(radius: float, inner: float = 0.0) -> np.ndarray:
    r = math.ceil(radius)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    d = np.hypot(xx, yy)
    k = ((d <= radius) & (d >= inner)).astype(np.float32)
    return k / k.sum()


class TemplateLandmarker:
    """Finds the five anchor points with OpenCV's bundled cascades and image analysis, then fits the template."""

    def __init__(self) -> None:
        self.eye_cascades = [
            c
            for c in (_cascade("haarcascade_eye.xml"), _cascade("haarcascade_eye_tree_eyeglasses.xml"))
            if c is not None
        ]

    # -- public ----------------------------------------------------------------------------------------------
    def fit(
        self, rgb: np.ndarray, box: tuple[float, float, float, float], kps: np.ndarray | None = None
    ) -> LandmarkFit:
        """68 landmarks for the face in ``box`` (x0, y0, x1, y1). ``kps`` [5, 2]: a detector's five points
        (SCRFD order: eyes, nose, mouth corners), used instead of the image analysis. Raises LandmarkError."""
        if kps is not None:
            k = np.asarray(kps, dtype=np.float64).reshape(5, 2)
            anchors = FivePoints(k[:2], k[2], k[3:5])
            method = "template:scrfd-5pt"
        else:
            gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
            eyes, eye_method = self._eyes(gray, box)
            anchors = self._lower_face(rgb, eyes)
            method = f"template:{eye_method}+mouth-valley"
        _check_plausible(anchors)
        chin = _chin(rgb, anchors)
        if chin is not None:
            method += "+chin-edge"
        return LandmarkFit(fit_template(anchors, chin), anchors, method, chin)

    # -- eyes ------------------------------------------------------------------------------------------------
    def _eyes(self, gray: np.ndarray, box: tuple[float, float, float, float]) -> tuple[np.ndarray, str]:
        x0, y0, x1, y1 = box
        side = max(x1 - x0, y1 - y0)
        prior = np.array([[x0 + fx * side, y0 + fy * side] for fx, fy in _BOX_EYES])
        pair = self._cascade_pair(gray, box, prior)
        method = "haar-eyes" if pair is not None else "box-eyes"
        eyes = pair if pair is not None else prior
        iod = float(np.hypot(*(eyes[1] - eyes[0])))
        left, right = (self._iris(gray, e, iod) for e in eyes)
        if left is None or right is None:
            where = "the eye cascade" if pair is not None else "the face box"
            raise LandmarkError(f"the eyes could not be located (no iris where {where} puts them)")
        return np.stack([left, right]), method

    def _cascade_pair(
        self, gray: np.ndarray, box: tuple[float, float, float, float], prior: np.ndarray
    ) -> np.ndarray | None:
        x0, y0, x1, y1 = (round(v) for v in box)
        side = max(x1 - x0, y1 - y0)
        h, w = gray.shape
        top, bottom = max(0, y0), min(h, y0 + int(0.65 * side))
        left, right = max(0, x0), min(w, x1)
        if bottom - top < 16 or right - left < 16:
            return None
        roi = cv2.equalizeHist(np.ascontiguousarray(gray[top:bottom, left:right]))
        centres: list[np.ndarray] = []
        sizes: list[float] = []
        for clf in self.eye_cascades:
            min_side = max(8, side // 10)
            found = clf.detectMultiScale(
                roi, scaleFactor=1.05, minNeighbors=3, minSize=(min_side, min_side), maxSize=(side // 3, side // 3)
            )
            for ex, ey, ew, eh in found:
                centres.append(np.array([left + ex + ew / 2 - 0.5, top + ey + eh / 2 - 0.5]))
                sizes.append(float(ew))
        best, best_cost = None, math.inf
        prior_iod = float(prior[1, 0] - prior[0, 0])
        for i, a in enumerate(centres):
            for j, b in enumerate(centres):
                if b[0] <= a[0]:
                    continue
                dx, dy = b[0] - a[0], b[1] - a[1]
                if not (0.55 * prior_iod < dx < 1.45 * prior_iod) or abs(dy) > 0.35 * dx:
                    continue
                if max(sizes[i], sizes[j]) > 1.6 * min(sizes[i], sizes[j]):
                    continue
                cost = float(np.hypot(*(a - prior[0])) + np.hypot(*(b - prior[1]))) / prior_iod
                if cost < best_cost and cost < 0.9:
                    best, best_cost = np.stack([a, b]), cost
        return best

    def _iris(self, gray: np.ndarray, centre: np.ndarray, iod: float) -> np.ndarray | None:
        """The centre of the darkest round blob (iris) near ``centre`` (dark disk against its ring), or None
        when nothing there looks like an iris."""
        r = max(2.0, 0.09 * iod)
        half_w, half_h = math.ceil(0.22 * iod + 2 * r), math.ceil(0.14 * iod + 2 * r)
        cx, cy = round(centre[0]), round(centre[1])
        h, w = gray.shape
        x0, x1, y0, y1 = max(0, cx - half_w), min(w, cx + half_w + 1), max(0, cy - half_h), min(h, cy + half_h + 1)
        patch = cv2.GaussianBlur(gray[y0:y1, x0:x1].astype(np.float32), (0, 0), max(0.6, 0.15 * r))
        if patch.shape[0] < 2 * r + 2 or patch.shape[1] < 2 * r + 2:
            return None
        disk = cv2.filter2D(patch, -1, _disk_kernel(r), borderType=cv2.BORDER_REPLICATE)
        ring = cv2.filter2D(patch, -1, _disk_kernel(1.7 * r, r), borderType=cv2.BORDER_REPLICATE)
        contrast = ring - disk  # bright around, dark inside
        score = contrast
        yy, xx = np.mgrid[y0:y1, x0:x1]
        # stay near the start: an eyebrow or a glasses frame is dark too
        dist2 = ((xx - centre[0]) / (0.2 * iod)) ** 2 + ((yy - centre[1]) / (0.12 * iod)) ** 2
        score = score * np.exp(-0.5 * dist2) - 0.15 * (disk - float(disk.min()))
        iy, ix = np.unravel_index(int(np.argmax(score)), score.shape)
        # an iris is a blob much darker than its ring, standing out from the window's texture (real eyes:
        # 45-80 grey levels and 4-13x the median; noise and flat skin: about 5 and 2x)
        strength = float(contrast[iy, ix])
        if strength < _IRIS_MIN or strength < _IRIS_RATIO * (float(np.median(np.abs(contrast))) + 1.0):
            return None
        # sub-pixel: darkness-weighted centroid of the disk around the best position
        win = math.ceil(r)
        ys, xs = slice(max(0, iy - win), iy + win + 1), slice(max(0, ix - win), ix + win + 1)
        gy, gx = np.mgrid[ys, xs]
        inside = np.hypot(gx - ix, gy - iy) <= r
        dark = np.clip(float(np.percentile(patch[ys, xs][inside], 50)) - patch[ys, xs], 0, None) * inside
        wsum = float(dark.sum())
        if wsum <= 0:
            return np.array([x0 + ix, y0 + iy], dtype=np.float64)
        return np.array([x0 + float((gx * dark).sum()) / wsum, y0 + float((gy * dark).sum()) / wsum])

    # -- nose and mouth --------------------------------------------------------------------------------------
    def _lower_face(self, rgb: np.ndarray, eyes: np.ndarray) -> FivePoints:
        m = _to_canonical(eyes)
        patch = cv2.warpAffine(rgb, m, _PATCH, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        # lips are red: in the green channel they are darker against skin than in plain luminance
        green = cv2.GaussianBlur(patch[:, :, 1].astype(np.float32), (0, 0), 1.0)
        valley = _valley(green, 5)
        seam_y, corners = _mouth(valley)
        nose = _nose_tip(valley, seam_y, corners)
        back = cv2.invertAffineTransform(m)
        return FivePoints(eyes, _apply(back, nose[None])[0], _apply(back, corners))


def _valley(img: np.ndarray, reach: int) -> np.ndarray:
    """Per pixel: how much darker it is than the darker of the two ``reach``-row means just above and just
    below it. A thin dark horizontal line (a lip seam, the shadow under the nose) scores high; the inside of a
    large dark region and an edge between dark and bright score about 0."""
    mean = cv2.filter2D(img, -1, np.ones((reach, 1), np.float32) / reach, borderType=cv2.BORDER_REPLICATE)
    off = reach // 2 + 2  # the two windows end a pixel short of the row itself, so a 2-3 px line stays inside
    up = np.concatenate([np.repeat(mean[:1], off, axis=0), mean[:-off]])
    down = np.concatenate([mean[off:], np.repeat(mean[-1:], off, axis=0)])
    return np.minimum(up, down) - img


def _mouth(valley: np.ndarray) -> tuple[float, np.ndarray]:
    """Lip seam height and the two corners [2, 2] in the canonical patch, from its valley map."""
    cx = _MID[0]
    rows = np.arange(valley.shape[0], dtype=np.float64)
    span = slice(int(cx - 0.3 * _IOD), int(cx + 0.3 * _IOD) + 1)
    depth = np.clip(valley[:, span], 0, None).mean(axis=1)  # [H]
    rel = (rows - _MID[1]) / _IOD  # height below the eyes, in eye distances
    prior = np.exp(-0.5 * ((rel - 1.05) / 0.22) ** 2) * (rel > 0.7) * (rel < 1.6)
    score = depth * prior
    y = int(np.argmax(score))
    # a lip seam stands far out of the skin's texture (real photos: 30-60 grey levels, 40x the median row;
    # noise: 8 and 2x)
    typical = float(np.median(depth[(rel > 0.7) & (rel < 1.6)]))
    if depth[y] < _SEAM_MIN or depth[y] < _SEAM_RATIO * (typical + 1.0):
        raise LandmarkError("the mouth could not be located (no dark lip line below the nose)")
    # trace the valley outwards from the centre, following it up or down by at most one pixel per column
    centre_depth = float(np.median(np.clip(valley[y - 1 : y + 2, span], 0, None).max(axis=0)))
    ends = []
    for step in (-1, 1):
        yy, x = float(y), int(cx)
        last = x
        misses = 0
        while 0 < x < valley.shape[1] - 1 and abs(x - cx) < 0.75 * _IOD:
            x += step
            lo, hi = int(yy) - 1, int(yy) + 2
            col = valley[lo:hi, x]
            k = int(np.argmax(col))
            if col[k] >= _CORNER_FADE * centre_depth:
                yy = lo + k
                last, misses = x, 0
            else:
                misses += 1
                if misses > 2:
                    break
        ends.append((last, yy))
    corners = np.array(ends, dtype=np.float64)
    return float(y), corners


def _nose_tip(valley: np.ndarray, seam_y: float, corners: np.ndarray) -> np.ndarray:
    """Nose tip: a tenth of an eye distance above the darkest short valley (the shadow under the nose) between
    the eyes and the lip seam, centred on the mouth."""
    cx = float(corners[:, 0].mean())
    span = slice(int(cx - 0.15 * _IOD), int(cx + 0.15 * _IOD) + 1)
    depth = np.clip(valley[:, span], 0, None).mean(axis=1)
    top, bottom = int(_MID[1] + 0.45 * _IOD), int(seam_y - 0.15 * _IOD)
    if bottom <= top + 2:
        raise LandmarkError("the nose could not be located (the mouth line sits too close to the eyes)")
    y = top + int(np.argmax(depth[top:bottom]))
    return np.array([cx, y - 0.1 * _IOD])


def _chin(rgb: np.ndarray, anchors: FivePoints) -> np.ndarray | None:
    """The chin's lower edge below the mouth centre, or None: the first strong bright-to-dark step (lit chin
    above, shadow or neck below) 0.3-1.2 eye distances below the mouth. The first, not the strongest: a collar
    or a neckline further down is often the stronger edge."""
    m = _to_canonical(anchors.eyes)
    patch = cv2.warpAffine(rgb, m, _PATCH, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    gray = cv2.GaussianBlur(cv2.cvtColor(patch, cv2.COLOR_RGB2GRAY).astype(np.float32), (0, 0), 1.5)
    mouth = _apply(m, anchors.mouth)
    cx, seam = float(mouth[:, 0].mean()), float(mouth[:, 1].mean())
    band = gray[:, max(0, int(cx - 0.2 * _IOD)) : int(cx + 0.2 * _IOD) + 1].mean(axis=1)  # [H]
    k = 3
    step = np.zeros_like(band)
    for y in range(k, len(band) - k):
        step[y] = band[y - k : y].mean() - band[y : y + k].mean()
    lo, hi = max(k + 1, int(seam + 0.3 * _IOD)), min(len(band) - k - 1, int(seam + 1.2 * _IOD))
    for y in range(lo, hi):
        if step[y] >= _CHIN_MIN and step[y] >= step[y - 1] and step[y] > step[y + 1]:
            back = cv2.invertAffineTransform(m)
            # the step between rows y-1 and y: the edge lies half a row above y
            return _apply(back, np.array([[cx, y - 0.5]]))[0]
    return None


def _check_plausible(a: FivePoints) -> None:
    """Refuse point sets no frontal face has (a missed part would otherwise become a warped mesh)."""
    eyes = a.eyes
    v = eyes[1] - eyes[0]
    iod = float(np.hypot(*v))
    if iod < 8:
        raise LandmarkError(f"the eyes are too close together ({iod:.1f} px) to place landmarks")
    ux = v / iod
    uy = np.array([-ux[1], ux[0]])
    mid = eyes.mean(axis=0)

    def local(p: np.ndarray) -> np.ndarray:
        return np.array([(p - mid) @ ux, (p - mid) @ uy]) / iod

    nose, ml, mr = local(a.nose), local(a.mouth[0]), local(a.mouth[1])
    width = mr[0] - ml[0]
    mouth_y = (ml[1] + mr[1]) / 2
    problems = []
    if not 0.45 <= width <= 1.3:
        problems.append(f"mouth width {width:.2f} eye distances")
    if not 0.65 <= mouth_y <= 1.6:
        problems.append(f"mouth {mouth_y:.2f} eye distances below the eyes")
    if not 0.3 <= nose[1] <= mouth_y - 0.1 or abs(nose[0]) > 0.4:
        problems.append(f"nose tip at ({nose[0]:.2f}, {nose[1]:.2f}) eye distances")
    if problems:
        raise LandmarkError("the face parts found do not form a plausible frontal face (" + "; ".join(problems) + ")")
