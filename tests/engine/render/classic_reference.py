"""The classic renderer as it drew before it was made cheaper (commit 0c84c52): the parity reference of
``test_classic_parity.py``, nothing else uses it.

A frozen copy of the per-frame code of ``engine.render.classic`` and ``engine.render.classic_layers`` at that commit
(the prepare-time measurements included, so the reference does not lean on what it checks), driving the mesh and
spline solve of ``engine.render.classic_mesh`` (which now returns the float64 solution that the old one rounded to
float32). One change: where the spline is evaluated is a parameter (``Evaluate``), by default the float32
evaluation of the float32-rounded spline as before; the parity test also evaluates it exactly (float64) and as the
fast path does. A deliberate change to what classic mode draws changes this file the same way, or retires the
parity test.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from engine.avatar.record import Avatar
from engine.keypoints import NUM_KP
from engine.render.base import PreparedAvatar
from engine.render.classic import (
    LID_BELOW,
    LID_KEYPOINT,
    LID_LANDMARKS,
    LOWER_INNER_LIP,
    MIN_LID_GAP_PX,
    SOFT_LID_PX,
    UPPER_INNER_LIP,
    face_size,
    source_face,
)
from engine.render.classic_mesh import ANCHORS, Spline, apply_affine, build_mesh, fit_affine, solve_spline

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


class Band(NamedTuple):
    """Where window pixels lie relative to an opening between an upper and a lower curve (pixels)."""

    u: Tensor  # [H, W] across the opening: -1 left corner, 1 right corner
    below_top: Tensor  # [H, W] distance below the upper curve (negative above it)
    above_bottom: Tensor  # [H, W] distance above the lower curve
    gap: Tensor  # [H, W] opening height at u
    half: Tensor  # [] half width, corner to corner


class Frame(NamedTuple):
    center: Tensor  # [2]
    ex: Tensor  # [2] towards the right corner
    ey: Tensor  # [2] perpendicular, downwards
    half: Tensor  # []


def _catmull_rom_basis(samples: int) -> Tensor:
    t = torch.linspace(0.0, 1.0, samples + 1)[:-1, None]  # [S, 1]
    # weights of p0..p3 for the uniform Catmull-Rom segment p1 -> p2
    return 0.5 * torch.cat([-t + 2 * t**2 - t**3, 2 - 5 * t**2 + 3 * t**3, t + 4 * t**2 - 3 * t**3, -(t**2) + t**3], 1)


_BASIS = _catmull_rom_basis(6)  # [6, 4]


def _densify(points: Tensor) -> Tensor:
    """Open Catmull-Rom curve through ``points [N, 2]`` (ends repeated) -> ``[(N - 1) * 6 + 1, 2]``."""
    p = torch.cat([points[:1], points, points[-1:]])
    n = len(points) - 1
    quads = torch.stack([p[0:n], p[1 : n + 1], p[2 : n + 2], p[3 : n + 3]], 1)  # [n, 4, 2]
    dense = _BASIS.to(points) @ quads  # [n, 6, 2]
    return torch.cat([dense.reshape(-1, 2), points[-1:]])


def _interp(xk: Tensor, yk: Tensor, x: Tensor) -> Tensor:
    """Piecewise-linear ``y(x)`` through knots (sorted here), clamped at the ends."""
    order = torch.argsort(xk)
    xk, yk = xk[order], yk[order]
    if x.device.type == "cpu":
        # numpy's interp is one serial pass; the torch version is a handful of ops that each wake the thread pool
        y = np.interp(x.detach().numpy(), xk.detach().numpy(), yk.detach().numpy())
        return torch.from_numpy(y.astype(np.float32, copy=False)).to(x.dtype)
    idx = torch.searchsorted(xk.contiguous(), x.contiguous()).clamp(1, len(xk) - 1)
    x0, x1, y0, y1 = xk[idx - 1], xk[idx], yk[idx - 1], yk[idx]
    t = ((x - x0) / (x1 - x0).clamp_min(1e-6)).clamp(0.0, 1.0)
    return y0 + t * (y1 - y0)


def opening_frame(upper: Tensor) -> Frame:
    left, right = upper[0], upper[-1]
    d = right - left
    half = torch.linalg.vector_norm(d).clamp_min(1e-3) / 2
    ex = d / (2 * half)
    return Frame((left + right) / 2, ex, torch.stack([-ex[1], ex[0]]), half)


def curves(upper: Tensor, lower: Tensor, frame: Frame) -> tuple[Tensor, Tensor, Tensor]:
    """Both curves densified and put in ``frame``: ``(upper [2, K], lower [2, K], half)``, each row pair being the
    across-opening coordinate ``u`` and the offset along ``frame.ey`` (pixels) of the curve's knots."""
    up, lo = _densify(upper), _densify(lower)
    rel_u, rel_l = up - frame.center, lo - frame.center
    return (
        torch.stack([rel_u @ frame.ex / frame.half, rel_u @ frame.ey]),
        torch.stack([rel_l @ frame.ex / frame.half, rel_l @ frame.ey]),
        frame.half,
    )


def band(upper: Tensor, lower: Tensor, xs: Tensor, ys: Tensor) -> Band:
    """Pixels ``(xs, ys) [H, W]`` against the opening between ``upper`` and ``lower`` (``[N, 2]`` each, pixels,
    both from the left corner to the right corner)."""
    frame = opening_frame(upper)
    top_k, bot_k, half = curves(upper, lower, frame)
    rx, ry = xs - frame.center[0], ys - frame.center[1]
    u = (rx * frame.ex[0] + ry * frame.ex[1]) / half
    ly = rx * frame.ey[0] + ry * frame.ey[1]
    top = _interp(top_k[0], top_k[1], u)
    bottom = _interp(bot_k[0], bot_k[1], u)
    return Band(u, ly - top, bottom - ly, bottom - top, half)


def ramp(x: Tensor, width: float) -> Tensor:
    """0 below ``-width``, 1 above ``width``, smooth between (exactly 0 / 1 outside, unlike a sigmoid)."""
    return _smoothstep((x + width) / (2 * width))


def opening_mask(b: Band, edge: float, grow: float = 0.0, grow_bottom: float | None = None) -> Tensor:
    """Soft inside-the-opening mask ``[H, W]`` (the corners close it too), grown outwards by ``grow`` pixels
    (at the lower curve by ``grow_bottom`` when given)."""
    bottom = grow if grow_bottom is None else grow_bottom
    corner = ramp((1.0 - b.u.abs()) * b.half + grow, edge)
    return ramp(b.below_top + grow, edge) * ramp(b.above_bottom + bottom, edge) * corner


def to_grid(px: Tensor, size: int) -> Tensor:
    """Pixel coordinates ``[..., 2]`` -> grid_sample coordinates (align_corners=False)."""
    return (2.0 * px + 1.0) / size - 1.0


def sample(image: Tensor, px: Tensor, size: int) -> Tensor:
    """``image [C, S, S]`` at pixel positions ``px [H, W, 2]`` -> ``[C, H, W]``."""
    grid = to_grid(px, size)[None].to(image.dtype)
    return F.grid_sample(image[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


def _smoothstep(x: Tensor) -> Tensor:
    x = x.clamp(0.0, 1.0)
    return x * x * (3 - 2 * x)


def _color(rgb: tuple[float, float, float] | Tensor, like: Tensor) -> Tensor:
    return torch.as_tensor(rgb, dtype=like.dtype, device=like.device).reshape(3, 1, 1)


# --- prepare time: what the portrait's own openings contain ---------------------------------------------------


class EyeSource(NamedTuple):
    # [4, S, S]: the portrait, with the eye surroundings (from LASH_PX inside the lash lines outwards) replaced by
    # the sclera colour measured in that eye; channel 3 is 1 where the portrait itself shows
    texture: Tensor


class MouthSource(NamedTuple):
    split: Tensor  # [K] fraction of the opening height (from the top) that belongs to the upper lip, at U_SPLIT
    lip: Tensor  # [3] lip colour
    light: float  # brightness scale for drawn teeth (the portrait's skin luma relative to a typical one)


U_SPLIT = np.linspace(-1.0, 1.0, 33)


def _box(points: Tensor, margin: float, size: int) -> tuple[int, int, int, int]:
    lo, hi = points.min(0).values - margin, points.max(0).values + margin
    return (max(0, int(lo[0])), max(0, int(lo[1])), min(size, int(hi[0]) + 2), min(size, int(hi[1]) + 2))


def _grid(box: tuple[int, int, int, int], device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates ``(xs, ys) [H, W]`` of the window ``box`` = (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    ys, xs = torch.meshgrid(
        torch.arange(y0, y1, dtype=torch.float32, device=device),
        torch.arange(x0, x1, dtype=torch.float32, device=device),
        indexing="ij",
    )
    return xs, ys


def eye_source(portrait: Tensor, landmarks: Tensor, iod: float) -> EyeSource:
    """The eyeball texture of a portrait (``portrait [3, S, S]``, ``landmarks [68, 2]`` pixels, ``iod`` pixels)."""
    size = portrait.shape[-1]
    texture = torch.cat([portrait, torch.ones_like(portrait[:1])])
    for upper, lower in (LEFT_EYE, RIGHT_EYE):
        box = _box(landmarks[list(upper) + list(lower)], 0.4 * iod, size)
        xs, ys = _grid(box)
        b = band(landmarks[list(upper)], landmarks[list(lower)], xs, ys)
        m = opening_mask(b, EYE_EDGE_PX, grow=-LASH_PX)
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


def mouth_source(portrait: Tensor, landmarks: Tensor, iod: float) -> MouthSource:
    """Where the portrait's upper teeth end across its mouth opening, its lip colour and skin brightness."""
    size = portrait.shape[-1]
    upper, lower = landmarks[list(INNER_MOUTH[0])], landmarks[list(INNER_MOUTH[1])]
    frame = opening_frame(upper)
    top_k, bot_k, half = curves(upper, lower, frame)
    u = torch.as_tensor(U_SPLIT, dtype=torch.float32)
    top, bottom = _interp(top_k[0], top_k[1], u), _interp(bot_k[0], bot_k[1], u)
    split = torch.full_like(u, 0.5)
    if float((bottom - top).max()) > 0.03 * iod:
        # an open mouth: the upper teeth are the bright run that starts at the upper lip; a smooth curve fitted
        # through the columns that show it (a few odd columns must not tear the teeth apart)
        v = torch.linspace(0.0, 1.0, 33)
        ly = top[:, None] + (bottom - top)[:, None] * v[None]  # [K, 33]
        px = frame.center + (u[:, None, None] * half) * frame.ex + ly[..., None] * frame.ey  # [K, 33, 2]
        found = _teeth_split(sample(portrait, px, size))
        ok = ~torch.isnan(found) & (u.abs() < 0.85)
        if int(ok.sum()) >= 5:
            coef = np.polyfit(u[ok].numpy(), found[ok].numpy(), 2)
            split = torch.from_numpy(np.polyval(coef, u.numpy())).float().clamp(0.3, 1.0)
    box = _box(landmarks[48:68], 2.0, size)
    xs, ys = _grid(box)
    x0, y0, x1, y1 = box
    outer_up = landmarks[[48, 49, 50, 51, 52, 53, 54]]
    outer_lo = landmarks[[48, 59, 58, 57, 56, 55, 54]]
    lips = opening_mask(band(outer_up, outer_lo, xs, ys), 1.0) * (1 - opening_mask(band(upper, lower, xs, ys), 1.0))
    weight = lips.flatten()
    lip = (portrait[:, y0:y1, x0:x1].flatten(1) * weight).sum(1) / weight.sum().clamp_min(1e-6)
    # skin brightness around the nose, relative to a typical lit face: drawn teeth are lit like the face
    luma_img = (portrait * _color(LUMA, portrait)).sum(0)
    cheek = landmarks[[29, 31, 35]].mean(0)
    r = int(max(2, round(0.08 * iod)))
    cx, cy = int(cheek[0].round()), int(cheek[1].round())
    patch = luma_img[max(0, cy - r) : cy + r + 1, max(0, cx - r) : cx + r + 1]
    light = float(np.clip(float(patch.mean()) / 0.68, 0.55, 1.0)) if patch.numel() else 1.0
    return MouthSource(split, lip, light)


# --- per frame ------------------------------------------------------------------------------------------------


class EyeCurves(NamedTuple):
    """One eye's curves, left corner -> right corner, pixels ``[4, 2]`` each."""

    lash: Tensor  # upper lash line (corner, lid, lid, corner)
    lower: Tensor  # lower lid
    crease: Tensor  # lid crease (corner, crease, crease, corner)


def eye_curves(landmarks: Tensor, creases: Tensor, eye: int) -> EyeCurves:
    """``landmarks [68, 2]`` and the crease points above the two upper-lid landmarks ``[2, 2]`` of ``eye``."""
    upper, lower = (LEFT_EYE, RIGHT_EYE)[eye]
    lash = landmarks[list(upper)]
    return EyeCurves(lash, landmarks[list(lower)], torch.stack([lash[0], creases[0], creases[1], lash[-1]]))


def eye_layer(
    warped: Tensor,
    portrait: Tensor,
    source: EyeSource,
    driven: EyeCurves,
    src: EyeCurves,
    to_source: Tensor,
    gaze_px: float,
    lid_travel_px: float,
    box: tuple[int, int, int, int],
) -> Tensor:
    """Composite one eye into ``warped [3, H, W]`` (the window ``box`` = x0, y0, x1, y1 of the output).

    Two layers: the eyeball (the portrait moved with the head only, ``to_source [2, 3]`` output px -> portrait
    px, shifted right by ``gaze_px``), shown EYEBALL_INSET_PX inside the driven lids; over it the upper lid, the
    skin between crease and lash line of the portrait laid between the driven crease and lash line (translated
    near the lashes, stretched or compressed above), clipped at the driven lower lid. ``lid_travel_px``: how far
    the lid moved from where the portrait has it."""
    size = portrait.shape[-1]
    xs, ys = _grid(box, warped.device)
    opening = band(driven.lash, driven.lower, xs, ys)
    out = warped
    # the lid layer reaches `reach` below the lash line; the eyeball starts 2 soft edges above that, so no strip
    # of the warp shows between them
    reach = LID_MOVING_PX + (LID_REST_PX - LID_MOVING_PX) * float(np.exp(-((lid_travel_px / 1.5) ** 2)))
    alpha = opening_mask(opening, EYE_EDGE_PX, grow=2 * EYE_EDGE_PX - reach, grow_bottom=-BALL_BOTTOM_PX)
    if float(alpha.max()) > 1e-3:
        pts = torch.stack([xs - gaze_px, ys], -1)  # [H, W, 2]
        tex = sample(source.texture, pts @ to_source[:, :2].T + to_source[:, 2], size)
        rgb, m = tex[:3], tex[3:]
        # newly shown sclera sits in the shadow of the upper lid
        shade = 0.6 + 0.4 * _smoothstep(opening.below_top / (0.35 * opening.half.clamp_min(1.0)))
        out = out * (1 - alpha) + rgb * (m + (1 - m) * shade) * alpha

    lid = band(driven.crease, driven.lash, xs, ys)  # below_top: under the crease; above_bottom: over the lashes
    sf = opening_frame(src.crease)
    crease_k, lash_k, s_half = curves(src.crease, src.lash, sf)
    u = lid.u
    s_lash, s_crease = _interp(lash_k[0], lash_k[1], u), _interp(crease_k[0], crease_k[1], u)
    dd, ds = lid.gap.clamp_min(0.5), (s_lash - s_crease).clamp_min(0.5)
    dist = lid.above_bottom
    keep = 0.35 * torch.minimum(dd, ds)  # lashes and lid margin keep their size
    f = torch.where(dist <= keep, dist, keep + (dist - keep) * (ds - keep) / (dd - keep).clamp_min(1e-3))
    skin = sample(portrait, sf.center + (u * s_half)[..., None] * sf.ex + (s_lash - f)[..., None] * sf.ey, size)
    a_lid = (
        _smoothstep(lid.below_top / (0.5 * dd))  # fades into the warp towards the crease
        * ramp(dist + reach, EYE_EDGE_PX)
        * ramp(opening.above_bottom, EYE_EDGE_PX)  # never over the lower lid
        * ramp((1.0 - u.abs()) * lid.half, EYE_EDGE_PX)
    )
    return out * (1 - a_lid) + skin * a_lid


def mouth_layer(
    warped: Tensor,
    portrait: Tensor,
    source: MouthSource,
    driven: Tensor,
    src_landmarks: Tensor,
    scale: float,
    iod: float,
    box: tuple[int, int, int, int],
) -> Tensor:
    """Composite the mouth interior into ``warped [3, H, W]`` (window ``box``). ``scale``: portrait pixels per
    output pixel; ``iod``: driven inter-ocular distance in output pixels."""
    size = portrait.shape[-1]
    xs, ys = _grid(box, warped.device)
    up_idx, lo_idx = list(INNER_MOUTH[0]), list(INNER_MOUTH[1])
    b = band(driven[up_idx], driven[lo_idx], xs, ys)
    alpha = opening_mask(b, MOUTH_EDGE_PX)
    if float(alpha.max()) < 1e-3:
        return warped
    # the portrait's own opening, in its own frame
    s_up, s_lo = src_landmarks[up_idx], src_landmarks[lo_idx]
    sf = opening_frame(s_up)
    top_k, bot_k, s_half = curves(s_up, s_lo, sf)
    u = b.u
    s_top, s_bot = _interp(top_k[0], top_k[1], u), _interp(bot_k[0], bot_k[1], u)
    s_gap = (s_bot - s_top).clamp_min(0.0)
    split = _interp(torch.as_tensor(U_SPLIT, dtype=torch.float32, device=u.device), source.split, u)
    h_up, h_lo = split * s_gap, (1 - split) * s_gap
    d_top, d_bot = b.below_top * scale, b.above_bottom * scale  # in portrait pixels

    def src_px(ly: Tensor) -> Tensor:
        return sf.center + (u * s_half)[..., None] * sf.ex + ly[..., None] * sf.ey

    photo_up = sample(portrait, src_px(s_top + d_top), size)
    photo_lo = sample(portrait, src_px(s_bot - d_bot), size)
    # the bands overlap by a pixel, so where the opening is the portrait's own nothing drawn shows through
    a_up = ramp(h_up - d_top, 0.5)
    a_lo = ramp(h_lo + 1.5 - d_bot, 0.5)

    gap = b.gap.clamp_min(0.0)
    au = u.abs()
    corner_dark = 1.0 - 0.55 * au**2
    # throat: lip-tinted near the lips, dark in the depth
    depth = torch.minimum(torch.minimum(b.below_top, b.above_bottom), (1 - au) * b.half * 0.5)
    w = _smoothstep(depth / (0.06 * iod))
    edge_col = source.lip.reshape(3, 1, 1) * 0.45
    layer = edge_col * (1 - w) + _color(THROAT, warped) * w
    layer = layer * corner_dark
    light = source.light
    # tongue: rests on the floor of the mouth, behind the lower teeth, once the mouth is open enough
    open_t = _smoothstep((gap - 0.07 * iod) / (0.08 * iod))
    t_h = torch.minimum(0.35 * gap, torch.full_like(gap, 0.13 * iod)) * (1 - (u / 0.7) ** 2).clamp_min(0).sqrt()
    a_t = torch.sigmoid((t_h - b.above_bottom) / 1.0) * open_t * (t_h > 0.5).float()
    tongue = _color(TONGUE, warped) * light * (0.6 + 0.4 * _smoothstep(b.above_bottom / t_h.clamp_min(1.0)))
    layer = layer * (1 - a_t) + tongue * corner_dark * a_t
    # the gaps between teeth: faint lines at the tooth boundaries
    lines = torch.ones_like(u)
    for edge in TOOTH_EDGES:
        lines = lines * (1 - 0.16 * torch.exp(-((((au - edge) * b.half) / 0.6) ** 2)))
    # lower teeth: a shadowed hint above the lower lip, once the mouth is open enough to see them
    open_lo = _smoothstep((gap - 0.05 * iod) / (0.05 * iod))
    t_lo = torch.minimum(0.18 * gap, torch.full_like(gap, 0.05 * iod)) * (1 - (u / 0.55) ** 2).clamp_min(0).sqrt()
    a_tl = torch.sigmoid((t_lo - b.above_bottom) / 0.6) * (t_lo > 0.5).float() * open_lo
    teeth_lo = _color(TEETH_IVORY, warped) * light * 0.62 * corner_dark * lines
    layer = layer * (1 - a_tl) + teeth_lo * a_tl
    # upper teeth: hang from the upper lip, shorter and darker towards the corners, in the lip's shadow at the top
    t_up = torch.minimum(0.45 * gap, torch.full_like(gap, 0.085 * iod)) * (1 - (u / 0.8) ** 2).clamp_min(0).sqrt()
    a_tu = torch.sigmoid((t_up - b.below_top) / 0.6) * (t_up > 0.5).float()
    lit = 0.7 + 0.22 * _smoothstep(b.below_top / (0.035 * iod))  # in the mouth's shade, darkest under the lip
    teeth_up = _color(TEETH_IVORY, warped) * light * corner_dark * lines * lit
    layer = layer * (1 - a_tu) + teeth_up * a_tu
    # the portrait's own interior on top: it rides on the lips (upper over lower where they overlap)
    layer = photo_lo * a_lo + layer * (1 - a_lo)
    layer = photo_up * a_up + layer * (1 - a_up)
    return warped * (1 - alpha) + layer * alpha


LOWER_LIP = ((60, 67, 66, 65, 64), (48, 59, 58, 57, 56, 55, 54))  # inner edge, outer edge (left -> right)


def lower_lip_layer(
    warped: Tensor,
    portrait: Tensor,
    driven: Tensor,
    src_landmarks: Tensor,
    strength: float,
    box: tuple[int, int, int, int],
) -> Tensor:
    """Lay the portrait's lower lip between the driven inner and outer lower-lip curves (``driven [68, 2]``
    pixels), so a mouth closes further than the warp may take it (the warp keeps lips that sit close above each
    other from squeezing together). ``strength`` in [0, 1]; fades into the warp towards the outer lip border."""
    if strength <= 1e-3:
        return warped
    size = portrait.shape[-1]
    xs, ys = _grid(box, warped.device)
    inner, outer = list(LOWER_LIP[0]), list(LOWER_LIP[1])
    b = band(driven[inner], driven[outer], xs, ys)
    sf = opening_frame(src_landmarks[inner])
    top_k, bot_k, s_half = curves(src_landmarks[inner], src_landmarks[outer], sf)
    u = b.u
    s_top, s_bot = _interp(top_k[0], top_k[1], u), _interp(bot_k[0], bot_k[1], u)
    t = (b.below_top / b.gap.clamp_min(0.5)).clamp(0.0, 1.0)
    ly = s_top + t * (s_bot - s_top)
    lip = sample(portrait, sf.center + (u * s_half)[..., None] * sf.ex + ly[..., None] * sf.ey, size)
    a = (
        strength
        * ramp(b.below_top, MOUTH_EDGE_PX)
        * ramp(b.above_bottom, MOUTH_EDGE_PX)
        * (1.0 - _smoothstep((t - 0.55) / 0.4))
        * ramp((1.0 - u.abs()) * b.half, MOUTH_EDGE_PX)
    )
    return warped * (1 - a) + lip * a


class ClassicState(NamedTuple):
    portrait: torch.Tensor  # [3, S, S] float in [0, 1]
    iod: float  # inter-ocular distance, normalised units
    mesh: torch.Tensor  # [M, 2] source control points (normalised)
    wx: torch.Tensor  # [M, 21] keypoint-residual weights of each control point, x
    wy: torch.Tensor  # [M, 21] ... y
    fixed: torch.Tensor  # [M] bool: crop-border anchors
    apart: torch.Tensor  # [P, 2] control points kept apart (see MeshSpec.apart)
    apart_share: torch.Tensor  # [P]
    apart_upper: torch.Tensor  # [P] bool
    landmark_index: torch.Tensor  # [68] control point index of each landmark
    lid_scale: torch.Tensor  # [4] lid travel per unit of lid keypoint offset, for LID_LANDMARKS
    creases: torch.Tensor  # [4] control point index of the crease above each of LID_LANDMARKS
    landmarks: torch.Tensor  # [68, 2] source landmarks, pixels
    eyes: EyeSource
    mouth: MouthSource


def eval_spline(spline: Spline, query: torch.Tensor) -> torch.Tensor:
    """Spline values at ``query [B, P, 2]`` -> ``[B, P, 2]``."""
    phi = torch.cdist(query, spline.centers).pow_(3)  # [B, P, M] r^3, few passes over the big array
    return torch.baddbmm(query @ spline.affine[:, 1:], phi, spline.weights) + spline.affine[:, :1]


# (the spline as solved, in float64; the grid's xs [W] and ys [H]; True for the coarse grid, False for the
# refinement around the lips) -> the values [B, H * W, 2] in float32, row by row
Evaluate = Callable[[Spline, torch.Tensor, torch.Tensor, bool], torch.Tensor]


def _query(xs: torch.Tensor, ys: torch.Tensor, batch: int) -> torch.Tensor:
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], -1).reshape(1, -1, 2).expand(batch, -1, -1)


def evaluate_as_before(spline: Spline, xs: torch.Tensor, ys: torch.Tensor, coarse: bool) -> torch.Tensor:
    """The spline rounded to float32 (what solve_spline returned) and evaluated in float32."""
    return eval_spline(Spline(*(t.float() for t in spline)), _query(xs, ys, spline.centers.shape[0]))


def evaluate_exactly(spline: Spline, xs: torch.Tensor, ys: torch.Tensor, coarse: bool) -> torch.Tensor:
    """The same spline evaluated in float64: what the float32 arithmetic approximates."""
    return eval_spline(spline, _query(xs.double(), ys.double(), spline.centers.shape[0])).float()


def _sample(image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear 2-D sampling of the portrait (ATen's on any device: the fused kernels are the 3-D warps of the
    neural renderer, and a 2-D grid sample is already one memory-bound pass)."""
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)


class ReferenceRenderer:
    """The classic renderer's per-frame path before the change (``render`` of the same frames in, the picture out);
    avatars are checked, and keypoints driven, by ``ClassicRenderer`` as before."""

    def __init__(self, size: int = 512, flow_size: int = 64, evaluate: Evaluate = evaluate_as_before) -> None:
        self.size = size
        self.flow_size = flow_size
        self.device = torch.device("cpu")
        self.evaluate = evaluate
        self._lin = (2.0 * torch.arange(flow_size, dtype=torch.float32) + 1.0) / flow_size - 1.0
        full = (2.0 * torch.arange(size, dtype=torch.float32) + 1.0) / size - 1.0
        fy, fx = torch.meshgrid(full, full, indexing="ij")
        self._base = torch.stack([fx, fy], -1)[None].to(self.device)  # [1, S, S, 2]

    def prepare(self, avatar: Avatar) -> PreparedAvatar:
        assert avatar.landmarks is not None
        landmarks = np.asarray(avatar.landmarks, dtype=np.float64)
        source = source_face(landmarks, self.size)
        iod = face_size(source)
        portrait = torch.from_numpy(avatar.crop).permute(2, 0, 1).float().div(255.0)
        spec = build_mesh(landmarks, self.size)
        lm = torch.from_numpy(landmarks).float()
        iod_px = iod * self.size / 2
        dev = self.device
        state = ClassicState(
            portrait=portrait.to(dev),
            iod=iod,
            mesh=torch.from_numpy(spec.points).float().to(dev),
            wx=torch.from_numpy(spec.wx).float().to(dev),
            wy=torch.from_numpy(spec.wy).float().to(dev),
            fixed=torch.from_numpy(spec.fixed).to(dev),
            apart=torch.from_numpy(spec.apart).to(dev),
            apart_share=torch.from_numpy(spec.apart_share).float().to(dev),
            apart_upper=torch.from_numpy(spec.apart_upper).to(dev),
            landmark_index=torch.from_numpy(spec.landmark_index).to(dev),
            lid_scale=torch.from_numpy(spec.lid_scale[list(LID_LANDMARKS)]).float().to(dev),
            creases=torch.from_numpy(spec.crease_index[list(LID_LANDMARKS)]).to(dev),
            landmarks=lm.to(dev),
            eyes=EyeSource(eye_source(portrait, lm, iod_px).texture.to(dev)),
            mouth=_to_device(mouth_source(portrait, lm, iod_px), dev),
        )
        return PreparedAvatar(avatar, source, state)

    def render(self, prepared: Sequence[PreparedAvatar], kp_driving: torch.Tensor) -> torch.Tensor:
        if kp_driving.shape != (len(prepared), NUM_KP, 3):
            raise ValueError(f"kp_driving must be [{len(prepared)}, {NUM_KP}, 3], got {tuple(kp_driving.shape)}")
        states: list[ClassicState] = [p.state for p in prepared]
        b, size = len(prepared), self.size
        kp_d = kp_driving[..., :2].to(self.device, torch.float32)
        kp_s = torch.stack([p.source.kp_source[:, :2] for p in prepared]).to(self.device, torch.float32)
        anchors = list(ANCHORS)
        aff = fit_affine(kp_s[:, anchors], kp_d[:, anchors]).float()  # [B, 2, 3] head motion
        res = kp_d - apply_affine(aff, kp_s)  # [B, 21, 2] expression
        mesh = torch.stack([s.mesh for s in states])  # [B, M, 2]
        rx = (torch.stack([s.wx for s in states]) @ res[..., 0:1])[..., 0]
        ry = (torch.stack([s.wy for s in states]) @ res[..., 1:2])[..., 0]
        moved = apply_affine(aff, mesh) + torch.stack([rx, ry], -1)
        driven = torch.where(torch.stack([s.fixed for s in states])[..., None], mesh, moved)
        wanted = driven
        driven = self._clamp_gaps(driven, states)
        spline = solve_spline(driven, mesh - driven)  # backward displacement at the driven points

        flow = self.evaluate(spline, self._lin, self._lin, True)  # [B, F*F, 2]
        flow = flow.reshape(b, self.flow_size, self.flow_size, 2).permute(0, 3, 1, 2)
        flow = F.interpolate(flow, size=(size, size), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
        flow = flow.contiguous()
        lm_px = [_to_px(driven[i, s.landmark_index], size) for i, s in enumerate(states)]
        lids, travel = self._full_lids(aff, res, lm_px, states)
        lower = list(LOWER_INNER_LIP)
        closing = []  # how far the warp held each lower lip below where the motion wants it (pixels)
        for i, s in enumerate(states):
            lm_px[i][list(LID_LANDMARKS)] = lids[i]
            want = _to_px(wanted[i, s.landmark_index[lower]], size)
            upper = lm_px[i][list(UPPER_INNER_LIP)]
            want[:, 1] = torch.maximum(want[:, 1], upper[:, 1] + MIN_LID_GAP_PX)  # lips meet, never cross
            closing.append(float((lm_px[i][lower, 1] - want[:, 1]).max()))
            lm_px[i][lower] = want
        creases = [_to_px(driven[i, s.creases], size) for i, s in enumerate(states)]
        for i, s in enumerate(states):
            # the lips part along a seam a few pixels wide: evaluate the spline there at half resolution
            one = Spline(spline.centers[i : i + 1], spline.weights[i : i + 1], spline.affine[i : i + 1])
            self._refine(flow[i], one, self._box(lm_px[i][48:68], 0.15 * s.iod * size / 2, even=True), 2)
        grid = self._base + flow
        portrait = torch.stack([s.portrait for s in states])
        out = _sample(portrait, grid)  # [B, 3, S, S]

        to_source = _output_to_source(aff, size)  # [B, 2, 3] output pixels -> portrait pixels, head motion only
        det = (aff[:, 0, 0] * aff[:, 1, 1] - aff[:, 0, 1] * aff[:, 1, 0]).abs().clamp_min(1e-6)
        gaze = res[:, [11, 15], 0] * size / 2  # [B, 2] eyeball shift in output pixels
        for i, s in enumerate(states):
            creases_s = _to_px(s.mesh[s.creases], size)
            for eye in (0, 1):
                pair = slice(2 * eye, 2 * eye + 2)
                curves_d = eye_curves(lm_px[i], creases[i][pair], eye)
                box = self._box(torch.cat([curves_d.lash, curves_d.lower, curves_d.crease]), 3.0)
                x0, y0, x1, y1 = box
                if x1 - x0 < 2 or y1 - y0 < 2:  # the eye left the frame
                    continue
                out[i, :, y0:y1, x0:x1] = eye_layer(
                    out[i, :, y0:y1, x0:x1],
                    s.portrait,
                    s.eyes,
                    curves_d,
                    eye_curves(s.landmarks, creases_s[pair], eye),
                    to_source[i],
                    float(gaze[i, eye]),
                    float(travel[i, pair].abs().mean()),
                    box,
                )
            box = self._box(lm_px[i][60:68], 3.0)
            x0, y0, x1, y1 = box
            if x1 - x0 < 2 or y1 - y0 < 2:
                continue
            scale = float(det[i].rsqrt())
            out[i, :, y0:y1, x0:x1] = mouth_layer(
                out[i, :, y0:y1, x0:x1], s.portrait, s.mouth, lm_px[i], s.landmarks, scale,
                s.iod * size / 2 / scale, box,
            )  # fmt: skip
            if closing[i] > 0.05:  # the lower lip rises over what the warp left open
                box = self._box(lm_px[i][48:68], 3.0)
                x0, y0, x1, y1 = box
                strength = min(1.0, closing[i] / 2.0)
                out[i, :, y0:y1, x0:x1] = lower_lip_layer(
                    out[i, :, y0:y1, x0:x1], s.portrait, lm_px[i], s.landmarks, strength, box
                )
        return out.clamp_(0.0, 1.0)

    # --- internals ---

    def _clamp_gaps(self, driven: torch.Tensor, states: Sequence[ClassicState]) -> torch.Tensor:
        """Keep control points that sit above each other from crossing or squeezing together, which would fold the
        spline (a brow pushed into the eye, a mouth closed over its own open lips): each pair keeps at least its
        share of the portrait's own gap, softly, and exactly where the portrait itself is."""
        unit = 2.0 / self.size
        s0 = states[0]  # the same mesh layout for every avatar
        mesh = torch.stack([s.mesh for s in states])
        for move_upper in (True, False):
            pick = s0.apart_upper == move_upper
            upper, lower = s0.apart[pick, 0], s0.apart[pick, 1]
            own = (mesh[:, lower, 1] - mesh[:, upper, 1]).clamp_min(0.0)  # [B, P]
            least = torch.clamp(s0.apart_share[pick] * own, min=MIN_LID_GAP_PX * unit)
            soft = ((own - least) / 25.0).clamp(1e-5, SOFT_LID_PX * unit)  # exact 20 softnesses away
            driven = _keep_apart(driven, upper, lower, least, soft, move_upper)
        return driven

    def _full_lids(
        self, aff: torch.Tensor, res: torch.Tensor, lm_px: list[torch.Tensor], states: Sequence[ClassicState]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Upper-lid landmarks with the whole lid travel (the spline moved them SPLINE_LID_SHARE of it), pixels
        ``[B, 4, 2]``: head motion + lid keypoint offset x lid scale, softly kept above the driven lower lid; and
        the travel ``[B, 4]`` (pixels)."""
        src = torch.stack([s.mesh[s.landmark_index[list(LID_LANDMARKS)]] for s in states])  # [B, 4, 2]
        travel = res[:, list(LID_KEYPOINT), 1] * torch.stack([s.lid_scale for s in states])  # [B, 4]
        lids = _to_px(apply_affine(aff, src), self.size)
        lids[..., 1] += travel * self.size / 2
        lower = torch.stack([px[list(LID_BELOW)] for px in lm_px])  # [B, 4, 2]
        gap = lower[..., 1] - lids[..., 1]
        soft = MIN_LID_GAP_PX + F.softplus(gap - MIN_LID_GAP_PX, beta=1.0 / SOFT_LID_PX, threshold=20.0)
        lids[..., 1] = lower[..., 1] - soft
        return lids, travel * self.size / 2

    def _box(self, points: torch.Tensor, margin: float, even: bool = False) -> tuple[int, int, int, int]:
        """Integer window (x0, y0, x1, y1) around ``points [N, 2]`` (pixels) grown by ``margin``, in the frame."""
        lo = points.min(0).values - margin
        hi = points.max(0).values + margin
        x0, y0 = max(0, int(np.floor(float(lo[0])))), max(0, int(np.floor(float(lo[1]))))
        x1, y1 = min(self.size, int(np.ceil(float(hi[0]))) + 1), min(self.size, int(np.ceil(float(hi[1]))) + 1)
        if even:  # half-resolution evaluation: an even number of pixels each way
            x1 -= (x1 - x0) % 2
            y1 -= (y1 - y0) % 2
        return x0, y0, max(x0, x1), max(y0, y1)

    def _refine(self, flow: torch.Tensor, spline: Spline, box: tuple[int, int, int, int], stride: int) -> None:
        """Evaluate the spline exactly in ``box`` (every ``stride`` pixels) and feather it into ``flow [S, S, 2]``."""
        x0, y0, x1, y1 = box
        w, h = (x1 - x0) // stride, (y1 - y0) // stride
        if w < 4 or h < 4:
            return
        xs = x0 + stride * torch.arange(w, dtype=torch.float32, device=self.device) + (stride - 1) / 2
        ys = y0 + stride * torch.arange(h, dtype=torch.float32, device=self.device) + (stride - 1) / 2
        q = (2.0 * xs + 1.0) / self.size - 1.0, (2.0 * ys + 1.0) / self.size - 1.0
        fine = self.evaluate(spline, q[0], q[1], False).reshape(h, w, 2)
        if stride > 1:
            fine = F.interpolate(fine.permute(2, 0, 1)[None], scale_factor=stride, mode="bilinear", align_corners=False)
            fine = fine[0].permute(1, 2, 0)
        hh, ww = fine.shape[:2]
        feather = 4.0 * stride
        ry = torch.arange(hh, dtype=torch.float32, device=self.device)
        rx = torch.arange(ww, dtype=torch.float32, device=self.device)
        fy = torch.minimum(ry + 0.5, hh - 0.5 - ry) / feather
        fx = torch.minimum(rx + 0.5, ww - 0.5 - rx) / feather
        f = torch.minimum(fy[:, None], fx[None, :]).clamp(0.0, 1.0)[..., None]
        region = flow[y0 : y0 + hh, x0 : x0 + ww]
        region.mul_(1 - f).add_(fine * f)


def _keep_apart(
    driven: torch.Tensor,
    upper: torch.Tensor,
    lower: torch.Tensor,
    least: torch.Tensor,
    soft: torch.Tensor,
    move_upper: bool,
) -> torch.Tensor:
    """Points ``driven[:, upper]`` stay at least ``least`` ``[B, P]`` above ``driven[:, lower]`` (a softplus limit
    of softness ``soft`` ``[B, P]``, exact once the gap exceeds the limit by 20 x ``soft``); the upper or the lower
    point of each pair gives way."""
    gap = driven[:, lower, 1] - driven[:, upper, 1]
    kept = least + soft * F.softplus((gap - least) / soft)
    driven = driven.clone()
    if move_upper:
        driven[:, upper, 1] = driven[:, lower, 1] - kept
    else:
        driven[:, lower, 1] = driven[:, upper, 1] + kept
    return driven


def _to_px(points: torch.Tensor, size: int) -> torch.Tensor:
    """Normalised crop coordinates -> pixel coordinates."""
    return ((points + 1.0) * size - 1.0) / 2.0


def _output_to_source(aff: torch.Tensor, size: int) -> torch.Tensor:
    """Inverse of the head affine ``[B, 2, 3]`` (normalised, source -> output) as output px -> source px."""
    b = aff.shape[0]
    full = torch.zeros(b, 3, 3, dtype=torch.float64, device=aff.device)
    full[:, :2] = aff.double()
    full[:, 2, 2] = 1.0
    c = torch.tensor([[size / 2, 0.0, (size - 1) / 2], [0.0, size / 2, (size - 1) / 2], [0.0, 0.0, 1.0]],
                     dtype=torch.float64, device=aff.device)  # fmt: skip
    m = c @ torch.linalg.inv(full) @ torch.linalg.inv(c)
    return m[:, :2].float()


def _to_device(mouth: MouthSource, device: torch.device) -> MouthSource:
    return MouthSource(mouth.split.to(device), mouth.lip.to(device), mouth.light)
