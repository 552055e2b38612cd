"""Layers the classic renderer composites over the warped portrait: the eyeballs and the mouth interior.

Both are openings between two lid / lip curves. A warp cannot show what the portrait does not contain (the sclera
above an iris when a lid rises, the inside of a closed mouth) and it squashes what it does contain (an iris under
a closing lid), so inside each *driven* opening the renderer draws a layer instead:

* **eyeball**: the portrait sampled with the head motion only (an eyeball does not stretch with the lids), shifted
  by the gaze; where that reaches outside the portrait's own eye opening, a sclera colour measured on the
  portrait. A closing lid covers the layer instead of squashing it.
* **mouth**: the portrait's own mouth interior, split where its upper teeth end: the upper part rides on the
  upper lip, the lower part on the lower lip (so a photo's own teeth are kept, not painted over). What opens up
  between them is drawn: upper teeth under the upper lip, a hint of lower teeth, a tongue, and a throat that
  darkens away from the lips; everything darkens towards the corners.

When the driven opening equals the portrait's, both layers reproduce the portrait exactly. Curves are in pixel
coordinates of the output; ``u`` runs across an opening from -1 (left corner) to 1 (right corner).

Cost: a layer covers a window of a few thousand pixels, so each tensor operation costs its dispatch more than its
arithmetic. So the windows of one avatar (both eyes, every frame of a batch) go through one set of operations
(``[N, h, w]``, padded to the largest), the curves (a few dozen points) are numpy, the portrait's own openings are
measured once in ``prepare`` (:class:`LidSource`, :class:`MouthSource`), a window's coordinates in an opening's
frame are one outer sum of a row and a column term, and the soft masks of a layer go through one smoothstep chain.
A layer reads nothing of the warped frame: it returns :class:`Blend` records that the renderer applies in order.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

LUMA = (0.299, 0.587, 0.114)
EYE_EDGE_PX = 0.7  # half width of the soft edge of an eye opening
MOUTH_EDGE_PX = 0.9
LASH_PX = 2.2  # the eyeball texture starts this far inside the portrait's lash lines (clear of the lashes)
# The upper-lid layer covers this far below its lash line when the lid is where the portrait has it (so the
# eyeball texture only shows where it is the portrait: LASH_PX + 2 soft edges), and only the lashes themselves
# (LID_MOVING_PX) once the lid moves: below them the eyeball shows, not a strip of the old eye dragged along.
LID_REST_PX = 3.8
LID_MOVING_PX = 1.6
BALL_BOTTOM_PX = 3.8  # ... and to this far above the driven lower lid (no layer covers the lower lid)
TEETH_IVORY = (0.93, 0.91, 0.85)
THROAT = (0.13, 0.04, 0.045)
TONGUE = (0.66, 0.30, 0.31)
# tooth boundaries across the opening (|u|): incisors, lateral incisors, canines, premolars
TOOTH_EDGES = (0.0, 0.19, 0.36, 0.52, 0.66)

# landmark lists, left corner -> right corner, upper then lower curve
LEFT_EYE = ((36, 37, 38, 39), (36, 41, 40, 39))
RIGHT_EYE = ((42, 43, 44, 45), (42, 47, 46, 45))
INNER_MOUTH = ((60, 61, 62, 63, 64), (60, 67, 66, 65, 64))
LOWER_LIP = ((60, 67, 66, 65, 64), (48, 59, 58, 57, 56, 55, 54))  # inner edge, outer edge (left -> right)

Box = tuple[int, int, int, int]  # a window x0, y0, x1, y1 of an image (pixels, ends exclusive)
Knots = tuple[np.ndarray, np.ndarray]  # a curve in an opening's frame: u (ascending) and v at each knot


class Frame(NamedTuple):
    """An opening's own frame (pixels): ``u`` runs from -1 at the left to 1 at the right corner of its upper
    curve, ``v`` is the offset along ``ey`` (downwards)."""

    center: np.ndarray  # [2]
    ex: np.ndarray  # [2] towards the right corner
    ey: np.ndarray  # [2] perpendicular, downwards
    half: float  # half width, corner to corner
    to_uv: np.ndarray  # [2 (x, y), 2 (u, v)]: (point - center) @ to_uv = (u, v)
    from_uv: np.ndarray  # [2 (u, v), 2 (x, y)]: center + (u, v) @ from_uv = point


@functools.cache
def _densify_matrix(n: int, samples: int = 6) -> np.ndarray:
    """``[(n - 1) * samples + 1, n]``: an open uniform Catmull-Rom curve through ``n`` points (ends repeated),
    ``samples`` points per segment and the last point, is this linear map of the points."""
    t = np.linspace(0.0, 1.0, samples + 1)[:-1, None]  # [S, 1]
    # weights of p0..p3 for the segment p1 -> p2
    basis = 0.5 * np.concatenate(
        [-t + 2 * t**2 - t**3, 2 - 5 * t**2 + 3 * t**3, t + 4 * t**2 - 3 * t**3, -(t**2) + t**3], 1
    )
    m = np.zeros(((n - 1) * samples + 1, n))
    for seg in range(n - 1):
        for k, src in enumerate((seg - 1, seg, seg + 1, seg + 2)):
            m[seg * samples : (seg + 1) * samples, min(max(src, 0), n - 1)] += basis[:, k]
    m[-1, -1] = 1.0
    return m


def opening_frame(upper: np.ndarray) -> Frame:
    """The frame of an opening whose upper curve is ``upper [N, 2]`` (pixels, left corner -> right corner)."""
    left, right = upper[0], upper[-1]
    d = right - left
    half = max(float(np.hypot(d[0], d[1])), 1e-3) / 2
    ex = d / (2 * half)
    ey = np.array([-ex[1], ex[0]])
    to_uv = np.array([[ex[0] / half, ey[0]], [ex[1] / half, ey[1]]])
    return Frame((left + right) / 2, ex, ey, half, to_uv, np.array([ex * half, ey]))


def knots(curve: np.ndarray, frame: Frame) -> Knots:
    """``curve [N, 2]`` (pixels, left corner -> right corner) densified and put in ``frame``."""
    uv = (_densify_matrix(len(curve)) @ curve - frame.center) @ frame.to_uv
    order = np.argsort(uv[:, 0], kind="stable")
    return uv[order, 0], uv[order, 1]


def _tensor(a: np.ndarray, device: torch.device) -> Tensor:
    """float32 tensor of ``a`` on ``device`` (from a float32 array: ``as_tensor`` with a dtype costs a copy more)."""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)


@functools.cache
def _k(value: float) -> Tensor:
    """``value`` as a 0-dim float32 tensor. An op with a Python float converts the float to a tensor each time
    (a copy, about as costly as the op itself on a window); with one of these it does not. Constants only."""
    return torch.tensor(value, dtype=torch.float32)


def per_window(device: torch.device, *columns: Sequence[float] | np.ndarray) -> tuple[Tensor, ...]:
    """Per-window parameters (one value per window each) as ``[N, 1, 1]`` tensors, converted at once."""
    return _tensor(np.array(columns, dtype=np.float64), device)[..., None, None].unbind(0)


def _interp(curves: Sequence[Knots], x: Tensor) -> Tensor:
    """Piecewise-linear ``v(u)`` of ``curves[n]`` at ``u = x[n]`` (``x [N, H, W]``), clamped at the ends."""
    if x.device.type == "cpu":
        # numpy's interp is one serial pass; the torch version is a handful of ops that each wake the thread pool
        xn, out = x.numpy(), np.empty(x.shape, dtype=np.float32)
        for n, (xk, yk) in enumerate(curves):
            out[n] = np.interp(xn[n], xk, yk)
        return torch.from_numpy(out)
    rows = []
    for n, (xk, yk) in enumerate(curves):
        xt, yt = _tensor(xk, x.device), _tensor(yk, x.device)
        idx = torch.searchsorted(xt, x[n].contiguous()).clamp(1, len(xk) - 1)
        x0, x1, y0, y1 = xt[idx - 1], xt[idx], yt[idx - 1], yt[idx]
        t = ((x[n] - x0) / (x1 - x0).clamp_min(1e-6)).clamp(0.0, 1.0)
        rows.append(y0 + t * (y1 - y0))
    return torch.stack(rows)


class Windows(NamedTuple):
    """N windows of one size ``h x w`` at their own places (each from its box's top left corner; the box, where
    a layer draws, may be smaller)."""

    boxes: list[Box]
    h: int
    w: int

    @staticmethod
    def around(boxes: Sequence[Box]) -> Windows:
        return Windows(list(boxes), max(y1 - y0 for _, y0, _, y1 in boxes), max(x1 - x0 for x0, _, x1, _ in boxes))

    def axes(self) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates of the windows' columns ``[N, w]`` and rows ``[N, h]``."""
        origin = np.array(self.boxes, dtype=np.float64)
        return origin[:, :1] + np.arange(self.w), origin[:, 1:2] + np.arange(self.h)


def window_uv(frames: Sequence[Frame], windows: Windows, device: torch.device) -> tuple[Tensor, Tensor]:
    """Each window's pixel centres in its frame: ``(u, v)``, ``[N, h, w]`` each (one outer sum of a row and a
    column term: both are linear in the pixel position)."""
    origin = np.array(windows.boxes, dtype=np.float64)[:, :2] - np.array([f.center for f in frames])  # [N, 2]
    to_uv = np.array([f.to_uv for f in frames])  # [N, 2, 2]
    cols = (origin[:, :1] + np.arange(windows.w))[..., None] * to_uv[:, None, 0]  # [N, w, 2 (u, v)]
    rows = (origin[:, 1:] + np.arange(windows.h))[..., None] * to_uv[:, None, 1]  # [N, h, 2]
    uv = _tensor(rows.transpose(2, 0, 1)[..., None], device) + _tensor(cols.transpose(2, 0, 1)[:, :, None], device)
    return uv[0], uv[1]  # [2, N, h, w]


def affine_grid(m: np.ndarray, windows: Windows, size: int, device: torch.device) -> Tensor:
    """grid_sample coordinates ``[N, h, w, 2]`` (``size`` px image, align_corners=False) of the windows' pixels
    mapped by ``m [N, 2, 3]`` (window image px -> sampled image px)."""
    k = 2.0 / size
    xs, ys = windows.axes()
    cols = k * xs[..., None] * m[:, None, :, 0]  # [N, w, 2]
    rows = k * (ys[..., None] * m[:, None, :, 1] + m[:, None, :, 2]) + (1.0 / size - 1.0)  # [N, h, 2]
    return _tensor(rows[:, :, None], device) + _tensor(cols[:, None], device)


def frame_grid(frames: Sequence[Frame], u: Tensor, v: Tensor, size: int) -> Tensor:
    """grid_sample coordinates ``[N, h, w, 2]`` of the points ``center + u * half * ex + v * ey`` of each window's
    ``frames[n]`` (``u, v [N, h, w]``) in a ``size`` px image."""
    k = 2.0 / size
    a = _tensor(k * np.array([f.from_uv for f in frames]), u.device)[:, :, None, None]  # [N, 2 (u, v), 1, 1, 2]
    b = _tensor(k * np.array([f.center for f in frames]) + (1.0 / size - 1.0), u.device)[:, None, None]  # [N, 1, 1, 2]
    return torch.addcmul(b, u[..., None], a[:, 0]).addcmul_(v[..., None], a[:, 1])  # (a tiny bmm costs more)


def sample(image: Tensor, grid: Tensor) -> Tensor:
    """``image [C, S, S]`` at grid_sample coordinates ``grid [N, h, w, 2]`` -> ``[C, N, h, w]`` (one call)."""
    n, h, w, _ = grid.shape
    out = F.grid_sample(
        image[None], grid.view(1, n * h, w, 2), mode="bilinear", padding_mode="border", align_corners=False
    )
    return out.view(image.shape[0], n, h, w)


def _smooth_(t: Tensor) -> Tensor:
    """Smoothstep of ``t`` clamped to [0, 1] (clamps ``t`` in place: pass a temporary)."""
    t.clamp_(0.0, 1.0)
    return t.mul(_k(-2.0)).add_(_k(3.0)).mul_(t).mul_(t)


def _steps(n: int, like: Tensor) -> Tensor:
    """An empty ``[n, *like.shape]`` for the arguments of :func:`_smooth_` that go through it at once: one chain of
    window ops for several soft masks instead of one each. A ramp of half width ``w`` over ``x`` (0 below ``-w``,
    1 above ``w``, exactly, unlike a sigmoid) is the smoothstep of ``x / (2 w) + 0.5``."""
    return torch.empty((n, *like.shape), dtype=like.dtype, device=like.device)


def _color(rgb: tuple[float, float, float] | Tensor, like: Tensor) -> Tensor:
    return torch.as_tensor(rgb, dtype=like.dtype, device=like.device).reshape(3, 1, 1)


@functools.cache
def _tooth_edges(device: torch.device) -> Tensor:
    return torch.tensor(TOOTH_EDGES, dtype=torch.float32, device=device).reshape(-1, 1, 1, 1)


def _half_disc(u2: Tensor, reach: float) -> Tensor:
    """``sqrt(1 - u^2 / reach^2)`` inside ``|u| < reach``, 0 outside (``u2 = u^2``): the profile of a row of teeth
    or a tongue."""
    return torch.add(_k(1.0), u2, alpha=-1.0 / reach**2).clamp_min_(0.0).sqrt_()


# --- prepare time: what the portrait's own openings contain ---------------------------------------------------


class EyeSource(NamedTuple):
    # [4, S, S]: the portrait, with the eye surroundings (from LASH_PX inside the lash lines outwards) replaced by
    # the sclera colour measured in that eye; channel 3 is 1 where the portrait itself shows
    texture: Tensor


class LidSource(NamedTuple):
    """The portrait's upper lid of one eye, in the frame of its lash line's corners: crease and lash line."""

    frame: Frame
    crease: Knots
    lash: Knots


class MouthSource(NamedTuple):
    split: np.ndarray  # [K] fraction of the opening height (from the top) that belongs to the upper lip, at U_SPLIT
    lip: Tensor  # [3] lip colour
    light: float  # brightness scale for drawn teeth (the portrait's skin luma relative to a typical one)
    frame: Frame  # the portrait's mouth opening (inner lip corners 60 and 64)
    top: Knots  # inner edge of the upper lip
    bottom: Knots  # inner edge of the lower lip
    lip_outer: Knots  # outer edge of the lower lip


U_SPLIT = np.linspace(-1.0, 1.0, 33)


def _box(points: np.ndarray, margin: float, size: int) -> Box:
    lo, hi = points.min(0) - margin, points.max(0) + margin
    return (max(0, int(lo[0])), max(0, int(lo[1])), min(size, int(hi[0]) + 2), min(size, int(hi[1]) + 2))


def _inside(upper: np.ndarray, lower: np.ndarray, box: Box, edge: float, grow: float, device: torch.device) -> Tensor:
    """Soft mask ``[H, W]`` of the window ``box`` inside the opening between ``upper`` and ``lower`` (pixels, left
    corner -> right corner), grown by ``grow`` pixels."""
    frame = opening_frame(upper)
    u, v = window_uv([frame], Windows.around([box]), device)
    below_top = v - _interp([knots(upper, frame)], u)
    above_bottom = _interp([knots(lower, frame)], u).sub_(v)
    k = 0.5 / edge
    corner, neg_half = per_window(device, [0.5 + (frame.half + grow) * k], [-frame.half * k])
    t = _steps(3, u)
    torch.addcmul(corner, u.abs(), neg_half, out=t[0])  # the corners close it: (1 - |u|) * half
    torch.add(_k(0.5 + grow * k), below_top, alpha=k, out=t[1])
    torch.add(_k(0.5 + grow * k), above_bottom, alpha=k, out=t[2])
    return _smooth_(t).prod(0)[0]


def eye_source(portrait: Tensor, landmarks: np.ndarray, iod: float) -> EyeSource:
    """The eyeball texture of a portrait (``portrait [3, S, S]``, ``landmarks [68, 2]`` pixels, ``iod`` pixels)."""
    size = portrait.shape[-1]
    texture = torch.cat([portrait, torch.ones_like(portrait[:1])])
    for upper, lower in (LEFT_EYE, RIGHT_EYE):
        box = _box(landmarks[list(upper) + list(lower)], 0.4 * iod, size)
        m = _inside(landmarks[list(upper)], landmarks[list(lower)], box, EYE_EDGE_PX, -LASH_PX, portrait.device)
        x0, y0, x1, y1 = box
        rgb = portrait[:, y0:y1, x0:x1]
        luma = (rgb * _color(LUMA, rgb)).sum(0)
        inside = m > 0.99
        if int(inside.sum()) >= 4:
            # the sclera: the bright part of the opening, but not its catchlight
            lo, hi = torch.quantile(luma[inside], 0.55), torch.quantile(luma[inside], 0.9)
            sclera = rgb[:, inside & (luma >= lo) & (luma <= hi)].mean(dim=1)
        else:
            sclera = torch.tensor([0.85, 0.83, 0.8])
        texture[:3, y0:y1, x0:x1] = rgb * m + sclera.reshape(3, 1, 1) * (1 - m)
        texture[3, y0:y1, x0:x1] = m
    return EyeSource(texture)


def lid_source(curves: EyeCurves) -> LidSource:
    """The portrait's upper lid of one eye (its curves from :func:`eye_curves`)."""
    frame = opening_frame(curves.crease)  # the crease ends at the lash line's corners
    return LidSource(frame, knots(curves.crease, frame), knots(curves.lash, frame))


def _teeth_split(col: Tensor) -> Tensor:
    """Columns ``[3, K, N]`` sampled top (upper lip) -> bottom (lower lip) across an open mouth -> the fraction
    ``[K]`` of each column that belongs to the upper teeth (NaN where a column does not start with teeth)."""
    luma = (col * _color(LUMA, col)).sum(0)  # [K, N]
    sat = col.max(0).values - col.min(0).values
    lo, hi = torch.quantile(luma, 0.1), torch.quantile(luma, 0.9)
    teeth = ((luma - lo) / (hi - lo).clamp_min(0.05) > 0.5) & (sat < 0.35)
    n = teeth.shape[1]
    out = torch.full((teeth.shape[0],), float("nan"))
    for k, run in enumerate(teeth.tolist()):
        if not any(run[: max(2, n // 3)]):
            continue
        end, misses = run.index(True), 0
        while end < n and misses <= 1:  # a one-sample gap (a dark seam between teeth) does not end the run
            misses = 0 if run[end] else misses + 1
            end += 1
        out[k] = min(1.0, (end - misses) / (n - 1))
    return out


def mouth_source(portrait: Tensor, landmarks: np.ndarray, iod: float) -> MouthSource:
    """Where the portrait's upper teeth end across its mouth opening, its lip colour and skin brightness, and the
    geometry of its lips (``landmarks [68, 2]`` pixels, ``iod`` pixels)."""
    size = portrait.shape[-1]
    upper, lower = landmarks[list(INNER_MOUTH[0])], landmarks[list(INNER_MOUTH[1])]
    frame = opening_frame(upper)
    top_k, bot_k = knots(upper, frame), knots(lower, frame)
    u = U_SPLIT
    top, bottom = np.interp(u, *top_k), np.interp(u, *bot_k)
    split = np.full_like(u, 0.5)
    if float((bottom - top).max()) > 0.03 * iod:
        # an open mouth: the upper teeth are the bright run that starts at the upper lip; a smooth curve fitted
        # through the columns that show it (a few odd columns must not tear the teeth apart)
        v = np.linspace(0.0, 1.0, 33)
        ly = top[:, None] + (bottom - top)[:, None] * v[None]  # [K, 33]
        px = frame.center + (u[:, None, None] * frame.half) * frame.ex + ly[..., None] * frame.ey  # [K, 33, 2]
        grid = _tensor((2.0 * px + 1.0) / size - 1.0, portrait.device)[None]  # [1, K, 33, 2]
        found = _teeth_split(sample(portrait, grid)[:, 0]).numpy()
        ok = ~np.isnan(found) & (np.abs(u) < 0.85)
        if int(ok.sum()) >= 5:
            coef = np.polyfit(u[ok], found[ok], 2)
            split = np.clip(np.polyval(coef, u), 0.3, 1.0)
    box = _box(landmarks[48:68], 2.0, size)
    x0, y0, x1, y1 = box
    outer_up = landmarks[[48, 49, 50, 51, 52, 53, 54]]
    outer_lo = landmarks[list(LOWER_LIP[1])]
    dev = portrait.device
    lips = _inside(outer_up, outer_lo, box, 1.0, 0.0, dev) * (1 - _inside(upper, lower, box, 1.0, 0.0, dev))
    weight = lips.flatten()
    lip = (portrait[:, y0:y1, x0:x1].flatten(1) * weight).sum(1) / weight.sum().clamp_min(1e-6)
    # skin brightness around the nose, relative to a typical lit face: drawn teeth are lit like the face
    luma_img = (portrait * _color(LUMA, portrait)).sum(0)
    cheek = landmarks[[29, 31, 35]].mean(0)
    r = int(max(2, round(0.08 * iod)))
    cx, cy = int(np.round(cheek[0])), int(np.round(cheek[1]))
    patch = luma_img[max(0, cy - r) : cy + r + 1, max(0, cx - r) : cx + r + 1]
    light = float(np.clip(float(patch.mean()) / 0.68, 0.55, 1.0)) if patch.numel() else 1.0
    return MouthSource(split, lip, light, frame, top_k, bot_k, knots(outer_lo, frame))


# --- per frame ------------------------------------------------------------------------------------------------


class EyeCurves(NamedTuple):
    """One eye's curves, left corner -> right corner, pixels ``[4, 2]`` each."""

    lash: np.ndarray  # upper lash line (corner, lid, lid, corner)
    lower: np.ndarray  # lower lid
    crease: np.ndarray  # lid crease (corner, crease, crease, corner)


def eye_curves(landmarks: np.ndarray, creases: np.ndarray, eye: int) -> EyeCurves:
    """``landmarks [68, 2]`` and the crease points above the two upper-lid landmarks ``[2, 2]`` of ``eye``."""
    upper, lower = (LEFT_EYE, RIGHT_EYE)[eye]
    lash = landmarks[list(upper)]
    return EyeCurves(lash, landmarks[list(lower)], np.stack([lash[0], creases[0], creases[1], lash[-1]]))


class Blend(NamedTuple):
    """A layer over one window of one frame: ``out[frame, :, y0:y1, x0:x1].lerp_(layer, alpha)``."""

    frame: int
    box: Box
    layer: Tensor  # [3, h, w]
    alpha: Tensor  # [h, w]


class EyeJob(NamedTuple):
    """One eye of one frame for :func:`eye_layers`."""

    frame: int  # index of the frame in the batch
    box: Box  # the window it draws, output pixels
    driven: EyeCurves  # the driven curves, output pixels
    lid: LidSource  # the portrait's upper lid of this eye
    to_source: np.ndarray  # [2, 3] output px -> portrait px, head motion only
    gaze_px: float  # eyeball shift to the right, output pixels
    lid_travel_px: float  # how far the lid moved from where the portrait has it


def eye_layers(portrait: Tensor, source: EyeSource, jobs: Sequence[EyeJob]) -> list[Blend]:
    """The eyes of one avatar (``portrait [3, S, S]``, its eyeball ``source``), each job in its window: blends to
    apply in order.

    Two layers: the eyeball (the portrait moved with the head only, ``to_source`` output px -> portrait px, shifted
    right by ``gaze_px``), shown a little inside the driven lids; over it the upper lid, the skin between crease
    and lash line of the portrait laid between the driven crease and lash line (translated near the lashes,
    stretched or compressed above), clipped at the driven lower lid. All eyes are computed in one set of window
    operations; none of it reads the warped frame, which only the blends do."""
    if not jobs:
        return []
    size, dev = portrait.shape[-1], portrait.device
    win = Windows.around([j.box for j in jobs])
    # one frame for the opening (lash line over lower lid) and the lid (crease over lash line): all three curves
    # run between the eye corners
    frames = [opening_frame(j.driven.lash) for j in jobs]
    u, v = window_uv(frames, win, dev)  # [N, h, w]
    au = u.abs()
    lash = _interp([knots(j.driven.lash, f) for j, f in zip(jobs, frames, strict=True)], u)
    below_lash = v - lash
    above_lower = _interp([knots(j.driven.lower, f) for j, f in zip(jobs, frames, strict=True)], u).sub_(v)
    # the lid layer reaches `reach` below the lash line; the eyeball starts 2 soft edges above that, so no strip
    # of the warp shows between them
    reach = np.array([j.lid_travel_px for j in jobs])
    reach = LID_MOVING_PX + (LID_REST_PX - LID_MOVING_PX) * np.exp(-((reach / 1.5) ** 2))
    half, k = np.array([f.half for f in frames]), 0.5 / EYE_EDGE_PX
    neg_half, ball_corner, ball_top, lid_reach, lid_corner, shade_t = per_window(
        dev,
        -half * k,
        0.5 + (half + 2 * EYE_EDGE_PX - reach) * k,
        0.5 + (2 * EYE_EDGE_PX - reach) * k,
        0.5 + reach * k,
        0.5 + half * k,
        1.0 / (0.35 * np.maximum(half, 1.0)),
    )
    t = _steps(3, u)  # the eyeball's opening: the corners, below the lid layer, above the lower lid
    torch.addcmul(ball_corner, au, neg_half, out=t[0])
    torch.add(ball_top, below_lash, alpha=k, out=t[1])
    torch.add(_k(0.5 - BALL_BOTTOM_PX * k), above_lower, alpha=k, out=t[2])
    alpha = _smooth_(t).prod(0)
    shown = [float(alpha[n, : y1 - y0, : x1 - x0].max()) > 1e-3 for n, (x0, y0, x1, y1) in enumerate(win.boxes)]
    ball = None
    if any(shown):
        shift = np.stack([j.to_source for j in jobs])
        shift[:, :, 2] -= shift[:, :, 0] * np.array([j.gaze_px for j in jobs])[:, None]  # eyeball at (x - gaze, y)
        tex = sample(source.texture, affine_grid(shift, win, size, dev))  # [4, N, h, w]
        # newly shown sclera sits in the shadow of the upper lid
        shade = _smooth_(below_lash * shade_t).mul_(_k(0.4)).add_(_k(0.6))
        ball = tex[:3] * torch.addcmul(shade, tex[3], _k(1.0) - shade)  # the portrait's own eyeball: unshaded

    crease = _interp([knots(j.driven.crease, f) for j, f in zip(jobs, frames, strict=True)], u)
    s_lash, s_crease = _interp([j.lid.lash for j in jobs], u), _interp([j.lid.crease for j in jobs], u)
    dd, ds = (lash - crease).clamp_min_(0.5), (s_lash - s_crease).clamp_min_(0.5)
    dist = lash.sub_(v)  # above the lash line
    keep = torch.minimum(dd, ds).mul_(_k(0.35))  # lashes and lid margin keep their size
    # beyond `keep` from the lashes the portrait's lid is stretched or compressed to the driven one
    excess = (dist - keep).clamp_min_(0.0)
    f = torch.addcmul(dist, excess, (ds - keep).div_((dd - keep).clamp_min_(1e-3)).sub_(_k(1.0)))
    skin = sample(portrait, frame_grid([j.lid.frame for j in jobs], u, s_lash.sub_(f), size))  # [3, N, h, w]
    t = _steps(4, u)
    torch.div(v.sub_(crease), dd.mul_(_k(0.5)), out=t[0])  # fades into the warp towards the crease
    torch.add(lid_reach, dist, alpha=k, out=t[1])  # reaches `reach` below the lashes
    torch.add(_k(0.5), above_lower, alpha=k, out=t[2])  # never over the lower lid
    torch.addcmul(lid_corner, au, neg_half, out=t[3])  # the corners
    a_lid = _smooth_(t).prod(0)
    blends = []
    for n, (j, (x0, y0, x1, y1)) in enumerate(zip(jobs, win.boxes, strict=True)):
        h, w = y1 - y0, x1 - x0
        if shown[n] and ball is not None:
            blends.append(Blend(j.frame, j.box, ball[:, n, :h, :w], alpha[n, :h, :w]))
        blends.append(Blend(j.frame, j.box, skin[:, n, :h, :w], a_lid[n, :h, :w]))
    return blends


class MouthJob(NamedTuple):
    """One mouth of one frame for :func:`mouth_layers` and :func:`lower_lip_layers`."""

    frame: int  # index of the frame in the batch
    box: Box  # the window it draws, output pixels
    driven: np.ndarray  # [68, 2] driven landmarks, output pixels
    scale: float  # portrait pixels per output pixel
    iod: float  # driven inter-ocular distance, output pixels
    strength: float = 1.0  # lower_lip_layers: how far the lower lip layer covers the warp, [0, 1]


class Opening(NamedTuple):
    """An opening between two driven curves in each job's window (``[N, h, w]`` per tensor)."""

    windows: Windows
    frames: list[Frame]  # one per job, from its upper curve
    u: Tensor  # along the opening, -1 at the left corner, 1 at the right
    v: Tensor  # across it, pixels below the corners' line
    top: Tensor  # v of the upper curve at each u
    bottom: Tensor  # v of the lower curve at each u


def _opening(jobs: Sequence[Any], curves: tuple[Sequence[int], Sequence[int]], device: torch.device) -> Opening:
    """The jobs' windows and the opening between their driven ``curves`` (upper, lower landmark indices)."""
    win = Windows.around([j.box for j in jobs])
    uppers = [j.driven[list(curves[0])] for j in jobs]
    frames = [opening_frame(upper) for upper in uppers]
    u, v = window_uv(frames, win, device)
    top = _interp([knots(upper, f) for upper, f in zip(uppers, frames, strict=True)], u)
    bottom = _interp([knots(j.driven[list(curves[1])], f) for j, f in zip(jobs, frames, strict=True)], u)
    return Opening(win, frames, u, v, top, bottom)


def mouth_layers(portrait: Tensor, source: MouthSource, jobs: Sequence[MouthJob]) -> list[Blend]:
    """The mouth interiors of one avatar, each job in its window: between the driven inner lips, the portrait's own
    interior riding on the lips (``source``), and what opens up between them drawn."""
    if not jobs:
        return []
    size, dev = portrait.shape[-1], portrait.device
    win, frames, u, v, top, bottom = _opening(jobs, INNER_MOUTH, dev)
    below_top, above_bottom = v - top, bottom - v
    au = u.abs()
    half, iod, k = np.array([f.half for f in frames]), np.array([j.iod for j in jobs]), 0.5 / MOUTH_EDGE_PX
    (neg_half, corner, half_depth, line_k, scale_t, iod_t, inv_deep, inv_open, inv_open_lo, inv_lit) = per_window(
        dev, -half * k, 0.5 + half * k, 0.5 * half, half / 0.6, [j.scale for j in jobs], iod,
        1 / (0.06 * iod), 1 / (0.08 * iod), 1 / (0.05 * iod), 1 / (0.035 * iod),
    )  # fmt: skip
    t = _steps(3, u)  # the opening: its corners, below the upper lip, above the lower lip
    torch.addcmul(corner, au, neg_half, out=t[0])
    torch.add(_k(0.5), below_top, alpha=k, out=t[1])
    torch.add(_k(0.5), above_bottom, alpha=k, out=t[2])
    alpha = _smooth_(t).prod(0)
    shown = [float(alpha[n, : y1 - y0, : x1 - x0].max()) >= 1e-3 for n, (x0, y0, x1, y1) in enumerate(win.boxes)]
    if not any(shown):
        return []
    n = len(jobs)
    # the portrait's own opening, in its own frame
    s_top, s_bot = _interp([source.top] * n, u), _interp([source.bottom] * n, u)
    s_gap = (s_bot - s_top).clamp_min_(0.0)
    h_up = _interp([(U_SPLIT, source.split)] * n, u).mul_(s_gap)
    h_lo = s_gap.sub_(h_up)
    d_top, d_bot = below_top * scale_t, above_bottom * scale_t  # in portrait pixels
    photo_up = sample(portrait, frame_grid([source.frame] * n, u, s_top.add_(d_top), size))
    photo_lo = sample(portrait, frame_grid([source.frame] * n, u, s_bot.sub_(d_bot), size))

    gap = bottom.sub_(top).clamp_min_(0.0)
    depth = torch.minimum(torch.minimum(below_top, above_bottom), torch.addcmul(half_depth, au, -half_depth))
    t = _steps(6, u)
    # the bands of the portrait's interior overlap by a pixel, so where the opening is the portrait's own nothing
    # drawn shows through (ramps of half width 0.5)
    torch.add(h_up.sub_(d_top), _k(0.5), out=t[0])
    torch.add(h_lo.sub_(d_bot), _k(2.0), out=t[1])
    torch.mul(depth, inv_deep, out=t[2])  # the throat: lip-tinted near the lips, dark in the depth
    torch.addcmul(_k(-0.07 / 0.08), gap, inv_open, out=t[3])  # a tongue once the mouth is open enough
    torch.addcmul(_k(-1.0), gap, inv_open_lo, out=t[4])  # lower teeth once the mouth is open enough to see them
    torch.mul(below_top, inv_lit, out=t[5])  # the upper teeth in the lip's shadow at the top
    a_up, a_lo, deep, open_t, open_lo, lit = _smooth_(t).unbind(0)
    u2 = u.square()
    corner_dark = torch.add(_k(1.0), u2, alpha=-0.55)
    light = source.light  # drawn teeth and tongue are lit like the face
    colors = np.array([THROAT, TONGUE, TEETH_IVORY, TEETH_IVORY]) * np.array([1.0, light, 0.62 * light, light])[:, None]
    throat, tongue, lower_teeth, upper_teeth = _tensor(colors, dev).view(4, 3, 1, 1, 1).unbind(0)
    layer = torch.lerp(source.lip.view(3, 1, 1, 1).mul(_k(0.45)), throat, deep).mul_(corner_dark)  # [3, N, h, w]
    # tongue: rests on the floor of the mouth, behind the lower teeth
    t_h = torch.minimum(gap * 0.35, iod_t * 0.13).mul_(_half_disc(u2, 0.7))
    a_t = t_h.sub(above_bottom).sigmoid_().mul_(open_t).mul_(t_h > 0.5)
    shade = _smooth_(above_bottom / t_h.clamp_min(1.0)).mul_(_k(0.4)).add_(_k(0.6)).mul_(corner_dark)
    layer.lerp_(tongue * shade, a_t)
    # the gaps between teeth: faint lines at the tooth boundaries (exp of at most -20: 1 - 0.16 e^-20 is 1 in
    # float32, and a far smaller argument costs exp a slow path)
    lines = (au - _tooth_edges(dev)).mul_(line_k).square_().clamp_max_(20.0).neg_().exp_()
    teeth = lines.mul_(_k(-0.16)).add_(_k(1.0)).prod(0).mul_(corner_dark)
    # lower teeth: a shadowed hint above the lower lip
    t_lo = torch.minimum(gap * 0.18, iod_t * 0.05).mul_(_half_disc(u2, 0.55))
    a_tl = t_lo.sub(above_bottom).div_(_k(0.6)).sigmoid_().mul_(t_lo > 0.5).mul_(open_lo)
    layer.lerp_(lower_teeth * teeth, a_tl)
    # upper teeth: hang from the upper lip, shorter and darker towards the corners, darkest under the lip
    t_up = torch.minimum(gap * 0.45, iod_t * 0.085).mul_(_half_disc(u2, 0.8))
    a_tu = t_up.sub(below_top).div_(_k(0.6)).sigmoid_().mul_(t_up > 0.5)
    layer.lerp_(upper_teeth * teeth.mul_(lit.mul_(_k(0.22)).add_(_k(0.7))), a_tu)
    # the portrait's own interior on top: it rides on the lips (upper over lower where they overlap)
    layer.lerp_(photo_lo, a_lo)
    layer.lerp_(photo_up, a_up)
    return [
        Blend(j.frame, j.box, layer[:, m, : y1 - y0, : x1 - x0], alpha[m, : y1 - y0, : x1 - x0])
        for m, (j, (x0, y0, x1, y1)) in enumerate(zip(jobs, win.boxes, strict=True))
        if shown[m]
    ]


def lower_lip_layers(portrait: Tensor, source: MouthSource, jobs: Sequence[MouthJob]) -> list[Blend]:
    """The portrait's lower lip laid between the driven inner and outer lower-lip curves of each job (one avatar's),
    so a mouth closes further than the warp may take it (the warp keeps lips that sit close above each other from
    squeezing together); it fades into the warp towards the outer lip border."""
    jobs = [j for j in jobs if j.strength > 1e-3]
    if not jobs:
        return []
    size, dev = portrait.shape[-1], portrait.device
    win, frames, u, v, top, bottom = _opening(jobs, LOWER_LIP, dev)
    below_top, above_bottom = v - top, bottom.sub(v)
    n = len(jobs)
    # the portrait's lower lip: from its inner edge (the opening's lower curve, the same frame) to its outer edge
    along = (below_top / bottom.sub_(top).clamp_min_(0.5)).clamp_(0.0, 1.0)
    ly = torch.lerp(_interp([source.bottom] * n, u), _interp([source.lip_outer] * n, u), along)
    lip = sample(portrait, frame_grid([source.frame] * n, u, ly, size))
    half, k = np.array([f.half for f in frames]), 0.5 / MOUTH_EDGE_PX
    neg_half, corner, strength = per_window(dev, -half * k, 0.5 + half * k, [j.strength for j in jobs])
    t = _steps(4, u)
    torch.add(_k(0.5), below_top, alpha=k, out=t[0])
    torch.add(_k(0.5), above_bottom, alpha=k, out=t[1])
    torch.addcmul(corner, u.abs(), neg_half, out=t[2])
    torch.add(_k(-0.55 / 0.4), along, alpha=1 / 0.4, out=t[3])  # fades out towards the outer lip border
    ramps = _smooth_(t)
    a = ramps[:3].prod(0).mul_(strength).mul_(_k(1.0) - ramps[3])
    return [
        Blend(j.frame, j.box, lip[:, m, : y1 - y0, : x1 - x0], a[m, : y1 - y0, : x1 - x0])
        for m, (j, (x0, y0, x1, y1)) in enumerate(zip(jobs, win.boxes, strict=True))
    ]
