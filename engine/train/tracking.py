"""Weight-free face tracking for training data: one crop per clip, the 68-point mesh followed by optical flow.

The face is found once (OpenCV's Haar cascade and the engine's template landmarks, :mod:`engine.avatar.face`) on
the first frame that shows one; that frame's crop rectangle (LivePortrait framing) is kept for the whole clip, so
head motion shows as motion inside the crop. Every later frame is registered to that reference frame by pyramidal
Lucas-Kanade flow of each landmark (``cv2.calcOpticalFlowPyrLK``), started from the previous frame's positions and
checked backwards: always against the reference picture, so the track cannot drift. Points that fail the
forward-backward check take the similarity motion of the points that passed. Around the mouth the check would
reject true motion (the opening mouth changes the texture in the window), so there a point fails only when it
lands further than ``max_deform`` eye distances from where the head's similarity motion puts it. A frame where
fewer than ``min_good`` of the points pass is invalid; after ``lost_after`` invalid frames the face is searched
again.

The lips need more care. The inner lip edges are not tracked: an opening mouth replaces the texture there
(teeth, the dark cavity), which pulls flow off the lip; they follow the outer edge above or below them, as lips keep
their thickness. The lower lip itself follows the skin halfway to the chin, found by a one-dimensional vertical
search in the head-aligned frame (Lucas-Kanade slides sideways along the lip's horizontal edges there: tens of
pixels on a smiling mouth), and the chin follows that skin when its own edge is lost (on a dark collar).
Measured on classic renders of ``skimage.data.astronaut()`` with a known motion (``tests/engine/train``): the lower
lip, chin and below-lip keypoints follow the rendered displacement with slopes 0.98, 1.16 and 1.03 (correlations
0.988-0.999), the head's roll and translation with slopes 0.94 and 1.01. A 256 crop with a 21-pixel window
averaged the lips with the still cheeks (slopes 0.3-0.5), and the backward check on the mouth rejected most of
its motion (0.06-0.5).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

import cv2
import numpy as np

from engine.avatar.face import FaceLocator
from engine.avatar.geometry import apply_affine, invert_affine
from engine.avatar.image import AvatarError
from engine.avatar.landmarks import CLASSIC_SCHEMES

# landmarks that move with the head only (eye corners, nose, the upper face contour): the similarity fit's points
STABLE = (0, 1, 2, 14, 15, 16, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 39, 42, 45)
# the jaw, the mouth corners and the lower lip: an opening mouth changes the texture around these, so the backward
# check would reject their true motion. The upper lip keeps the check: the cavity opening below it pulls its
# flow down, and when the check fails it keeps the head's rigid motion, which is what an upper lip mostly does.
MOUTH = (*range(4, 13), 48, 54, *range(55, 60))
# the skin halfway between a lower-lip point and the chin below it: tracked in place of the lower lip, whose own
# window fills with teeth and cavity as the mouth opens (LK then jumps), while the skin below moves with it
LOWER_LIP_SKIN = ((55, 10), (56, 9), (57, 8), (58, 7), (59, 6))  # (lip point, chin point below it)
# inner lip point -> the outer lip point it follows (iBUG order)
INNER_LIP = {60: 48, 61: 50, 62: 51, 63: 52, 64: 54, 65: 56, 66: 57, 67: 58}


class NoFaceError(AvatarError):
    """No face (with landmarks) was found in the frames searched."""


@dataclass(frozen=True)
class TrackerConfig:
    crop_size: int = 384  # side of the working crop (pixels)
    window: int = 15  # Lucas-Kanade window (pixels)
    levels: int = 3  # pyramid levels
    fb_max_px: float = 1.0  # forward-backward error limit (pixels of the working crop), outside the mouth
    max_deform: float = 0.45  # a mouth point further than this (in eye distances) from its rigid position fails
    min_good: float = 0.5  # fraction of points that must pass for a frame to count
    search_frames: int = 75  # frames searched for a face at the start (and after a loss)
    search_every: int = 5  # ... looking at every n-th frame
    lost_after: int = 5  # consecutive invalid frames before the face is searched again

    def __post_init__(self) -> None:
        if self.crop_size < 64 or self.window < 5 or self.levels < 0 or not 0 < self.min_good <= 1:
            raise ValueError(f"invalid tracker config: {self}")
        if self.search_frames < 1 or self.search_every < 1 or self.lost_after < 1 or self.fb_max_px <= 0:
            raise ValueError(f"invalid tracker config: {self}")


class MeshTrack(NamedTuple):
    landmarks: np.ndarray  # [T, 68, 2] float32, working-crop pixels; the last valid value where invalid
    valid: np.ndarray  # [T] bool
    crop_to_image: np.ndarray  # [2, 3] working-crop pixel -> frame pixel (the fixed crop of the clip)
    reference: int  # index of the first reference frame
    method: str  # how the face and its landmarks were found


def fit_similarity(src: np.ndarray, dst: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Least-squares ``dst ≈ s R(theta) src + t`` for ``[N, 2]`` point sets -> ``(s, theta radians, t [2])``."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    var = float((a * a).sum())
    if var <= 1e-12:
        raise ValueError("similarity fit needs points with some extent")
    # complex-number form: b ≈ z a with z = s e^{i theta}
    za = a[:, 0] + 1j * a[:, 1]
    zb = b[:, 0] + 1j * b[:, 1]
    z = (np.conj(za) * zb).sum() / var
    s, theta = float(abs(z)), float(np.angle(z))
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    t = mu_d - s * rot @ mu_s
    return s, theta, t


def apply_similarity(points: np.ndarray, s: float, theta: float, t: np.ndarray) -> np.ndarray:
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    return np.asarray(points, np.float64) @ (s * rot).T + t


class MeshTracker:
    """Tracks the 68-point mesh through a clip (see the module docstring)."""

    def __init__(self, locator: FaceLocator | None = None, config: TrackerConfig | None = None) -> None:
        self.locator = locator if locator is not None else FaceLocator(None)
        self.config = config or TrackerConfig()
        self._criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 30, 0.01)

    def _find(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, str] | None:
        """(landmarks [68, 2] frame pixels, frame -> 512 crop affine, method) of the largest face, or None."""
        try:
            face = self.locator.locate(rgb)
        except AvatarError:
            return None
        if face.landmarks is None or face.landmark_scheme not in CLASSIC_SCHEMES or len(face.landmarks) != 68:
            return None
        points = apply_affine(face.crop_to_image, face.landmarks)
        return points, invert_affine(face.crop_to_image), f"{face.method}+{face.landmark_method}"

    def track(
        self, frames: Iterable[np.ndarray], on_crop: Callable[[int, np.ndarray], None] | None = None
    ) -> MeshTrack:
        """Track ``frames`` (RGB ``[H, W, 3]`` uint8). ``on_crop(i, crop_rgb)`` sees every frame's working crop
        (e.g. for a keypoint extractor on the same crop). Raises :class:`NoFaceError` when no face is found in
        the first ``search_frames`` frames."""
        cfg = self.config
        size = cfg.crop_size
        pending: list[np.ndarray] = []  # frames before the face was found
        to_crop: np.ndarray | None = None
        ref_gray: np.ndarray | None = None
        ref_pts = np.zeros((68, 2), np.float32)
        prev = ref_pts
        method = ""
        landmarks: list[np.ndarray] = []
        valid: list[bool] = []
        reference = -1
        lost = 0
        index = -1
        for index, rgb in enumerate(frames):
            if to_crop is None:
                pending.append(rgb)
                if index % cfg.search_every == 0 and (found := self._find(rgb)) is not None:
                    points, image_to_512, method = found
                    to_crop = self._working(image_to_512)
                    reference = index
                    ref_gray, ref_pts = self._reference(rgb, to_crop, points)
                    prev = ref_pts
                    for j, old in enumerate(pending):
                        if j < reference:  # before the face was found: kept, but not tracked
                            self._emit_crop(on_crop, j, old, to_crop)
                            landmarks.append(ref_pts[:68].copy())
                            valid.append(False)
                    pending = [rgb]
                elif index + 1 >= cfg.search_frames:
                    raise NoFaceError(f"no face with landmarks in the first {index + 1} frames")
                if to_crop is None:
                    continue
                rgb = pending.pop()
            assert ref_gray is not None
            crop = cv2.warpAffine(rgb, to_crop, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            self._emit_crop(on_crop, index, crop, None)
            gray = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)
            pts, ok = self._register(ref_gray, ref_pts, gray, prev)
            if not ok and lost + 1 >= cfg.lost_after and (index - reference) % cfg.search_every == 0:
                found = self._find(rgb)
                if found is not None:
                    new_pts = with_skin(apply_affine(to_crop, found[0]))
                    if (np.abs(new_pts - size / 2) < size / 2).mean() > 0.9:  # the face is inside the fixed crop
                        ref_gray, ref_pts, pts, ok = gray, new_pts, new_pts, True
            lost = 0 if ok else lost + 1
            if ok:
                prev = pts
            landmarks.append(prev[:68].copy())
            valid.append(ok)
        if to_crop is None:
            raise NoFaceError(f"no face with landmarks in the {index + 1} frames of the clip")
        return MeshTrack(np.stack(landmarks), np.asarray(valid, bool), invert_affine(to_crop), reference, method)

    def _working(self, image_to_512: np.ndarray) -> np.ndarray:
        """The frame -> working-crop affine: the 512 crop's, rescaled to ``crop_size``."""
        k = self.config.crop_size / 512.0
        # crop pixel u (512) -> (u + 0.5) * k - 0.5 (working)
        scale = np.array([[k, 0.0, 0.5 * k - 0.5], [0.0, k, 0.5 * k - 0.5], [0.0, 0.0, 1.0]])
        return (scale @ np.vstack([image_to_512, [0.0, 0.0, 1.0]]))[:2]

    def _reference(self, rgb: np.ndarray, to_crop: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        size = self.config.crop_size
        crop = cv2.warpAffine(rgb, to_crop, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        return cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY), with_skin(apply_affine(to_crop, points))

    def _emit_crop(
        self, on_crop: Callable[[int, np.ndarray], None] | None, i: int, rgb: np.ndarray, to_crop: np.ndarray | None
    ) -> None:
        """Hand frame ``i``'s working crop to ``on_crop`` (``to_crop``: cut it from the frame first)."""
        if on_crop is None:
            return
        if to_crop is not None:
            size = self.config.crop_size
            rgb = cv2.warpAffine(rgb, to_crop, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        on_crop(i, rgb)

    def _flow(
        self, img0: np.ndarray, img1: np.ndarray, pts: np.ndarray, guess: np.ndarray, levels: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Lucas-Kanade from ``img0`` to ``img1`` for ``pts [N, 2]`` starting at ``guess`` -> (points, status)."""
        size = self.config.window
        out, status, _ = cv2.calcOpticalFlowPyrLK(
            img0,
            img1,
            np.ascontiguousarray(pts, np.float32).reshape(-1, 1, 2),
            np.ascontiguousarray(guess, np.float32).reshape(-1, 1, 2),
            winSize=(size, size),
            maxLevel=levels,
            criteria=self._criteria,
            flags=cv2.OPTFLOW_USE_INITIAL_FLOW,
        )
        return np.asarray(out, np.float32).reshape(-1, 2), np.asarray(status).reshape(-1)

    def _skin_drop(
        self, ref_gray: np.ndarray, ref_pts: np.ndarray, gray: np.ndarray, sim: tuple[float, float, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Vertical displacement (reference pixels) of each lower-lip skin point and whether it was matched.

        Lucas-Kanade slides sideways along the lip's horizontal edges there (the aperture problem: tens of pixels on
        a smiling mouth), so the skin is found by a one-dimensional search instead: the frame is turned back into
        the reference's pose (the head's similarity), and each skin patch of the reference is matched (normalised
        cross-correlation) at vertical offsets up to ``max_deform`` eye distances, to a fraction of a pixel."""
        s, theta, t = sim
        c, si = np.cos(theta), np.sin(theta)
        forward = np.array([[s * c, -s * si, t[0]], [s * si, s * c, t[1]]])
        size = gray.shape[1], gray.shape[0]
        aligned = cv2.warpAffine(gray, forward, size, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                 borderMode=cv2.BORDER_REPLICATE)  # fmt: skip
        iod = float(np.linalg.norm(ref_pts[42:48].mean(0) - ref_pts[36:42].mean(0)))
        half_w, half_h = max(3, round(0.18 * iod)), max(3, round(0.12 * iod))
        reach = max(2, round(self.config.max_deform * iod))
        skin = ref_pts[68:]
        drop = np.zeros(len(skin))
        ok = np.zeros(len(skin), bool)
        for k, (x, y) in enumerate(skin):
            template = _patch(ref_gray, x, y, half_w, half_h)
            strip = _patch(aligned, x, y, half_w, half_h + reach)
            if template is None or strip is None or float(template.std()) < 1.0:
                continue
            score = cv2.matchTemplate(strip, template, cv2.TM_CCOEFF_NORMED)[:, 0]  # [2 reach + 1]
            best = int(np.argmax(score))
            if score[best] < 0.6:
                continue
            shift = 0.0
            if 0 < best < len(score) - 1:  # parabola through the peak and its neighbours
                a, b, e = score[best - 1], score[best], score[best + 1]
                denom = a - 2 * b + e
                shift = 0.5 * (a - e) / denom if denom < 0 else 0.0
            drop[k], ok[k] = best - reach + shift, True
        return drop, ok

    def _register(
        self, ref_gray: np.ndarray, ref_pts: np.ndarray, gray: np.ndarray, prev: np.ndarray
    ) -> tuple[np.ndarray, bool]:
        """Points of ``gray`` matching ``ref_pts`` (68 landmarks + the lower-lip skin points) in ``ref_gray``,
        and whether the frame counts."""
        cfg = self.config
        n = len(ref_pts)
        mouth = np.zeros(n, bool)
        mouth[list(MOUTH)] = True
        mouth[68:] = True
        derived = np.zeros(n, bool)  # never trusted: set from other points below
        derived[list(INNER_LIP)] = True
        derived[[j for j, _ in LOWER_LIP_SKIN]] = True
        # the head: every other point, with the full pyramid and the backward check
        rest = np.nonzero(~mouth & ~derived)[0]
        fwd_r, st1 = self._flow(ref_gray, gray, ref_pts[rest], prev[rest], cfg.levels)
        back, st2 = self._flow(gray, ref_gray, fwd_r, ref_pts[rest], cfg.levels)
        fwd = prev.astype(np.float32).copy()
        fwd[rest] = fwd_r
        err = np.linalg.norm(back - ref_pts[rest], axis=1)
        good = np.zeros(n, bool)
        good[rest] = (st1 == 1) & (st2 == 1) & (err < cfg.fb_max_px)
        good[rest] &= np.isfinite(fwd[rest]).all(1)
        # the mouth: from last frame's positions with a shallow pyramid (a deep one lets the chin's weak edge
        # lock onto the collar or the hair a hundred pixels away)
        lower = np.nonzero(mouth)[0]
        fwd[lower], st3 = self._flow(ref_gray, gray, ref_pts[lower], prev[lower], min(1, cfg.levels))
        found = np.zeros(n, bool)
        found[lower] = (st3 == 1) & np.isfinite(fwd[lower]).all(1)
        if good[list(STABLE)].sum() < 4 or good[rest].mean() < cfg.min_good:
            return prev, False
        s, theta, t = fit_similarity(ref_pts[good], fwd[good])
        if not 0.5 < s < 2.0:
            return prev, False
        rigid = apply_similarity(ref_pts, s, theta, t)
        iod = float(np.linalg.norm(ref_pts[42:48].mean(0) - ref_pts[36:42].mean(0))) * s
        # the skin under the lower lip: a vertical search in the head-aligned picture (see _skin_drop)
        drop, matched = self._skin_drop(ref_gray, ref_pts, gray, (s, theta, t))
        rot = s * np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        fwd[68:] = rigid[68:] + np.stack([np.zeros_like(drop), drop], 1) @ rot.T
        found[68:] = matched
        near = np.linalg.norm(fwd - rigid, axis=1) < cfg.max_deform * iod
        good[mouth] = found[mouth] & near[mouth]
        out = fwd.copy()
        out[~good] = rigid[~good]
        for k, (j, chin) in enumerate(LOWER_LIP_SKIN):
            skin = out[68 + k] - rigid[68 + k]
            out[j] = rigid[j] + skin
            if not good[chin]:  # a chin edge on a dark collar loses its flow; the skin above it moves alike
                out[chin] = rigid[chin] + skin
        for i, j in INNER_LIP.items():
            out[i] = rigid[i] + (out[j] - rigid[j])
        return out.astype(np.float32), True


def _patch(image: np.ndarray, cx: float, cy: float, half_w: int, half_h: int) -> np.ndarray | None:
    x0, y0 = round(cx) - half_w, round(cy) - half_h
    if x0 < 0 or y0 < 0 or x0 + 2 * half_w + 1 > image.shape[1] or y0 + 2 * half_h + 1 > image.shape[0]:
        return None
    return image[y0 : y0 + 2 * half_h + 1, x0 : x0 + 2 * half_w + 1]


def with_skin(points: np.ndarray) -> np.ndarray:
    """68 landmarks -> ``[68 + 5, 2]``: the landmarks and the lower-lip skin points (:data:`LOWER_LIP_SKIN`)."""
    pts = np.asarray(points, np.float64)
    skin = np.array([(pts[j] + pts[c]) / 2 for j, c in LOWER_LIP_SKIN])
    return np.concatenate([pts, skin]).astype(np.float32)
