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

Cost (CPU, 512 px, 64x64 coarse flow): the grid sample of the whole frame is about a quarter of a frame, the spline
(solve, coarse grid, lip refinement) another quarter, the layers most of the rest. The layers are small windows:
their per-frame geometry is numpy, and all windows of one avatar in a batch go through one set of tensor ops. The
spline is float32 except where control points are squeezed together: their weights run into the thousands, and
those centers are evaluated in float64 (their float32 rounding moved the crop border by pixels).
"""

from __future__ import annotations

import functools
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
    Blend,
    Box,
    EyeJob,
    EyeSource,
    LidSource,
    MouthJob,
    MouthSource,
    eye_curves,
    eye_layers,
    eye_source,
    lid_source,
    lower_lip_layers,
    mouth_layers,
    mouth_source,
)
from engine.render.classic_mesh import (
    ANCHORS,
    MeshSpec,
    Spline,
    apply_affine,
    build_mesh,
    eval_spline_grid,
    solve_spline,
)

UPPER_INNER_LIP = (61, 62, 63)  # over LOWER_INNER_LIP
LOWER_INNER_LIP = (67, 66, 65)
LID_LANDMARKS = (37, 38, 43, 44)  # upper-lid landmarks, and the lower-lid ones below them, the lid keypoints
LID_BELOW = (41, 40, 47, 46)
LID_KEYPOINT = (11, 11, 15, 15)
SOFT_LID_PX = 1.0  # the lid clamp's softness: an upper lid never crosses the lower one
MIN_LID_GAP_PX = 0.5
# Spline centers with a weight above this are evaluated in float64 on the coarse grid (see eval_spline_grid): only
# squeezed control points (lips pressed shut) get such weights, whose float32 rounding noise shook the crop border
# by 1.3-2.3 px; with them exact the rest leaves <= 0.2 px, as in any other frame.
EXACT_WEIGHT = 256.0


class KeptApart(NamedTuple):
    """Control point pairs kept apart, one direction (see ``ClassicRenderer._clamp_gaps``); per avatar."""

    upper: torch.Tensor  # [P] control point index of the upper point of each pair
    lower: torch.Tensor  # [P] ... of the lower point
    least: torch.Tensor  # [P] the least gap (normalised)
    soft: torch.Tensor  # [P] softness of the limit (normalised)
    move_upper: bool  # which point of each pair gives way


class ClassicState(NamedTuple):
    portrait: torch.Tensor  # [3, S, S] float in [0, 1]
    iod: float  # inter-ocular distance, normalised units
    mesh: torch.Tensor  # [M, 2] source control points (normalised)
    wx: torch.Tensor  # [M, 21] keypoint-residual weights of each control point, x
    wy: torch.Tensor  # [M, 21] ... y
    fixed: torch.Tensor  # [M] bool: crop-border anchors
    apart: tuple[KeptApart, KeptApart]  # upper points give way, then lower points (see MeshSpec.apart)
    head_fit: torch.Tensor  # [3, A] float64: least-squares affine from the source ANCHORS to where they are driven
    landmark_index: np.ndarray  # [68] control point index of each landmark
    lid_points: np.ndarray  # [4, 2] source control points of LID_LANDMARKS (normalised)
    lid_scale: np.ndarray  # [4] lid travel per unit of lid keypoint offset, for LID_LANDMARKS
    creases: np.ndarray  # [4] control point index of the crease above each of LID_LANDMARKS
    eyes: EyeSource
    lids: tuple[LidSource, LidSource]  # the portrait's upper lids, left and right eye
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
        self._lin = lin.to(self.device)  # [F] coarse grid coordinates, x and y alike
        full = (2.0 * torch.arange(size, dtype=torch.float32) + 1.0) / size - 1.0
        fy, fx = torch.meshgrid(full, full, indexing="ij")
        self._base = torch.stack([fx, fy], -1)[None].to(self.device)  # [1, S, S, 2]
        self._up = _upsampling(size, flow_size, self.device)

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
        iod_px = iod * self.size / 2
        dev = self.device
        mesh = torch.from_numpy(spec.points).float().to(dev)
        lid_index = spec.landmark_index[list(LID_LANDMARKS)]
        creases = spec.crease_index[list(LID_LANDMARKS)]
        creases_px = _to_px(spec.points[creases], self.size)
        lids = tuple(lid_source(eye_curves(landmarks, creases_px[2 * eye : 2 * eye + 2], eye)) for eye in (0, 1))
        mouth = mouth_source(portrait, landmarks, iod_px)
        state = ClassicState(
            portrait=portrait.to(dev),
            iod=iod,
            mesh=mesh,
            wx=torch.from_numpy(spec.wx).float().to(dev),
            wy=torch.from_numpy(spec.wy).float().to(dev),
            fixed=torch.from_numpy(spec.fixed).to(dev),
            apart=(self._kept_apart(spec, mesh, True), self._kept_apart(spec, mesh, False)),
            head_fit=_head_fit(source.kp_source[list(ANCHORS), :2].double()).to(dev),
            landmark_index=spec.landmark_index,
            lid_points=spec.points[lid_index],
            lid_scale=spec.lid_scale[list(LID_LANDMARKS)],
            creases=creases,
            eyes=EyeSource(eye_source(portrait, landmarks, iod_px).texture.to(dev)),
            lids=(lids[0], lids[1]),
            mouth=mouth._replace(lip=mouth.lip.to(dev)),
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
        size = self.size
        kp_d = kp_driving[..., :2].to(self.device, torch.float32)
        kp_s = torch.stack([p.source.kp_source[:, :2] for p in prepared]).to(self.device, torch.float32)
        anchors = list(ANCHORS)
        fit = _stack([s.head_fit for s in states])  # [B, 3, A]: the source anchors' part of the least squares
        aff = (fit @ kp_d[:, anchors].double()).transpose(1, 2).float()  # [B, 2, 3] head motion
        res = kp_d - apply_affine(aff, kp_s)  # [B, 21, 2] expression
        mesh = _stack([s.mesh for s in states])  # [B, M, 2]
        rx = (_stack([s.wx for s in states]) @ res[..., 0:1])[..., 0]
        ry = (_stack([s.wy for s in states]) @ res[..., 1:2])[..., 0]
        moved = apply_affine(aff, mesh) + torch.stack([rx, ry], -1)
        driven = torch.where(_stack([s.fixed for s in states])[..., None], mesh, moved)
        wanted = driven
        driven = self._clamp_gaps(driven, states)
        spline = solve_spline(driven, mesh - driven)  # backward displacement at the driven points
        flow = eval_spline_grid(spline, self._lin, self._lin, EXACT_WEIGHT)  # [B, 2, F, F]
        grid = self._upsample(flow)  # [B, S, S, 2]

        # the rest of the per-frame geometry is a few dozen points: numpy, one copy from the device
        driven_np, wanted_np = _numpy(driven), _numpy(wanted)
        aff_np, res_np = _numpy(aff), _numpy(res)
        lm_px = [_to_px(driven_np[i, s.landmark_index], size) for i, s in enumerate(states)]
        lids, travel = self._full_lids(aff_np, res_np, lm_px, states)
        lower = list(LOWER_INNER_LIP)
        closing = []  # how far the warp held each lower lip below where the motion wants it (pixels)
        for i, s in enumerate(states):
            lm_px[i][list(LID_LANDMARKS)] = lids[i]
            want = _to_px(wanted_np[i, s.landmark_index[lower]], size)
            upper = lm_px[i][list(UPPER_INNER_LIP)]
            want[:, 1] = np.maximum(want[:, 1], upper[:, 1] + MIN_LID_GAP_PX)  # lips meet, never cross
            closing.append(float((lm_px[i][lower, 1] - want[:, 1]).max()))
            lm_px[i][lower] = want
        creases = [_to_px(driven_np[i, s.creases], size) for i, s in enumerate(states)]
        for i, s in enumerate(states):
            # the lips part along a seam a few pixels wide: evaluate the spline there at half resolution
            one = Spline(spline.centers[i : i + 1], spline.weights[i : i + 1], spline.affine[i : i + 1])
            self._refine(grid[i], one, self._box(lm_px[i][48:68], 0.15 * s.iod * size / 2, even=True), 2)
        out = self._warp([s.portrait for s in states], grid)  # [B, 3, S, S]
        blends = self._layers(states, lm_px, creases, closing, aff_np, res_np, travel)
        for blend in blends:
            x0, y0, x1, y1 = blend.box
            out[blend.frame, :, y0:y1, x0:x1].lerp_(blend.layer, blend.alpha)
        for frame, (x0, y0, x1, y1) in {(blend.frame, blend.box) for blend in blends}:  # in [0, 1] like the warp
            out[frame, :, y0:y1, x0:x1].clamp_(0.0, 1.0)
        return out

    # --- internals ---

    def _layers(
        self,
        states: Sequence[ClassicState],
        lm_px: list[np.ndarray],
        creases: list[np.ndarray],
        closing: list[float],
        aff: np.ndarray,
        res: np.ndarray,
        travel: np.ndarray,
    ) -> list[Blend]:
        """The eye, mouth and lower lip layers of the batch, in the order they are blended."""
        size = self.size
        to_source = _output_to_source(aff, size)  # [B, 2, 3] output pixels -> portrait pixels, head motion only
        det = np.abs(aff[:, 0, 0] * aff[:, 1, 1] - aff[:, 0, 1] * aff[:, 1, 0]).clip(min=1e-6)
        gaze = res[:, [11, 15], 0] * size / 2  # [B, 2] eyeball shift in output pixels
        groups: dict[int, list[int]] = {}  # the frames of each avatar: their layers are computed together
        for i, s in enumerate(states):
            groups.setdefault(id(s), []).append(i)
        blends = []
        for frames in groups.values():
            s = states[frames[0]]
            eyes: list[EyeJob] = []
            mouths: list[MouthJob] = []
            lips: list[MouthJob] = []
            for i in frames:
                for eye in (0, 1):
                    pair = slice(2 * eye, 2 * eye + 2)
                    curves_d = eye_curves(lm_px[i], creases[i][pair], eye)
                    box = self._box(np.concatenate([curves_d.lash, curves_d.lower, curves_d.crease]), 3.0)
                    if box[2] - box[0] >= 2 and box[3] - box[1] >= 2:  # else the eye left the frame
                        gaze_px, travel_px = float(gaze[i, eye]), float(np.abs(travel[i, pair]).mean())
                        eyes.append(EyeJob(i, box, curves_d, s.lids[eye], to_source[i], gaze_px, travel_px))
                box = self._box(lm_px[i][60:68], 3.0)
                if box[2] - box[0] < 2 or box[3] - box[1] < 2:
                    continue
                scale = float(det[i] ** -0.5)
                mouths.append(MouthJob(i, box, lm_px[i], scale, s.iod * size / 2 / scale))
                if closing[i] > 0.05:  # the lower lip rises over what the warp left open
                    lip_box = self._box(lm_px[i][48:68], 3.0)
                    lips.append(MouthJob(i, lip_box, lm_px[i], scale, 0.0, min(1.0, closing[i] / 2.0)))
            blends += eye_layers(s.portrait, s.eyes, eyes)
            blends += mouth_layers(s.portrait, s.mouth, mouths)
            blends += lower_lip_layers(s.portrait, s.mouth, lips)
        return blends

    def _kept_apart(self, spec: MeshSpec, mesh: torch.Tensor, move_upper: bool) -> KeptApart:
        """The pairs of ``spec.apart`` whose upper (``move_upper``) or lower point gives way, with their least gap
        and softness on this avatar (see :meth:`_clamp_gaps`)."""
        unit = 2.0 / self.size
        pick = torch.from_numpy(spec.apart_upper == move_upper)
        upper = torch.from_numpy(spec.apart[:, 0])[pick].to(mesh.device)
        lower = torch.from_numpy(spec.apart[:, 1])[pick].to(mesh.device)
        share = torch.from_numpy(spec.apart_share)[pick].float().to(mesh.device)
        own = (mesh[lower, 1] - mesh[upper, 1]).clamp_min(0.0)  # [P]
        least = torch.clamp(share * own, min=MIN_LID_GAP_PX * unit)
        soft = ((own - least) / 25.0).clamp(1e-5, SOFT_LID_PX * unit)  # exact 20 softnesses away
        return KeptApart(upper, lower, least, soft, move_upper)

    def _clamp_gaps(self, driven: torch.Tensor, states: Sequence[ClassicState]) -> torch.Tensor:
        """Keep control points that sit above each other from crossing or squeezing together, which would fold the
        spline (a brow pushed into the eye, a mouth closed over its own open lips): each pair keeps at least its
        share of the portrait's own gap, softly, and exactly where the portrait itself is."""
        for k, pairs in enumerate(states[0].apart):  # the same mesh layout for every avatar
            least = _stack([s.apart[k].least for s in states])  # [B, P]
            soft = _stack([s.apart[k].soft for s in states])
            driven = _keep_apart(driven, pairs.upper, pairs.lower, least, soft, pairs.move_upper)
        return driven

    def _full_lids(
        self, aff: np.ndarray, res: np.ndarray, lm_px: list[np.ndarray], states: Sequence[ClassicState]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Upper-lid landmarks with the whole lid travel (the spline moved them SPLINE_LID_SHARE of it), pixels
        ``[B, 4, 2]``: head motion + lid keypoint offset x lid scale, softly kept above the driven lower lid; and
        the travel ``[B, 4]`` (pixels)."""
        src = np.stack([s.lid_points for s in states])  # [B, 4, 2]
        travel = res[:, list(LID_KEYPOINT), 1] * np.stack([s.lid_scale for s in states])  # [B, 4]
        lids = _to_px(src @ aff[:, :, :2].transpose(0, 2, 1) + aff[:, None, :, 2], self.size)
        lids[..., 1] += travel * self.size / 2
        lower = np.stack([px[list(LID_BELOW)] for px in lm_px])  # [B, 4, 2]
        gap = lower[..., 1] - lids[..., 1]
        lids[..., 1] = lower[..., 1] - (MIN_LID_GAP_PX + _softplus(gap - MIN_LID_GAP_PX, SOFT_LID_PX))
        return lids, travel * self.size / 2

    def _box(self, points: np.ndarray, margin: float, even: bool = False) -> Box:
        """Integer window (x0, y0, x1, y1) around ``points [N, 2]`` (pixels) grown by ``margin``, in the frame."""
        lo = points.min(0) - margin
        hi = points.max(0) + margin
        x0, y0 = max(0, int(np.floor(lo[0]))), max(0, int(np.floor(lo[1])))
        x1, y1 = min(self.size, int(np.ceil(hi[0])) + 1), min(self.size, int(np.ceil(hi[1])) + 1)
        if even:  # half-resolution evaluation: an even number of pixels each way
            x1 -= (x1 - x0) % 2
            y1 -= (y1 - y0) % 2
        return x0, y0, max(x0, x1), max(y0, y1)

    def _warp(self, portraits: list[torch.Tensor], grid: torch.Tensor) -> torch.Tensor:
        """The portraits ``[3, S, S]`` sampled at ``grid [B, S, S, 2]`` -> ``[B, 3, S, S]``, clamped to [0, 1].

        ATen's CPU grid sample shares out a batch among threads frame by frame: a frame of one avatar on a CPU
        with threads to spare is sampled as a batch of bands of rows, put back together by the clamp."""
        b, size = grid.shape[0], self.size
        if any(p is not portraits[0] for p in portraits):
            return _sample(torch.stack(portraits), grid).clamp_(0.0, 1.0)
        bands = max(1, torch.get_num_threads() // b) if self.device.type == "cpu" else 1
        while size % bands:
            bands -= 1
        if bands == 1:
            return _sample(portraits[0][None].expand(b, -1, -1, -1), grid).clamp_(0.0, 1.0)
        image = portraits[0][None].expand(b * bands, -1, -1, -1)  # one avatar: no copy of its portrait
        sampled = _sample(image, grid.view(b * bands, size // bands, size, 2))  # [B * bands, 3, S / bands, S]
        out = torch.empty(b, image.shape[1], size, size, dtype=sampled.dtype, device=sampled.device)
        bands_view = sampled.view(b, bands, -1, size // bands, size).transpose(1, 2)
        torch.clamp(bands_view, 0.0, 1.0, out=out.view(b, -1, bands, size // bands, size))
        return out

    def _upsample(self, coarse: torch.Tensor) -> torch.Tensor:
        """Sampling grid ``[B, S, S, 2]``: the pixel centres plus the coarse flow ``[B, 2, F, F]`` upsampled.

        The taps and weights of ``F.interpolate(mode="bilinear", align_corners=False)``, columns then rows, written
        channels last (as grid_sample reads it: no permuted copy), with the pixel grid added on the way: to the
        columns after their pass, and as the coarse rows' own y before the rows' pass (a linear function
        interpolates to itself), corrected on the few edge rows that clamp to the first or last coarse row."""
        up = self._up
        b, size, f = coarse.shape[0], self.size, self.flow_size
        cols = coarse @ up.columns  # [B, 2, F, S] (two taps per column: a small product beats two gathers)
        rows = cols.permute(0, 2, 3, 1).contiguous().add_(up.base)  # [B, F, S, 2]
        top, bottom = len(up.fix_top), len(up.fix_bottom)
        if up.block is not None:  # whole runs of output rows per coarse row: broadcast, no gathered copies
            grid = torch.empty(b, size, size, 2, dtype=rows.dtype, device=rows.device)
            inner = grid[:, top : size - bottom].view(b, f - 1, -1, size, 2)
            torch.lerp(rows[:, :-1, None], rows[:, 1:, None], up.block, out=inner)
            grid[:, :top] = rows[:, :1]
            grid[:, size - bottom :] = rows[:, -1:]
        else:
            grid = torch.lerp(rows.index_select(1, up.i0), rows.index_select(1, up.i1), up.w1[:, None, None])
        grid[:, :top, :, 1] += up.fix_top
        grid[:, size - bottom :, :, 1] += up.fix_bottom
        return grid

    def _refine(self, grid: torch.Tensor, spline: Spline, box: Box, stride: int) -> None:
        """Evaluate the spline exactly in ``box`` (every ``stride`` pixels) and feather it into ``grid [S, S, 2]``."""
        x0, y0, x1, y1 = box
        w, h = (x1 - x0) // stride, (y1 - y0) // stride
        if w < 4 or h < 4:
            return
        # sample positions (normalised) every `stride` pixels: exact in float32 (half-integers over a power of 2)
        xs = (2.0 * (x0 + stride * np.arange(w) + (stride - 1) / 2) + 1.0) / self.size - 1.0
        ys = (2.0 * (y0 + stride * np.arange(h) + (stride - 1) / 2) + 1.0) / self.size - 1.0
        axes = torch.from_numpy(np.concatenate([xs, ys]).astype(np.float32)).to(self.device)
        fine = eval_spline_grid(spline, axes[:w], axes[w:])
        if stride > 1:
            fine = F.interpolate(fine, scale_factor=stride, mode="bilinear", align_corners=False)
        fine = fine[0].permute(1, 2, 0)  # [hh, ww, 2]
        hh, ww = fine.shape[:2]
        region = grid[y0 : y0 + hh, x0 : x0 + ww]
        region.lerp_(fine.add_(self._base[0, y0 : y0 + hh, x0 : x0 + ww]), _feather(hh, ww, 4.0 * stride, self.device))


@functools.lru_cache(maxsize=64)
def _feather(h: int, w: int, width: float, device: torch.device) -> torch.Tensor:
    """``[h, w, 1]``: 0 at the border of a window, 1 from ``width`` pixels inside it, linear between."""
    ry, rx = np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64)
    fy = np.minimum(ry + 0.5, h - 0.5 - ry) / width
    fx = np.minimum(rx + 0.5, w - 0.5 - rx) / width
    f = np.minimum(fy[:, None], fx[None, :]).clip(0.0, 1.0)[..., None]
    return torch.from_numpy(f.astype(np.float32)).to(device)


class _Upsampling(NamedTuple):
    """Tables of ``ClassicRenderer._upsample`` (coarse ``F`` -> ``S``, bilinear, ``align_corners=False``)."""

    columns: torch.Tensor  # [F, S] weights of the coarse columns in each output column
    i0: torch.Tensor  # [S] first source tap of each output row
    i1: torch.Tensor  # [S] second tap
    w1: torch.Tensor  # [S] weight of the second tap
    base: torch.Tensor  # [F, S, 2]: x of each output column, y of each coarse row (normalised)
    block: torch.Tensor | None  # [S / F, 1, 1] weights of one run of output rows when F divides S, else None
    fix_top: torch.Tensor  # [T, 1]: y of the T top output rows minus that of the coarse row they clamp to
    fix_bottom: torch.Tensor  # [T', 1]: ... the bottom rows


def _upsampling(size: int, coarse: int, device: torch.device) -> _Upsampling:
    """Taps and weights as ATen's bilinear upsampling computes them (float32, source clamped at the edges)."""
    scale = torch.tensor(coarse / size, dtype=torch.float32)
    raw = scale * (torch.arange(size, dtype=torch.float32) + 0.5) - 0.5
    src = raw.clamp_min(0.0)
    i0 = src.long().clamp(max=coarse - 1)
    i1 = torch.where(i0 < coarse - 1, i0 + 1, i0)
    w1 = src - i0
    fine = (2.0 * torch.arange(size, dtype=torch.float32) + 1.0) / size - 1.0
    lin = (2.0 * torch.arange(coarse, dtype=torch.float32) + 1.0) / coarse - 1.0
    base = torch.stack([fine[None].expand(coarse, -1), lin[:, None].expand(-1, size)], -1)
    top, bottom = int((raw < 0).sum()), int((raw >= coarse - 1).sum())
    block = None
    if size % coarse == 0 and coarse > 1:
        run = size // coarse
        block = w1[top : top + run].reshape(run, 1, 1)
    columns = torch.zeros(coarse, size)
    columns[i0, torch.arange(size)] += 1.0 - w1
    columns[i1, torch.arange(size)] += w1
    return _Upsampling(
        columns.to(device),
        i0.to(device),
        i1.to(device),
        w1.to(device),
        base.contiguous().to(device),
        None if block is None else block.to(device),
        (fine[:top] - lin[0])[:, None].to(device),
        (fine[size - bottom :] - lin[-1])[:, None].to(device),
    )


def _head_fit(anchors: torch.Tensor) -> torch.Tensor:
    """``[3, A]``: the least-squares affine ``[2, 3]`` taking the source anchors ``[A, 2]`` (float64) to points
    ``dst [A, 2]`` is ``(fit @ dst)^T`` (what ``classic_mesh.fit_affine`` solves, with the source's part done once)."""
    return torch.linalg.pinv(torch.cat([anchors, torch.ones_like(anchors[:, :1])], 1))


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack`` without the copy for a batch of one."""
    return tensors[0][None] if len(tensors) == 1 else torch.stack(tensors)


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float64)


def _softplus(x: np.ndarray, softness: float) -> np.ndarray:
    """``F.softplus(x, beta=1 / softness, threshold=20)``."""
    bx = x / softness
    return np.where(bx > 20.0, x, np.log1p(np.exp(np.minimum(bx, 20.0))) * softness)


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


def _to_px(points: np.ndarray, size: int) -> np.ndarray:
    """Normalised crop coordinates -> pixel coordinates."""
    return ((points + 1.0) * size - 1.0) / 2.0


def _output_to_source(aff: np.ndarray, size: int) -> np.ndarray:
    """Inverse of the head affine ``[B, 2, 3]`` (normalised, source -> output) as output px -> source px."""
    m, t = aff[:, :, :2], aff[:, :, 2]
    det = m[:, 0, 0] * m[:, 1, 1] - m[:, 0, 1] * m[:, 1, 0]
    inv = (
        np.stack([np.stack([m[:, 1, 1], -m[:, 0, 1]], -1), np.stack([-m[:, 1, 0], m[:, 0, 0]], -1)], 1)
        / det[:, None, None]
    )
    half, mid = size / 2, (size - 1) / 2  # pixel p is normalised (p - mid) / half
    shift = mid - inv.sum(-1) * mid - half * (inv @ t[..., None])[..., 0]
    return np.concatenate([inv, shift[..., None]], -1)
