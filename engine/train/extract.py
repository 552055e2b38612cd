"""One clip -> per-frame motion and audio features, in either motion space of the engine.

``mesh`` (weight-free, classic mode's space): the tracked 68-point mesh (:mod:`engine.train.tracking`) as
classic keypoints, split into a similarity head pose and the expression left after it:

* ``pose [T, 7]``: pitch, yaw (both 0: a flat mesh shows no out-of-plane rotation), roll (degrees), tx, ty (in
  inter-ocular distances, IOD), tz (0), scale, relative to the clip's reference frame;
* ``expr [T, 21, 3]``: the keypoints with the pose removed, in the reference frame's canonical axes (origin at the
  eye midpoint, eyes level, unit 1 IOD, z = 0) -- absolute, so two clips of one person compare;
* ``head [T, 21, 3]``: the displacement of each keypoint caused by the head's pose relative to the clip's mean pose
  (canonical axes, IOD units): what the IMDP head predicts;
* ``geometry [21, 3]``: the reference frame's canonical keypoints; ``landmarks [T, 68, 2]``; ``iod [1]``.

``keypoints`` (LivePortrait weights): the motion extractor on every frame's crop (LivePortrait's framing, the one
the tracker keeps): ``motion [T, 265]`` in Ditto's layout with the raw pose logits, ``pose`` (degrees, t, scale),
``expr`` (LivePortrait's expression delta), ``kp`` (driven keypoints), ``head`` (pose displacement / scale), and
``geometry`` (the mean canonical keypoints).

Audio: ``audio [T, 81]`` log-mel (80 bins) + loudness dB per 40 ms frame (:class:`engine.audio.LogMelFeatures`),
``hubert [T, 1024]`` when the user's HuBERT ONNX is given. ``valid [T]`` marks frames whose face was tracked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
import torch

from engine.audio.features import log_mel_offline
from engine.audio.hubert import HubertStreaming, hubert_offline
from engine.keypoints import NUM_KP, MotionParams, keypoints_from_params, params_from_motion
from engine.models.liveportrait import LivePortraitNets
from engine.motion.personal import canonical_axes
from engine.render.classic import keypoints_from_landmarks
from engine.train.tracking import STABLE, MeshTrack, MeshTracker, TrackerConfig, apply_similarity, fit_similarity
from engine.train.video import VideoError, iter_frames, read_video_audio

SPACES = ("mesh", "keypoints")
AUDIO_DIM = 81  # 80 log-mel bins + loudness dB
POSE_DIM = 7  # pitch, yaw, roll (degrees), tx, ty, tz, scale


class ClipError(VideoError):
    """A clip that cannot become training data (too short, face lost too often); the message says why."""


@dataclass(frozen=True)
class ExtractConfig:
    fps: int = 25
    spaces: tuple[str, ...] = ("mesh",)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    max_side: int = 720  # frames are scaled down to this longer side before tracking
    max_seconds: float = 600.0  # longer clips are cut
    min_frames: int = 25  # shorter clips are refused
    min_valid: float = 0.5  # clips with fewer tracked frames are refused
    batch: int = 16  # keypoint extractor batch

    def __post_init__(self) -> None:
        if self.fps != 25:
            raise ValueError(f"training data runs at the engine's 25 fps, got fps={self.fps}")
        if not self.spaces or any(s not in SPACES for s in self.spaces) or len(set(self.spaces)) != len(self.spaces):
            raise ValueError(f"spaces must be distinct names from {SPACES}, got {self.spaces}")
        if self.min_frames < 2 or not 0 < self.min_valid <= 1 or self.max_seconds <= 0 or self.batch < 1:
            raise ValueError(f"invalid extract config: {self}")


class ClipRecord(NamedTuple):
    arrays: dict[str, np.ndarray]  # "audio", "valid", "<space>/<name>", optional "hubert"
    meta: dict[str, Any]  # frames, spaces, face method, valid fraction, untrained extractor


def _forward_fill(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Invalid rows take the last valid row (rows before the first valid one take the first valid row)."""
    idx = np.where(valid, np.arange(len(valid)), -1)
    idx = np.maximum.accumulate(idx)
    first = int(np.argmax(valid)) if valid.any() else 0
    idx[idx < 0] = first
    return values[idx]


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.asarray(points, np.float64) @ np.array([[c, -s], [s, c]]).T


def mesh_motion(track: MeshTrack, size: int) -> dict[str, np.ndarray]:
    """A mesh track (working-crop pixels ``size``) -> the ``mesh`` arrays of the module docstring."""
    lm = track.landmarks.astype(np.float64)
    valid = track.valid
    t_count = lm.shape[0]
    norm = (2.0 * lm + 1.0) / size - 1.0  # [T, 68, 2]
    ref = track.reference if valid[track.reference] else int(np.argmax(valid))
    kps = np.stack([keypoints_from_landmarks(p, size)[:, :2] for p in lm]).astype(np.float64)  # [T, 21, 2]
    mid, phi, iod = canonical_axes(kps[ref])  # classic mode's eye distance: the lid keypoints
    stable = list(STABLE)
    sims = np.zeros((t_count, 4))  # s, theta, tx, ty
    expr = np.zeros((t_count, NUM_KP, 2))
    for t in range(t_count):
        s, theta, shift = fit_similarity(norm[ref, stable], norm[t, stable])
        sims[t] = (s, theta, *shift)
        # undo the pose: back into the reference frame, then into its canonical axes
        back = apply_similarity(kps[t] - shift, 1.0 / s, -theta, np.zeros(2))
        expr[t] = _rotate(back - mid, -phi) / iod
    sims = _forward_fill(sims, valid)
    expr = _forward_fill(expr, valid)
    pose = np.zeros((t_count, 7))
    pose[:, 2] = np.degrees(sims[:, 1])
    pose[:, 3:5] = sims[:, 2:4] / iod
    pose[:, 6] = sims[:, 0]
    # the head's displacement relative to the clip's mean pose, for the reference keypoints
    w = valid.astype(np.float64) / max(valid.sum(), 1)
    s_mean = float(np.exp((np.log(sims[:, 0]) * w).sum()))
    th_mean = float((sims[:, 1] * w).sum())
    t_mean = (sims[:, 2:4] * w[:, None]).sum(0)
    base = apply_similarity(kps[ref], s_mean, th_mean, t_mean)
    head = np.zeros((t_count, NUM_KP, 2))
    for t in range(t_count):
        moved = apply_similarity(kps[ref], sims[t, 0], sims[t, 1], sims[t, 2:4])
        head[t] = _rotate(moved - base, -phi) / (iod * s_mean)
    z = np.zeros((t_count, NUM_KP, 1))
    geometry = np.concatenate([_rotate(kps[ref] - mid, -phi) / iod, np.zeros((NUM_KP, 1))], 1)
    return {
        "pose": pose.astype(np.float32),
        "expr": np.concatenate([expr, z], 2).astype(np.float32),
        "head": np.concatenate([head, z], 2).astype(np.float32),
        "kp": np.concatenate([kps, z], 2).astype(np.float32),
        "geometry": geometry.astype(np.float32),
        "landmarks": lm.astype(np.float32),
        "iod": np.array([iod], np.float32),
    }


class KeypointExtractor:
    """LivePortrait's motion extractor (``nets.motion``) over working crops, in batches."""

    def __init__(self, nets: LivePortraitNets, batch: int = 16) -> None:
        self.nets = nets
        self.batch = batch
        self.input_size = nets.config.input_size
        self.untrained = bool(nets.untrained)
        self._pending: list[np.ndarray] = []
        self._outputs: list[dict[str, torch.Tensor]] = []

    def reset(self) -> None:
        self._pending, self._outputs = [], []

    def add(self, index: int, crop: np.ndarray) -> None:
        n = self.input_size
        if crop.shape[:2] != (n, n):
            crop = cv2.resize(crop, (n, n), interpolation=cv2.INTER_AREA)
        self._pending.append(crop)
        if len(self._pending) >= self.batch:
            self._run()

    def _run(self) -> None:
        if not self._pending:
            return
        x = torch.from_numpy(np.stack(self._pending)).permute(0, 3, 1, 2).float() / 255.0
        with torch.inference_mode():
            out = self.nets.motion(x)
        self._outputs.append({k: getattr(out, k).float() for k in out._fields})
        self._pending = []

    def finish(self, frames: int) -> dict[str, np.ndarray]:
        """The ``keypoints`` arrays (module docstring) of the first ``frames`` crops added since :meth:`reset`."""
        self._run()
        raw = {k: torch.cat([o[k] for o in self._outputs])[:frames] for k in self._outputs[0]}
        self.reset()
        params = params_from_motion(raw["pitch"], raw["yaw"], raw["roll"], raw["t"], raw["exp"], raw["scale"])
        kp_c = raw["kp"].reshape(-1, NUM_KP, 3)
        motion = torch.cat(
            [raw["scale"].reshape(-1, 1) - 1.0, raw["pitch"], raw["yaw"], raw["roll"], raw["t"], raw["exp"]], 1
        )
        pose = torch.cat([torch.stack([params.pitch, params.yaw, params.roll], 1), params.t, params.scale], 1)
        geometry = kp_c.mean(0)
        exp_mean = params.exp.mean(0, keepdim=True).expand_as(params.exp)
        n = params.exp.shape[0]
        mean_pose = MotionParams(
            scale=params.scale.mean(0, keepdim=True).expand(n, 1),
            pitch=params.pitch.mean().expand(n),
            yaw=params.yaw.mean().expand(n),
            roll=params.roll.mean().expand(n),
            t=params.t.mean(0, keepdim=True).expand(n, 3),
            exp=exp_mean,
        )
        geo = geometry[None].expand(n, -1, -1)
        moved = keypoints_from_params(geo, params._replace(exp=exp_mean))
        head = (moved - keypoints_from_params(geo, mean_pose)) / mean_pose.scale[:, :, None]
        return {
            "motion": motion.numpy().astype(np.float32),
            "pose": pose.numpy().astype(np.float32),
            "expr": params.exp.numpy().astype(np.float32),
            "head": head.numpy().astype(np.float32),
            "kp": keypoints_from_params(kp_c, params).numpy().astype(np.float32),
            "geometry": geometry.numpy().astype(np.float32),
        }


def extract_clip(
    path: str | Path,
    config: ExtractConfig | None = None,
    tracker: MeshTracker | None = None,
    keypoints: KeypointExtractor | None = None,
    hubert: HubertStreaming | None = None,
) -> ClipRecord:
    """Decode, track and extract one clip (raises :class:`ClipError`, :class:`VideoError` or
    :class:`engine.train.tracking.NoFaceError` naming the problem)."""
    cfg = config or ExtractConfig()
    if "keypoints" in cfg.spaces and keypoints is None:
        raise ValueError("the keypoints space needs a KeypointExtractor (LivePortrait weights)")
    audio = read_video_audio(path)
    rows = log_mel_offline(audio)
    max_frames = min(len(rows), int(cfg.max_seconds * cfg.fps))
    tracker = tracker or MeshTracker(config=cfg.tracker)

    def frames() -> Any:
        for i, rgb in enumerate(iter_frames(path, cfg.fps, cfg.max_side)):
            if i >= max_frames:
                return
            yield rgb

    on_crop: Callable[[int, np.ndarray], None] | None = None
    if "keypoints" in cfg.spaces:
        assert keypoints is not None
        keypoints.reset()
        on_crop = keypoints.add
    track = tracker.track(frames(), on_crop=on_crop)
    count = min(len(track.valid), max_frames)
    if count < cfg.min_frames:
        raise ClipError(f"{path}: only {count} frames with audio (at least {cfg.min_frames} needed)")
    track = MeshTrack(track.landmarks[:count], track.valid[:count], track.crop_to_image, track.reference, track.method)
    fraction = float(track.valid.mean())
    if fraction < cfg.min_valid:
        raise ClipError(f"{path}: the face was tracked in only {fraction:.0%} of the frames")
    arrays: dict[str, np.ndarray] = {
        "audio": rows[:count].astype(np.float32),
        "valid": track.valid.astype(np.uint8),
    }
    if hubert is not None:
        arrays["hubert"] = hubert_offline(hubert, audio)[:count].astype(np.float32)
    if "mesh" in cfg.spaces:
        arrays.update({f"mesh/{k}": v for k, v in mesh_motion(track, cfg.tracker.crop_size).items()})
    if keypoints is not None and "keypoints" in cfg.spaces:
        arrays.update({f"keypoints/{k}": v for k, v in keypoints.finish(count).items()})
    meta = {
        "frames": count,
        "seconds": count / cfg.fps,
        "spaces": list(cfg.spaces),
        "face": track.method,
        "valid_fraction": round(fraction, 4),
        "untrained_extractor": bool(keypoints is not None and keypoints.untrained and "keypoints" in cfg.spaces),
    }
    return ClipRecord(arrays, meta)
