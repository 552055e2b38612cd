"""The engine's own default avatar: a portrait drawn here, deterministically, with exact 68-point landmarks.

No downloaded asset: the face is painted with OpenCV from a hand-placed iBUG-style 68-point layout ("engine68":
0-16 jaw from the image-left ear round the chin, 17-21 / 22-26 brows, 27-35 nose, 36-41 / 42-47 eyes starting
at the outer corner of the image-left eye, 48-59 outer lips from the left corner, 60-67 inner lips). Because
the features are drawn *from* the landmarks, the landmarks are exact, which is what classic mode and the
lip-sync instrument need. Drawing happens at 2x and is area-downsampled, so edges are anti-aliased.
"""

from __future__ import annotations

import functools
import hashlib

import cv2
import numpy as np

from engine.avatar.record import Avatar

SIZE = 512
SCHEME = "engine68"
_SS = 2  # supersampling factor of the drawing canvas

Color = tuple[float, float, float]


def default_portrait() -> tuple[np.ndarray, np.ndarray, str]:
    """``(portrait [512, 512, 3] uint8 RGB, landmarks [68, 2] float32 pixel coords, scheme "engine68")``.

    Pixel coordinates follow OpenCV: pixel ``(i, j)`` has its centre at ``x = j, y = i``. The arrays are fresh
    copies of a cached drawing, so callers may modify them.
    """
    image, landmarks = _cached()
    return image.copy(), landmarks.copy(), SCHEME


def default_avatar(name: str = "default") -> Avatar:
    """The default portrait as an :class:`Avatar` whose crop is the whole (already face-aligned) image.

    ``content_hash`` is the sha256 of the raw RGB pixel bytes (there is no original file to hash).
    """
    image, landmarks, scheme = default_portrait()
    digest = hashlib.sha256(image.tobytes()).hexdigest()
    affine = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=np.float64)
    return Avatar(name, digest, image, image.copy(), affine, landmarks, scheme)


@functools.lru_cache(maxsize=1)
def _cached() -> tuple[np.ndarray, np.ndarray]:
    landmarks = default_landmarks()
    return _Painter(landmarks).paint(), landmarks


def default_landmarks() -> np.ndarray:
    """The hand-placed 68-point layout of the default face, ``[68, 2]`` float32 in 512-pixel coordinates."""
    cx = 255.5
    pts = np.zeros((68, 2), dtype=np.float64)
    # jaw: an ellipse through the ears and chin, narrowed towards the chin
    for i in range(17):
        theta = np.deg2rad(186.0 - i * (192.0 / 16.0))
        narrow = 1.0 - 0.22 * max(0.0, np.sin(theta)) ** 3
        pts[i] = (cx + 118.0 * np.cos(theta) * narrow, 246.0 + 160.0 * np.sin(theta))
    left_brow = [(166, 206), (181, 195), (198, 191), (215, 193), (231, 199)]
    for i, (x, y) in enumerate(left_brow):
        pts[17 + i] = (x, y)
        pts[26 - i] = (2 * cx - x, y)
    for i, bridge_y in enumerate((226.0, 246.0, 266.0, 286.0)):
        pts[27 + i] = (cx, bridge_y)
    for i, (dx, y) in enumerate(((-22, 302), (-11, 307), (0, 309), (11, 307), (22, 302))):
        pts[31 + i] = (cx + dx, y)
    left_eye = [(168, 236), (182, 224), (200, 222), (216, 234), (200, 244), (183, 243)]
    for i, (x, y) in enumerate(left_eye):
        pts[36 + i] = (x, y)
    # right eye mirrored: iBUG starts it at the inner corner (42) and goes over the top to the outer one (45)
    mirror = {42: 39, 43: 38, 44: 37, 45: 36, 46: 41, 47: 40}
    for dst, src in mirror.items():
        pts[dst] = (2 * cx - pts[src, 0], pts[src, 1])
    outer = [(-42, 344), (-28, 335), (-12, 330), (0, 333), (12, 330), (28, 335), (42, 344)]
    for i, (dx, y) in enumerate(outer):
        pts[48 + i] = (cx + dx, y)
    lower = [(28, 355), (14, 361), (0, 362), (-14, 361), (-28, 355)]
    for i, (dx, y) in enumerate(lower):
        pts[55 + i] = (cx + dx, y)
    inner = [(-36, 344), (-15, 342), (0, 343), (15, 342), (36, 344), (15, 345), (0, 346), (-15, 345)]
    for i, (dx, y) in enumerate(inner):
        pts[60 + i] = (cx + dx, y)
    return pts.astype(np.float32)


def _smooth_closed(points: np.ndarray, samples: int = 24) -> np.ndarray:
    """A closed Catmull-Rom curve through ``points`` ``[N, 2]`` -> ``[N * samples, 2]``."""
    n = len(points)
    out = []
    t = np.linspace(0.0, 1.0, samples, endpoint=False)[:, None]
    for i in range(n):
        p0, p1, p2, p3 = points[i - 1], points[i], points[(i + 1) % n], points[(i + 2) % n]
        out.append(
            0.5
            * (2 * p1 + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2 + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3)
        )
    return np.concatenate(out, axis=0)


def _smooth_open(points: np.ndarray, samples: int = 16) -> np.ndarray:
    """An open Catmull-Rom curve through ``points`` (end points repeated)."""
    padded = np.concatenate([points[:1], points, points[-1:]], axis=0)
    n = len(points)
    t = np.linspace(0.0, 1.0, samples, endpoint=False)[:, None]
    out = []
    for i in range(1, n):
        p0, p1, p2, p3 = padded[i - 1], padded[i], padded[i + 1], padded[i + 2]
        out.append(
            0.5
            * (2 * p1 + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2 + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3)
        )
    out.append(points[-1:])
    return np.concatenate(out, axis=0)


class _Painter:
    """Paints on a float RGB canvas in [0, 1] at ``_SS`` x resolution; every layer is a soft alpha mask."""

    def __init__(self, landmarks: np.ndarray) -> None:
        self.lm = landmarks.astype(np.float64)
        self.n = SIZE * _SS
        yy, xx = np.mgrid[0 : self.n, 0 : self.n].astype(np.float32)
        self.x = (xx + 0.5) / _SS - 0.5  # canvas pixel centre in 512-pixel coordinates
        self.y = (yy + 0.5) / _SS - 0.5
        self.canvas = np.zeros((self.n, self.n, 3), dtype=np.float32)

    # --- primitives ---

    def mask(self, polygon: np.ndarray, blur: float = 0.0) -> np.ndarray:
        m = np.zeros((self.n, self.n), dtype=np.float32)
        pts = np.round((polygon + 0.5) * _SS * 16 - 8).astype(np.int32)  # 4 fractional bits
        cv2.fillPoly(m, [pts], 1.0, lineType=cv2.LINE_AA, shift=4)
        return self.blur(m, blur)

    def ellipse_mask(self, cx: float, cy: float, ax: float, ay: float, blur: float = 0.0, angle: float = 0.0):
        c, s = np.cos(np.deg2rad(angle)), np.sin(np.deg2rad(angle))
        dx, dy = self.x - cx, self.y - cy
        u, v = (c * dx + s * dy) / ax, (-s * dx + c * dy) / ay
        r = np.sqrt(u * u + v * v)
        edge = max(blur, 0.6) / max(min(ax, ay), 1e-3)
        return np.clip((1.0 - r) / edge + 0.5, 0.0, 1.0).astype(np.float32)

    def polyline_mask(self, points: np.ndarray, width: float, blur: float = 0.0) -> np.ndarray:
        m = np.zeros((self.n, self.n), dtype=np.float32)
        pts = np.round((points + 0.5) * _SS * 16 - 8).astype(np.int32)
        cv2.polylines(m, [pts], False, 1.0, thickness=max(1, round(width * _SS)), lineType=cv2.LINE_AA, shift=4)
        return self.blur(m, blur)

    def blur(self, m: np.ndarray, sigma: float) -> np.ndarray:
        if sigma <= 0:
            return m
        return cv2.GaussianBlur(m, (0, 0), sigma * _SS)

    def layer(self, alpha: np.ndarray, color: np.ndarray | Color) -> None:
        col = np.asarray(color, dtype=np.float32)
        if col.ndim == 1:
            col = col[None, None, :]
        a = alpha[..., None]
        self.canvas = self.canvas * (1.0 - a) + col * a

    def shade(self, alpha: np.ndarray, factor: np.ndarray | float) -> None:
        """Multiply the canvas by ``factor`` where ``alpha`` (darken < 1 < lighten)."""
        f = 1.0 + (np.asarray(factor, dtype=np.float32) - 1.0) * alpha
        self.canvas = self.canvas * f[..., None]

    # --- the portrait ---

    def paint(self) -> np.ndarray:
        self.background()
        self.hair_back()
        self.torso_and_neck()
        self.ears()
        self.face()
        self.hair_front()
        self.brows()
        for outer, inner, top, bottom in ((36, 39, (37, 38), (41, 40)), (45, 42, (44, 43), (46, 47))):
            self.eye(outer, inner, top, bottom)
        self.nose()
        self.lips()
        small = cv2.resize(self.canvas, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
        return np.clip(small * 255.0 + 0.5, 0, 255).astype(np.uint8)

    def background(self) -> None:
        t = (self.y / SIZE)[..., None]
        top, bottom = np.array([0.78, 0.84, 0.90]), np.array([0.55, 0.63, 0.72])
        self.canvas[:] = top * (1 - t) + bottom * t
        r = np.sqrt((self.x - 256) ** 2 + (self.y - 230) ** 2) / 360.0
        self.canvas *= (1.05 - 0.25 * np.clip(r, 0, 1) ** 2)[..., None]

    def hair_back(self) -> None:
        lm = self.lm
        cx = 255.5
        crown = np.array(
            [
                (cx - 150, 330),
                (cx - 158, 250),
                (cx - 148, 160),
                (cx - 105, 95),
                (cx - 40, 68),
                (cx + 40, 68),
                (cx + 105, 95),
                (cx + 148, 160),
                (cx + 158, 250),
                (cx + 150, 330),
                (cx + 120, 370),
                (lm[14, 0], lm[14, 1] - 10),
                (lm[2, 0], lm[2, 1] - 10),
                (cx - 120, 370),
            ]
        )
        m = self.mask(_smooth_closed(crown), blur=1.5)
        self.layer(m, (0.24, 0.15, 0.10))
        # a soft sheen so the hair is not a flat blob
        self.shade(m * self.ellipse_mask(cx - 40, 120, 70, 40, blur=30), 1.35)

    def torso_and_neck(self) -> None:
        cx = 255.5
        shoulders = np.array(
            [
                (cx - 260, 530),
                (cx - 240, 455),
                (cx - 160, 418),
                (cx - 60, 405),
                (cx + 60, 405),
                (cx + 160, 418),
                (cx + 240, 455),
                (cx + 260, 530),
            ]
        )
        m = self.mask(_smooth_open(shoulders, 12), blur=1.0)
        m = np.maximum(m, (self.y > 470).astype(np.float32) * (np.abs(self.x - cx) < 250))
        shirt = self.mask(_smooth_open(shoulders, 12))
        self.layer(m, (0.16, 0.42, 0.46))
        self.shade(shirt * np.clip((self.y - 405) / 110, 0, 1), 0.75)
        neck = np.array(
            [(cx - 52, 330), (cx + 52, 330), (cx + 58, 425), (cx + 30, 445), (cx - 30, 445), (cx - 58, 425)]
        )
        nm = self.mask(_smooth_closed(neck, 8), blur=1.0)
        self.layer(nm, (0.86, 0.64, 0.52))
        # collar (V neckline) over the neck base
        collar = np.array([(cx - 70, 418), (cx, 468), (cx + 70, 418), (cx + 90, 430), (cx, 500), (cx - 90, 430)])
        self.layer(self.mask(collar, blur=0.8), (0.13, 0.35, 0.39))
        # jaw shadow on the neck
        self.shade(nm * self.ellipse_mask(cx, 380, 70, 45, blur=18), 0.72)

    def ears(self) -> None:
        lm = self.lm
        for side, idx in ((-1, 2), (1, 14)):
            ex, ey = lm[idx, 0] + side * 4, lm[idx, 1] - 38
            m = self.ellipse_mask(ex, ey, 17, 32, blur=1.0, angle=side * 10)
            self.layer(m, (0.90, 0.67, 0.55))
            self.shade(self.ellipse_mask(ex + side * 3, ey, 8, 20, blur=4, angle=side * 10), 0.8)

    def face(self) -> None:
        lm = self.lm
        cx = 255.5
        jaw = lm[:17]
        forehead = np.array([(cx + 112, 195), (cx + 90, 135), (cx + 40, 112), (cx - 40, 112), (cx - 90, 135)])
        outline = np.concatenate([jaw, forehead], axis=0)
        m = self.mask(_smooth_closed(outline, 12), blur=1.0)
        self.face_mask = m
        skin = np.array([0.94, 0.73, 0.60], dtype=np.float32)
        self.layer(m, skin)
        # volume: darker towards the outline, a warm light from the upper left
        inside = cv2.distanceTransform((m > 0.5).astype(np.uint8), cv2.DIST_L2, 5) / _SS
        edge = np.clip(1.0 - inside / 45.0, 0.0, 1.0) ** 2
        self.shade(m * edge, 0.80)
        self.shade(m * self.ellipse_mask(cx - 30, 230, 120, 150, blur=60), 1.06)
        for side in (-1, 1):  # cheeks
            self.layer(m * self.ellipse_mask(cx + side * 68, 300, 32, 22, blur=14) * 0.35, (0.93, 0.55, 0.50))
            # eye sockets
            self.shade(m * self.ellipse_mask(cx + side * 58, 230, 40, 22, blur=10), 0.93)
        # under the chin / lower lip
        self.shade(m * self.ellipse_mask(cx, 382, 26, 9, blur=6), 0.9)

    def hair_front(self) -> None:
        cx = 255.5
        fringe = np.array(
            [
                (cx - 150, 250),
                (cx - 150, 160),
                (cx - 105, 98),
                (cx - 30, 76),
                (cx + 50, 80),
                (cx + 115, 105),
                (cx + 152, 165),
                (cx + 150, 250),
                (cx + 128, 230),
                (cx + 118, 170),
                (cx + 85, 140),
                (cx + 20, 132),
                (cx - 45, 150),
                (cx - 95, 160),
                (cx - 122, 190),
                (cx - 130, 240),
            ]
        )
        m = self.mask(_smooth_closed(fringe, 10), blur=1.2)
        self.layer(m, (0.27, 0.17, 0.11))
        self.shade(m * self.ellipse_mask(cx - 35, 100, 80, 22, blur=18, angle=-8), 1.45)
        # a few strands for texture (deterministic)
        rng = np.random.default_rng(7)
        for _ in range(12):
            x0 = cx + rng.uniform(-120, 110)
            y0 = 85 + rng.uniform(0, 30)
            bend = rng.uniform(-25, 25)
            curve = np.array([(x0, y0), (x0 - 15 + bend, y0 + 45), (x0 - 30 + bend * 1.5, y0 + 75)])
            self.shade(m * self.polyline_mask(_smooth_open(curve, 8), 1.2, blur=0.6), 0.78)

    def brows(self) -> None:
        for start in (17, 22):
            pts = self.lm[start : start + 5]
            curve = _smooth_open(pts, 10)
            alpha = np.zeros((self.n, self.n), dtype=np.float32)
            n = len(curve)
            for i in range(n - 1):  # taper: thick at the inner end, thin at the outer tail
                inner_first = start == 22
                frac = i / (n - 1) if inner_first else 1.0 - i / (n - 1)
                seg = self.polyline_mask(curve[i : i + 2], 2.5 + 5.5 * frac)
                alpha = np.maximum(alpha, seg)
            self.layer(self.blur(alpha, 0.8) * 0.92, (0.25, 0.16, 0.11))

    def eye(self, outer: int, inner: int, top: tuple[int, int], bottom: tuple[int, int]) -> None:
        lm = self.lm
        contour = np.array([lm[outer], lm[top[0]], lm[top[1]], lm[inner], lm[bottom[0]], lm[bottom[1]]])
        poly = _smooth_closed(contour, 10)
        m = self.mask(poly, blur=0.5)
        cx = (lm[outer, 0] + lm[inner, 0]) / 2
        cy = (lm[top[0], 1] + lm[bottom[0], 1]) / 2
        self.layer(m, (0.96, 0.94, 0.92))
        self.shade(m * self.ellipse_mask(cx, cy - 6, 26, 8, blur=4), 0.85)  # lid shadow on the sclera
        iris = self.ellipse_mask(cx, cy + 0.5, 11.0, 11.0, blur=0.4) * m
        yy = (self.y - (cy - 11)) / 22.0
        iris_col = np.stack(
            [0.30 - 0.10 * yy, 0.48 - 0.12 * yy, 0.40 - 0.12 * yy], axis=-1
        )  # hazel-green, lighter at the bottom
        self.layer(iris, np.clip(iris_col, 0, 1))
        self.shade(iris * (1 - self.ellipse_mask(cx, cy + 0.5, 9.5, 9.5, blur=0.8)), 0.6)  # limbal ring
        self.layer(self.ellipse_mask(cx, cy + 0.5, 4.6, 4.6, blur=0.4) * m, (0.05, 0.04, 0.04))
        self.layer(self.ellipse_mask(cx - 3.0, cy - 3.0, 2.0, 2.0, blur=0.4) * m, (1.0, 1.0, 1.0))
        upper = _smooth_open(np.array([lm[outer], lm[top[0]], lm[top[1]], lm[inner]]), 10)
        self.layer(self.polyline_mask(upper, 2.6, blur=0.5), (0.12, 0.07, 0.06))  # lash line
        lower = _smooth_open(np.array([lm[inner], lm[bottom[0]], lm[bottom[1]], lm[outer]]), 10)
        self.shade(self.polyline_mask(lower, 1.2, blur=0.6), 0.8)
        crease = upper + np.array([0.0, -7.0])
        self.shade(self.polyline_mask(crease[2:-2], 1.4, blur=1.2), 0.82)

    def nose(self) -> None:
        lm = self.lm
        cx = lm[30, 0]
        for side in (-1, 1):
            ridge = np.array([(cx + side * 9, 240), (cx + side * 11, 270), (cx + side * 17, 296)])
            self.shade(self.polyline_mask(_smooth_open(ridge, 8), 3.0, blur=2.5), 0.9)
            self.shade(self.ellipse_mask(lm[32 if side < 0 else 34, 0] - side * 1, 304, 5.0, 2.8, blur=0.8), 0.45)
            self.shade(self.ellipse_mask(cx + side * 19, 299, 7, 8, blur=4), 0.9)  # alae
        self.shade(self.ellipse_mask(cx, 292, 11, 9, blur=5), 1.08)  # tip highlight
        self.shade(self.ellipse_mask(cx, 308, 16, 4, blur=3), 0.88)  # shadow under the tip

    def lips(self) -> None:
        lm = self.lm
        upper_outline = np.array([*lm[48:55], lm[64], lm[63], lm[62], lm[61], lm[60]])
        lower_outline = np.array([lm[48], lm[60], lm[67], lm[66], lm[65], lm[64], *lm[54:60]])
        up = self.mask(_smooth_closed(upper_outline, 8), blur=0.6)
        lo = self.mask(_smooth_closed(lower_outline, 8), blur=0.6)
        self.layer(up, (0.74, 0.38, 0.38))
        self.layer(lo, (0.80, 0.44, 0.43))
        self.shade(lo * self.ellipse_mask(lm[57, 0] - 4, 352, 14, 4, blur=3), 1.18)  # lower lip gloss
        seam = _smooth_open(np.array([lm[48], lm[61], lm[62], lm[63], lm[54]]), 10)
        self.layer(self.polyline_mask(seam, 1.6, blur=0.5), (0.42, 0.18, 0.18))
        self.shade(self.ellipse_mask(lm[8, 0], lm[57, 1] + 10, 20, 4, blur=3), 0.9)  # shadow under the lip
