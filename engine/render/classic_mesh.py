"""The classic renderer's dense control mesh: ~150 points derived from 68 landmarks, driven by the 21 keypoints.

The 21 classic keypoints (``engine.render.classic.keypoints_from_landmarks``) are the motion interface, but one
point per brow or one per cheek cannot express facial action units (inner vs outer brow, cheek raise, nasolabial
region, lip contour). So the renderer places its own control points on the portrait (the 68 landmarks and points
derived from them) and drives each one by a fixed linear combination of keypoint *residuals*:

* the head pose is the affine map ``A`` fitted to the rigid anchor keypoints :data:`ANCHORS` (forehead, jaw
  sides, nose bridge, neck), which classic motion never moves by expression. With ``z = 0`` canonical keypoints
  the posed keypoints are exactly ``A(source) + scale * exp``, so the residual ``kp_d - A(kp_s)`` is the
  expression offset;
* dense point ``j`` is driven to ``A(q_j) + (Wx[j] . res_x, Wy[j] . res_y)``; x and y have separate weights,
  because some keypoint axes mean different things here (the x offset of an upper-lid keypoint is the gaze,
  which moves the eyeball layer, not the lid);
* a ring of head points moves with ``A`` only, and anchors on the crop border stay put, so the background is
  still and the paste-back seam is invisible.

The backward warp is a polyharmonic spline (``phi(r) = r^3`` plus an affine part) through the driven points: it
interpolates every control point exactly, is smooth, and reproduces an affine head motion exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import torch

from engine.keypoints import NUM_KP

ANCHORS: tuple[int, ...] = (0, 7, 8, 9, 10)  # forehead, jaw sides, nose bridge, neck: the head, no expression
# An upper-lid keypoint's y offset is in units of this many inter-ocular distances: that much (down) brings the
# lid onto the lower lid of *this* avatar's eye, whatever its own lid gap, so a blink closes every eye.
LID_REF_GAP = 0.15
# The spline moves the upper lid only this share of the way (the skin around follows a little); the lid itself is
# a layer that slides over the eyeball (engine.render.classic_layers): a spline cannot squeeze an eye shut.
SPLINE_LID_SHARE = 0.3
CREASE_IOD = 0.08  # height of the lid crease control points above the lash line
REG = 1e-7  # diagonal regularisation of the spline system (nearly coincident landmarks stay solvable)

# keypoint indices (see keypoints_from_landmarks)
_BROW = {"L": 1, "R": 2}
_UPPER_LID = {"L": 11, "R": 15}
_LOWER_LID = {"L": 13, "R": 16}
_CHEEK = {"L": 4, "R": 5}
_CORNER = {"L": 6, "R": 12}
_NOSE, _GLABELLA, _UPPER_LIP, _LOWER_LIP, _CHIN, _BELOW_LIP = 3, 18, 14, 17, 19, 20

# landmark indices per side; "L" is the image-left side (iBUG 0-16 runs from the image-left ear)
_BROW_LM = {"L": (17, 18, 19, 20, 21), "R": (26, 25, 24, 23, 22)}  # outer -> inner
_EYE_LM = {"L": (36, 37, 38, 39, 40, 41), "R": (45, 44, 43, 42, 47, 46)}  # outer, upper x2 (out->in), inner, lower
_JAW_CHIN_WEIGHT = (0, 0, 0, 0.1, 0.3, 0.55, 0.8, 0.95, 1.0, 0.95, 0.8, 0.55, 0.3, 0.1, 0, 0, 0)

Drivers = Mapping[int, float]


class MeshSpec(NamedTuple):
    """Source control points and how keypoint residuals drive them (all normalised crop coordinates)."""

    points: np.ndarray  # [M, 2] source positions
    wx: np.ndarray  # [M, 21] x residual weights
    wy: np.ndarray  # [M, 21] y residual weights
    fixed: np.ndarray  # [M] bool: crop-border anchors (do not follow the head)
    # [P, 2] mesh indices of points that sit above one another (brow over lid crease, crease over lash line, lid
    # over lower lid, upper lip over lower lip); the renderer keeps each pair at least ``apart_share`` of its own
    # gap apart (the upper point gives way when ``apart_upper``), so no expression folds the warp
    apart: np.ndarray
    apart_share: np.ndarray  # [P]
    apart_upper: np.ndarray  # [P] bool
    landmark_index: np.ndarray  # [68] mesh index of each landmark
    lid_scale: np.ndarray  # [68] upper-lid landmarks: lid travel per unit of lid keypoint offset (0 elsewhere)
    crease_index: np.ndarray  # [68] upper-lid landmarks: mesh index of the crease point above (-1 elsewhere)


class _Builder:
    def __init__(self) -> None:
        self.points: list[np.ndarray] = []
        self.wx: list[np.ndarray] = []
        self.wy: list[np.ndarray] = []
        self.fixed: list[bool] = []

    def add(self, point: np.ndarray, x: Drivers | None = None, y: Drivers | None = None, fixed: bool = False) -> int:
        rx, ry = np.zeros(NUM_KP), np.zeros(NUM_KP)
        for k, w in (x or {}).items():
            rx[k] += w
        for k, w in (y or {}).items():
            ry[k] += w
        self.points.append(np.asarray(point, dtype=np.float64))
        self.wx.append(rx)
        self.wy.append(ry)
        self.fixed.append(fixed)
        return len(self.points) - 1


def _scaled(drivers: Drivers, s: float) -> dict[int, float]:
    return {k: w * s for k, w in drivers.items()}


def _merge(*parts: Drivers) -> dict[int, float]:
    out: dict[int, float] = {}
    for part in parts:
        for k, w in part.items():
            out[k] = out.get(k, 0.0) + w
    return out


def build_mesh(landmarks: np.ndarray, size: int) -> MeshSpec:
    """Dense control mesh of a portrait from its 68 landmarks ``[68, 2]`` (crop pixels)."""
    lm = np.asarray(landmarks, dtype=np.float64)
    eye_l, eye_r = lm[36:42].mean(axis=0), lm[42:48].mean(axis=0)
    e = float(np.linalg.norm(eye_r - eye_l))  # inter-ocular distance in pixels
    up = np.array([0.0, -e])
    out = np.array([-e, 0.0])  # towards the image-left edge; mirrored for the right side
    b = _Builder()
    index = np.zeros(68, dtype=np.int64)
    lid_scale = np.zeros(68)
    crease = np.full(68, -1, dtype=np.int64)

    # jaw contour: the lower jaw follows the chin
    for j in range(17):
        w = _JAW_CHIN_WEIGHT[j]
        index[j] = b.add(lm[j], {_CHIN: w}, {_CHIN: w})

    glabella_y = {_GLABELLA: 1.0}
    for side in ("L", "R"):
        sgn = 1.0 if side == "L" else -1.0
        kb, ku, kl, kc, km = _BROW[side], _UPPER_LID[side], _LOWER_LID[side], _CHEEK[side], _CORNER[side]
        brow = _BROW_LM[side]
        x_out, x_in = lm[brow[0], 0], lm[brow[-1], 0]

        def brow_rows(x: float, kb: int = kb, x_out: float = x_out, x_in: float = x_in) -> tuple[dict, dict]:
            # outer (t = 0) -> inner (t = 1): y lerps from the extrapolated outer end to the glabella, so the brow
            # keypoint is the brow middle and the glabella its inner end; x pulls the inner end in the most
            t = float(np.clip((x - x_out) / (x_in - x_out), 0.0, 1.0))
            return {kb: 0.4 + 1.2 * t}, {kb: 2.0 * (1.0 - t), _GLABELLA: 2.0 * t - 1.0}

        # brows, and the skin above them (stretches with a raised brow, less and less towards the hairline)
        for i in brow:
            rx, ry = brow_rows(lm[i, 0])
            index[i] = b.add(lm[i], rx, ry)
        for i in (brow[0], brow[2], brow[4]):
            rx, ry = brow_rows(lm[i, 0])
            b.add(lm[i] + 0.22 * up, _scaled(rx, 0.5), _scaled(ry, 0.6))
        rx, ry = brow_rows(lm[brow[2], 0])
        b.add(lm[brow[2]] + 0.6 * up, _scaled(rx, 0.1), _scaled(ry, 0.2))

        # eye: lids on the lash lines, corners nearly still, the lid crease between lid and brow, lower-lid skin
        outer, up1, up2, inner, lo1, lo2 = _EYE_LM[side]
        for i, below in ((up1, lo2), (up2, lo1)):
            lid_scale[i] = float(np.clip((lm[below, 1] - lm[i, 1]) / (LID_REF_GAP * e), 0.2, 2.5))
            index[i] = b.add(lm[i], None, {ku: SPLINE_LID_SHARE * lid_scale[i]})
        for i in (outer, inner):
            index[i] = b.add(lm[i], None, {kl: 0.25, ku: 0.05})
        for i in (lo1, lo2):
            index[i] = b.add(lm[i], {kl: 1.0}, {kl: 1.0})
        for i in (up1, up2):
            _, ry = brow_rows(lm[i, 0])
            crease[i] = b.add(lm[i] + CREASE_IOD * up, None, _merge({ku: 0.4}, _scaled(ry, 0.45)))
        for i in (lo1, lo2):
            b.add(lm[i] - 0.1 * up, {kl: 0.3}, {kl: 0.5, kc: 0.4})
        b.add(lm[outer] + 0.16 * sgn * out, None, {kc: 0.25})  # crow's feet

        # cheek: the keypoint itself, below the eye (malar), and laterally
        cheek = lm[[3 if side == "L" else 13, 31 if side == "L" else 35, lo2]].mean(axis=0)
        b.add(cheek, {kc: 1.0}, {kc: 1.0})
        b.add(lm[lo2] - 0.3 * up, {kc: 0.5}, {kc: 0.7, kl: 0.2})
        jaw_side = lm[2 if side == "L" else 14]
        b.add(jaw_side + 0.35 * (lm[31 if side == "L" else 35] - jaw_side), {kc: 0.4}, {kc: 0.6})

        # nasolabial region and the skin around the mouth corner
        wing, corner, lower_mid = (
            lm[31 if side == "L" else 35],
            lm[48 if side == "L" else 54],
            lm[59 if side == "L" else 55],
        )
        b.add(wing + 0.1 * sgn * out + 0.05 * -up, {km: 0.2}, {km: 0.3, kc: 0.5, _NOSE: 0.3})
        b.add(0.5 * (wing + corner) + 0.14 * sgn * out, {km: 0.55}, {km: 0.55, kc: 0.3})
        b.add(corner + 0.16 * sgn * out, {km: 0.5}, {km: 0.5, _CHIN: 0.15})
        b.add(corner + 0.06 * sgn * out - 0.22 * up, {km: 0.3, _CHIN: 0.2}, {km: 0.3, _CHIN: 0.45})
        b.add(0.5 * (lower_mid + lm[6 if side == "L" else 10]), {_BELOW_LIP: 0.5, km: 0.2},
              {_BELOW_LIP: 0.5, km: 0.25, _CHIN: 0.2})  # fmt: skip

    # glabella and nose: the nose root follows the glabella a little; the wings and tip follow the nose keypoint
    b.add(0.5 * (lm[21] + lm[22]), None, glabella_y)
    b.add(0.5 * (lm[21] + lm[22]) + 0.5 * up, None, {_GLABELLA: 0.2})
    index[27] = b.add(lm[27], None, {_GLABELLA: 0.35, _NOSE: 0.2})
    index[28] = b.add(lm[28], None, {_NOSE: 0.25})
    index[29] = b.add(lm[29], None, {_NOSE: 0.5})
    index[30] = b.add(lm[30], {_NOSE: 0.8}, {_NOSE: 0.8})
    for i, cheek_k in ((31, _CHEEK["L"]), (35, _CHEEK["R"])):
        index[i] = b.add(lm[i], {_NOSE: 0.6}, {_NOSE: 1.0, cheek_k: 0.2})
    for i in (32, 33, 34):
        index[i] = b.add(lm[i], {_NOSE: 0.8}, {_NOSE: 0.9})

    # lips: corners follow the corner keypoints, the middle follows the lip keypoints, blended by centrality
    xc = 0.5 * (lm[48, 0] + lm[54, 0])
    half = max(0.5 * (lm[54, 0] - lm[48, 0]), 1e-3)

    def lip(i: int, middle: Drivers) -> int:
        s = float(np.clip(1.0 - abs(lm[i, 0] - xc) / half, 0.0, 1.0)) ** 0.8
        corner = _CORNER["L"] if lm[i, 0] < xc else _CORNER["R"]
        drivers = _merge({corner: 1.0 - s}, _scaled(middle, s))
        return b.add(lm[i], drivers, drivers)

    index[48] = b.add(lm[48], {_CORNER["L"]: 1.0}, {_CORNER["L"]: 1.0})
    index[60] = b.add(lm[60], {_CORNER["L"]: 1.0}, {_CORNER["L"]: 1.0})
    index[54] = b.add(lm[54], {_CORNER["R"]: 1.0}, {_CORNER["R"]: 1.0})
    index[64] = b.add(lm[64], {_CORNER["R"]: 1.0}, {_CORNER["R"]: 1.0})
    for i in (49, 50, 51, 52, 53, 61, 62, 63):
        index[i] = lip(i, {_UPPER_LIP: 1.0})
    for i in (65, 66, 67):
        index[i] = lip(i, {_LOWER_LIP: 1.0})
    for i in (55, 56, 57, 58, 59):
        index[i] = lip(i, {_LOWER_LIP: 0.55, _BELOW_LIP: 0.45})
    # philtrum and upper-lip skin between nose and lip
    for a, c in ((33, 51), (32, 50), (34, 52)):
        b.add(0.5 * (lm[a] + lm[c]), {_UPPER_LIP: 0.5}, {_UPPER_LIP: 0.45, _NOSE: 0.35})
    b.add(0.5 * (lm[57] + lm[8]), {_BELOW_LIP: 1.0}, {_BELOW_LIP: 1.0})
    b.add(lm[8] - 0.35 * up, {_CHIN: 0.3}, {_CHIN: 0.3})  # under the chin

    # head ring (moves with the head only) and crop-border anchors (never move)
    center = lm.mean(axis=0)
    for a in np.linspace(0.0, 2 * np.pi, 14, endpoint=False):
        b.add(center + np.array([1.2 * e * np.cos(a), 1.55 * e * np.sin(a)]))
    mid = (size - 1) / 2.0
    ring = [(t, -1.0) for t in np.linspace(-1, 1, 9)] + [(t, 1.0) for t in np.linspace(-1, 1, 9)]
    ring += [(-1.0, t) for t in np.linspace(-1, 1, 9)[1:-1]] + [(1.0, t) for t in np.linspace(-1, 1, 9)[1:-1]]
    for px, py in ring:  # just outside the crop, so the border rows are interpolated, not pinned point-wise
        b.add(np.array([mid + 1.02 * mid * px, mid + 1.02 * mid * py]), fixed=True)

    pts = (2.0 * np.stack(b.points) + 1.0) / size - 1.0
    apart: list[tuple[int, int, float, bool]] = []
    for side in ("L", "R"):
        outer, up1, up2, _, lo1, lo2 = _EYE_LM[side]
        apart += [(index[up1], index[lo2], 0.0, True), (index[up2], index[lo1], 0.0, True)]
        apart += [(crease[up1], index[up1], 0.3, True), (crease[up2], index[up2], 0.3, True)]
        brow = _BROW_LM[side]  # outer -> inner, over the outer corner and the two crease points
        apart += [(index[brow[0]], index[outer], 0.4, True)]
        apart += [(index[i], crease[up1], 0.4, True) for i in brow[1:3]]
        apart += [(index[i], crease[up2], 0.4, True) for i in brow[3:5]]
    apart += [(index[u], index[lo], 0.45, False) for u, lo in ((61, 67), (62, 66), (63, 65))]
    return MeshSpec(
        points=pts.astype(np.float64),
        wx=np.stack(b.wx),
        wy=np.stack(b.wy),
        fixed=np.array(b.fixed),
        apart=np.array([(u, lo) for u, lo, _, _ in apart], dtype=np.int64),
        apart_share=np.array([share for _, _, share, _ in apart]),
        apart_upper=np.array([up for _, _, _, up in apart]),
        landmark_index=index,
        lid_scale=lid_scale,
        crease_index=crease,
    )


# --- per-frame math (batched torch) -------------------------------------------------------------------------


def fit_affine(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares 2D affine ``[B, 2, 3]`` with ``dst ~ [src, 1] @ A^T`` from points ``[B, N, 2]``."""
    ones = torch.ones_like(src[..., :1])
    x = torch.cat([src, ones], -1).double()  # [B, N, 3]
    sol = torch.linalg.lstsq(x, dst.double()).solution  # [B, 3, 2]
    return sol.transpose(1, 2)


def apply_affine(a: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``[B, 2, 3]`` affine on ``[B, N, 2]`` points."""
    return points @ a[:, :, :2].transpose(1, 2) + a[:, None, :, 2]


class Spline(NamedTuple):
    centers: torch.Tensor  # [B, M, 2] driven control points
    weights: torch.Tensor  # [B, M, 2]
    affine: torch.Tensor  # [B, 3, 2]


def solve_spline(centers: torch.Tensor, values: torch.Tensor) -> Spline:
    """Polyharmonic (r^3) spline through ``values [B, M, 2]`` at ``centers [B, M, 2]``, solved and returned in
    float64 (control points squeezed together get weights in the thousands: see :func:`eval_spline_grid`)."""
    c = centers.double()
    b, m, _ = c.shape
    # [[K, P], [P^T, 0]] with K = r^3 + REG I and P = [1, x, y], built in place; the squared distances as
    # differences (exactly 0 on the diagonal), cheaper than the matrix-product form at this size
    system = c.new_zeros(b, m + 3, m + 3)
    k = system[:, :m, :m]
    torch.sub(c[:, :, None, 0], c[:, None, :, 0], out=k).square_()
    k.add_((c[:, :, None, 1] - c[:, None, :, 1]).square_())
    k.mul_(k.sqrt()).diagonal(dim1=1, dim2=2).add_(REG)
    system[:, :m, m] = 1.0
    system[:, :m, m + 1 :] = c
    system[:, m, :m] = 1.0
    system[:, m + 1 :, :m] = c.transpose(1, 2)
    rhs = c.new_zeros(b, m + 3, 2)
    rhs[:, :m] = values
    # one system at a time: batched solves fail inside MKL (DLASWP) once torch.set_num_threads has been called
    sol = torch.stack([torch.linalg.solve(system[i], rhs[i]) for i in range(b)])
    return Spline(c, sol[:, :m], sol[:, m:])


def eval_spline_grid(
    spline: Spline, xs: torch.Tensor, ys: torch.Tensor, exact_above: float | None = None
) -> torch.Tensor:
    """Spline values at the points ``(xs[j], ys[i])`` of a grid (``xs [W]``, ``ys [H]``) -> float32 ``[B, 2, H, W]``.

    The renderer only evaluates grids: a squared distance is a column term plus a row term (no matrix product and
    its cancellation), and the ``r^3`` kernel ``[B, M, h, W]`` is built a band of rows at a time, small enough to
    stay in cache for the product with the weights.

    Precision: control points squeezed together (lips pressed shut, a lid on its lower lid) get weights of a few
    thousand with opposite signs, whose ``r^3`` terms cancel far away from them; in float32 that leaves up to ~3 px
    of rounding noise at the crop border, where the warp must be still. ``exact_above``: centers with a weight
    above this are evaluated in float64 (a few dozen at most), the rest in float32."""
    big = None
    if exact_above is not None:
        big = (spline.weights.abs().amax(-1) > exact_above).any(0)  # [M], over the whole batch
        if not bool(big.any()):
            big = None
    if big is None:
        return _eval_grid(spline.centers.float(), spline.weights.float(), spline.affine.float(), xs.float(), ys.float())
    out = _eval_grid(
        spline.centers[:, ~big].float(), spline.weights[:, ~big].float(), spline.affine.float(), xs.float(), ys.float()
    )
    exact = _eval_grid(
        spline.centers[:, big], spline.weights[:, big], torch.zeros_like(spline.affine), xs.double(), ys.double()
    )
    return out.add_(exact.float())


def _eval_grid(
    centers: torch.Tensor, weights: torch.Tensor, affine: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor
) -> torch.Tensor:
    """:func:`eval_spline_grid` in the dtype of its arguments."""
    b, m, _ = centers.shape
    h, w = len(ys), len(xs)
    dx2 = (xs - centers[..., 0:1]).square_()  # [B, M, W]
    dy2 = (ys - centers[..., 1:2]).square_()  # [B, M, H]
    wt = weights.transpose(1, 2)  # [B, 2, M]
    out = torch.empty(b, 2, h, w, dtype=weights.dtype, device=weights.device)
    band = min(h, max(1, _BAND_ELEMENTS // max(1, m * w)))
    d2 = torch.empty(b, m, band, w, dtype=weights.dtype, device=weights.device)  # reused: no allocation per band
    phi = torch.empty_like(d2)
    for r0 in range(0, h, band):
        rows = min(band, h - r0)
        torch.add(dy2[:, :, r0 : r0 + rows, None], dx2[:, :, None, :], out=d2[:, :, :rows])  # [B, M, rows, W]
        torch.sqrt(d2[:, :, :rows], out=phi[:, :, :rows]).mul_(d2[:, :, :rows])  # r^3
        out[:, :, r0 : r0 + rows] = torch.bmm(wt, phi[:, :, :rows].flatten(2)).view(b, 2, rows, w)
    out += (xs * affine[:, 1, :, None])[:, :, None, :]  # the affine part: x ...
    out += (ys * affine[:, 2, :, None] + affine[:, 0, :, None])[..., None]  # ... and y, constant
    return out


_BAND_ELEMENTS = 160_000  # r^3 kernel entries per band of eval_spline_grid (640 kB of float32: a core's L2 cache)
