"""Weight-free warp-only renderer (classic mode): a spline warp driven by the 21 keypoints, plus eye and mouth layers.

Keypoints come from 68-point landmarks (``engine68`` / iBUG order) so the region sets of ``engine.keypoints``
land on the matching facial parts: LIP on mouth corners, inner lip edges and chin, EYE on the lids and glabella,
EMOTION adds the brows. Coordinates are normalised crop coordinates in [-1, 1] (x right, y down, z 0), the
``grid_sample(align_corners=False)`` convention, so pixel ``p`` maps to ``(2 p + 1) / S - 1``.

Rendering (see ``docs/controls.md``):

* the head pose is an affine map fitted to rigid anchor keypoints; what is left of each keypoint's motion is
  expression, which drives ~150 control points derived from the landmarks (``engine.render.classic_mesh``);
* a polyharmonic spline through the driven control points is the backward warp, evaluated on a coarse grid and
  upsampled, and at half resolution around the lips, where they part along a seam a few pixels wide;
* in the driven eye and mouth openings, layers replace what a warp cannot show (``engine.render.classic_layers``):
  an eyeball under sliding upper lids, and a mouth interior that keeps the photo's own teeth.

With no motion the output is the portrait itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from engine.avatar.landmarks import CLASSIC_SCHEMES
from engine.avatar.record import Avatar
from engine.keypoints import NUM_KP, MotionParams, SourceFace, keypoints_from_params
from engine.render.base import PreparedAvatar
from engine.render.classic_layers import (
    EyeSource,
    MouthSource,
    eye_curves,
    eye_layer,
    eye_source,
    lower_lip_layer,
    mouth_layer,
    mouth_source,
)
from engine.render.classic_mesh import ANCHORS, Spline, apply_affine, build_mesh, eval_spline, fit_affine, solve_spline

UPPER_INNER_LIP = (61, 62, 63)  # over LOWER_INNER_LIP
LOWER_INNER_LIP = (67, 66, 65)
LID_LANDMARKS = (37, 38, 43, 44)  # upper-lid landmarks, and the lower-lid ones below them, the lid keypoints
LID_BELOW = (41, 40, 47, 46)
LID_KEYPOINT = (11, 11, 15, 15)
SOFT_LID_PX = 1.0  # the lid clamp's softness: an upper lid never crosses the lower one
MIN_LID_GAP_PX = 0.5


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


def keypoints_from_landmarks(landmarks: np.ndarray, size: int) -> np.ndarray:
    """68-point landmarks ``[68, 2]`` (crop pixels) -> classic keypoints ``[21, 3]`` normalised, z = 0."""
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (68, 2):
        raise ValueError(f"classic mode needs 68-point landmarks [68, 2], got shape {lm.shape}")

    def mean(*idx: int) -> np.ndarray:
        return lm[list(idx)].mean(axis=0)

    eye_l, eye_r = mean(36, 37, 38, 39, 40, 41), mean(42, 43, 44, 45, 46, 47)
    iod = float(np.linalg.norm(eye_r - eye_l))
    down = np.array([0.0, 1.0])
    kp = np.stack(
        [
            mean(19, 24) - 0.45 * iod * down,  # 0 forehead
            mean(18, 19, 20),  # 1 left brow
            mean(23, 24, 25),  # 2 right brow
            lm[30],  # 3 nose tip
            mean(3, 31, 41),  # 4 left cheek
            mean(13, 35, 46),  # 5 right cheek
            lm[48],  # 6 left mouth corner
            lm[5],  # 7 left jaw
            lm[11],  # 8 right jaw
            lm[28],  # 9 nose bridge
            lm[8] + 0.45 * iod * down,  # 10 neck
            mean(37, 38),  # 11 left upper lid
            lm[54],  # 12 right mouth corner
            mean(40, 41),  # 13 left lower lid
            lm[62],  # 14 upper lip (inner edge: the seam is where the warp must tear)
            mean(43, 44),  # 15 right upper lid
            mean(46, 47),  # 16 right lower lid
            lm[66],  # 17 lower lip (inner edge)
            mean(21, 22),  # 18 glabella
            lm[8],  # 19 chin
            0.5 * (lm[57] + lm[8]),  # 20 below the lower lip
        ]
    )
    norm = (2.0 * kp + 1.0) / size - 1.0
    return np.concatenate([norm, np.zeros((NUM_KP, 1))], axis=1).astype(np.float32)


def source_face(landmarks: np.ndarray, size: int) -> SourceFace:
    """Classic :class:`SourceFace`: canonical = source keypoints, identity params (scale 1, no pose, exp 0)."""
    kp = torch.from_numpy(keypoints_from_landmarks(landmarks, size))
    params = MotionParams(
        scale=torch.ones(1, 1),
        pitch=torch.zeros(1),
        yaw=torch.zeros(1),
        roll=torch.zeros(1),
        t=torch.zeros(1, 3),
        exp=torch.zeros(1, NUM_KP, 3),
    )
    return SourceFace(kp, params, keypoints_from_params(kp[None], params)[0])


def face_size(source: SourceFace) -> float:
    """Inter-ocular distance in normalised units (eye keypoints 11/13 and 15/16)."""
    kp = source.kp_canonical
    left, right = (kp[11] + kp[13]) / 2, (kp[15] + kp[16]) / 2
    return float(torch.linalg.vector_norm(right[:2] - left[:2]))


def _sample(image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear 2-D sampling of the portrait (ATen's on any device: the fused kernels are the 3-D warps of the
    neural renderer, and a 2-D grid sample is already one memory-bound pass)."""
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)


class ClassicRenderer:
    """Warp-only renderer (no learned weights).

    ``flow_size``: resolution of the coarse spline evaluation (upsampled); the eyes are evaluated at full and the
    mouth at half resolution in windows around them, where lids and lips need sharp motion.
    """

    name = "classic"
    untrained = False
    CPU_CHUNK = 4  # frames rendered at once on a CPU

    def __init__(self, size: int = 512, flow_size: int = 64, device: str | torch.device = "cpu") -> None:
        if size <= 0 or flow_size <= 0:
            raise ValueError(f"size and flow_size must be positive, got {size}, {flow_size}")
        self.size = size
        self.flow_size = flow_size
        self.device = torch.device(device)
        lin = (2.0 * torch.arange(flow_size, dtype=torch.float32) + 1.0) / flow_size - 1.0
        gy, gx = torch.meshgrid(lin, lin, indexing="ij")
        self._query = torch.stack([gx, gy], -1).reshape(1, -1, 2).to(self.device)  # [1, F*F, 2]
        full = (2.0 * torch.arange(size, dtype=torch.float32) + 1.0) / size - 1.0
        fy, fx = torch.meshgrid(full, full, indexing="ij")
        self._base = torch.stack([fx, fy], -1)[None].to(self.device)  # [1, S, S, 2]

    def prepare(self, avatar: Avatar) -> PreparedAvatar:
        if avatar.landmarks is None:
            raise ValueError(
                f"avatar {avatar.name!r} has no landmarks, which classic mode needs: import the face detector "
                "models ('engine weights import ...') or pass --landmarks when adding the avatar"
            )
        if avatar.landmark_scheme not in CLASSIC_SCHEMES or np.shape(avatar.landmarks) != (68, 2):
            raise ValueError(
                f"avatar {avatar.name!r}: classic mode needs 68-point landmarks ({', '.join(CLASSIC_SCHEMES)}), "
                f"got scheme {avatar.landmark_scheme!r} with shape {np.shape(avatar.landmarks)}"
            )
        crop = avatar.crop
        if crop.shape[:2] != (self.size, self.size):
            raise ValueError(f"avatar crop must be {self.size}x{self.size}, got {crop.shape[:2]}")
        landmarks = np.asarray(avatar.landmarks, dtype=np.float64)
        if not np.isfinite(landmarks).all():
            raise ValueError(f"avatar {avatar.name!r}: its landmarks contain NaN or infinite values")
        eyes = float(np.linalg.norm(landmarks[42:48].mean(axis=0) - landmarks[36:42].mean(axis=0)))
        if eyes < 8.0:
            raise ValueError(
                f"avatar {avatar.name!r}: the eyes of its landmarks are {eyes:.1f} px apart in the {self.size} px "
                "crop; classic mode needs a face (eyes at least 8 px apart), check the landmarks"
            )
        source = source_face(landmarks, self.size)
        iod = face_size(source)
        portrait = torch.from_numpy(crop).permute(2, 0, 1).float().div(255.0)
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

    def drive(self, prepared: PreparedAvatar, params: MotionParams) -> torch.Tensor:
        """No stitching network in classic mode: the transformed keypoints ``[B, 21, 3]`` as they are."""
        kp_c = prepared.source.kp_canonical[None].expand(params.exp.shape[0], -1, -1)
        return keypoints_from_params(kp_c, params)

    def render(self, prepared: Sequence[PreparedAvatar], kp_driving: torch.Tensor) -> torch.Tensor:
        if kp_driving.shape != (len(prepared), NUM_KP, 3):
            raise ValueError(f"kp_driving must be [{len(prepared)}, {NUM_KP}, 3], got {tuple(kp_driving.shape)}")
        if self.device.type == "cpu" and len(prepared) > self.CPU_CHUNK:
            # a CPU gains nothing from wide batches here (the cost is per frame), and each frame's intermediate
            # tensors are ~30 MB: chunks keep a batch of 16 from holding half a gigabyte at once
            return torch.cat(
                [
                    self.render(prepared[i : i + self.CPU_CHUNK], kp_driving[i : i + self.CPU_CHUNK])
                    for i in range(0, len(prepared), self.CPU_CHUNK)
                ]
            )
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

        flow = eval_spline(spline, self._query.expand(b, -1, -1))  # [B, F*F, 2]
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
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        q = (2.0 * torch.stack([gx, gy], -1) + 1.0) / self.size - 1.0  # [h, w, 2]
        fine = eval_spline(spline, q.reshape(1, -1, 2)).reshape(h, w, 2)
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
