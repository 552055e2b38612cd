"""Inputs and targets of the displacement heads, built from clip records (one motion space at a time).

For each valid frame ``t`` of a clip:

* LADP: the normalised audio rows ``t - past .. t + future`` (silence outside the clip) and the clip's identity
  (``geometry``) -> the LIP keypoints' expression minus the clip's rest expression (the median over its quietest
  frames: the mouth at rest, whatever frame the track started on);
* IMDP: the clip's pose relative to its mean (angles, translation, log scale), smoothed, and the loudness around
  ``t`` -> the keypoints' displacement by that pose (``head``);
* IEDP (one sample per labelled clip): one-hot emotion x intensity -> the clip's rest expression minus the rest
  expression of the same speaker's neutral clips, on the EMOTION keypoints (a speaker without neutral clips gives
  no emotion samples: there is nothing to measure the offset against).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy.ndimage import gaussian_filter1d
from torch import Tensor

from engine.audio.features import LogMelFeatures
from engine.keypoints import EMOTION, LIP
from engine.motion.emotion import EMOTIONS
from engine.motion.personal_model import PersonalConfig, PersonalHeads, pool_bands

QUIET_PERCENTILE = 20.0


@dataclass
class ClipData:
    """One clip's arrays in one motion space, with its labels."""

    id: str
    audio: np.ndarray  # [T, 81]
    valid: np.ndarray  # [T] bool
    expr: np.ndarray  # [T, 21, 3]
    head: np.ndarray  # [T, 21, 3]
    pose: np.ndarray  # [T, 7]
    geometry: np.ndarray  # [21, 3]
    emotion: str | None = None
    intensity: float | None = None
    speaker: str | None = None

    @property
    def frames(self) -> int:
        return int(self.audio.shape[0])


def clip_data(arrays: Mapping[str, np.ndarray], space: str, meta: Mapping[str, Any]) -> ClipData:
    """A clip record's arrays (``"audio"``, ``"<space>/expr"``, ...) and index metadata -> :class:`ClipData`."""
    missing = [f"{space}/{k}" for k in ("expr", "head", "pose", "geometry") if f"{space}/{k}" not in arrays]
    if missing:
        raise ValueError(f"clip {meta.get('id')} has no {missing}: it was extracted without the {space!r} space")
    return ClipData(
        id=str(meta.get("id", "")),
        audio=np.asarray(arrays["audio"], np.float32),
        valid=np.asarray(arrays["valid"]).astype(bool),
        expr=np.asarray(arrays[f"{space}/expr"], np.float32),
        head=np.asarray(arrays[f"{space}/head"], np.float32),
        pose=np.asarray(arrays[f"{space}/pose"], np.float32),
        geometry=np.asarray(arrays[f"{space}/geometry"], np.float32),
        emotion=meta.get("emotion"),
        intensity=meta.get("intensity"),
        speaker=meta.get("speaker"),
    )


def rest_expression(clip: ClipData, percentile: float = QUIET_PERCENTILE) -> np.ndarray:
    """The clip's expression at rest ``[21, 3]``: the median over its quietest valid frames."""
    loud = clip.audio[:, -1]
    ok = clip.valid
    if not ok.any():
        raise ValueError(f"clip {clip.id} has no valid frame")
    quiet = ok & (loud <= np.percentile(loud[ok], percentile))
    return np.median(clip.expr[quiet if quiet.any() else ok], axis=0)


def pose_features(pose: np.ndarray, valid: np.ndarray, sigma: float) -> np.ndarray:
    """``[T, 7]`` absolute pose -> deviations from the clip's mean (scale as log), Gaussian-smoothed over time."""
    feats = np.asarray(pose, np.float64).copy()
    feats[:, 6] = np.log(np.clip(feats[:, 6], 1e-6, None))
    ok = valid if valid.any() else np.ones_like(valid)
    feats -= feats[ok].mean(0)
    if sigma > 0:
        feats = gaussian_filter1d(feats, sigma, axis=0, mode="nearest")
    return feats.astype(np.float32)


def context(rows: np.ndarray, before: int, after: int, pad: np.ndarray) -> np.ndarray:
    """``[T, D]`` -> ``[T, before + after + 1, D]``: each row with its neighbours (``pad`` outside)."""
    t_count = rows.shape[0]
    padded = np.concatenate([np.tile(pad, (before, 1)), rows, np.tile(pad, (after, 1))])
    idx = np.arange(t_count)[:, None] + np.arange(before + after + 1)[None, :]
    return padded[idx]


class Norms(NamedTuple):
    audio_mean: np.ndarray  # [81]
    audio_std: np.ndarray  # [81]
    pose_std: np.ndarray  # [7]
    out_scale: np.ndarray  # [3] lip, pose, emotion target scales


class HeadBatch(NamedTuple):
    lip_x: Tensor  # [N, lip_in]
    lip_y: Tensor  # [N, 6, 3] space units
    pose_x: Tensor  # [M, pose_in]
    pose_y: Tensor  # [M, 21, 3]
    emo_x: Tensor  # [K, 8]
    emo_y: Tensor  # [K, 11, 3]

    def take(self, lip: Tensor, pose: Tensor, emo: Tensor) -> HeadBatch:
        return HeadBatch(
            self.lip_x[lip], self.lip_y[lip], self.pose_x[pose], self.pose_y[pose], self.emo_x[emo], self.emo_y[emo]
        )


def fit_norms(clips: Sequence[ClipData], config: PersonalConfig) -> Norms:
    audio = np.concatenate([c.audio for c in clips])
    feats = np.concatenate([pose_features(c.pose, c.valid, config.pose_smooth)[c.valid] for c in clips])
    std = feats.std(0)
    lips = np.concatenate([(c.expr - rest_expression(c))[c.valid][:, list(LIP)].reshape(-1) for c in clips])
    heads = np.concatenate([c.head[c.valid].reshape(-1) for c in clips])
    _, emo, _ = emotion_targets(clips)
    emo_scale = float(emo.std()) if emo.size else 1.0
    return Norms(
        audio.mean(0).astype(np.float32),
        np.maximum(audio.std(0), 1e-3).astype(np.float32),
        np.where(std > 1e-6, std, 1.0).astype(np.float32),
        np.array([max(float(lips.std()), 1e-6), max(float(heads.std()), 1e-6), max(emo_scale, 1e-6)], np.float32),
    )


def emotion_targets(clips: Sequence[ClipData]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(x [K, 8], y [K, 11, 3], emotions with samples)`` from the labelled clips (see the module docstring)."""
    rests = {c.id: rest_expression(c) for c in clips if c.emotion is not None}
    neutral: dict[str | None, list[np.ndarray]] = {}
    for c in clips:
        if c.emotion == "neutral":
            neutral.setdefault(c.speaker, []).append(rests[c.id])
    xs, ys, seen = [], [], set()
    for c in clips:
        if c.emotion is None or c.speaker not in neutral:
            continue
        base = np.mean(neutral[c.speaker], axis=0)
        x = np.zeros(len(EMOTIONS), np.float32)
        x[EMOTIONS.index(c.emotion)] = c.intensity if c.intensity is not None else 1.0
        xs.append(x)
        ys.append((rests[c.id] - base)[list(EMOTION)])
        seen.add(c.emotion)
    if not xs:
        return np.zeros((0, len(EMOTIONS)), np.float32), np.zeros((0, len(EMOTION), 3), np.float32), []
    return np.stack(xs), np.stack(ys).astype(np.float32), sorted(seen)


def head_inputs(
    clip: ClipData, config: PersonalConfig, norms: Norms, identity: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(lip_x [T, lip_in], pose_x [T, pose_in])`` of every frame of ``clip`` (normalised)."""
    silence = pool_bands((LogMelFeatures().silence() - norms.audio_mean) / norms.audio_std, config.bands)
    rows = pool_bands((clip.audio - norms.audio_mean) / norms.audio_std, config.bands)
    ctx = context(rows, config.past, config.future, silence).reshape(clip.frames, -1)
    ident = clip.geometry.reshape(-1) if identity is None else np.asarray(identity).reshape(-1)
    lip_x = np.concatenate([ctx, np.tile(ident, (clip.frames, 1))], 1)
    loud = context(rows[:, -1:], config.pose_context, config.pose_context, silence[-1:])[:, :, 0]
    feats = pose_features(clip.pose, clip.valid, config.pose_smooth) / norms.pose_std
    return lip_x.astype(np.float32), np.concatenate([feats, loud], 1).astype(np.float32)


def head_batch(
    clips: Sequence[ClipData], config: PersonalConfig, norms: Norms, frames: Mapping[str, np.ndarray] | None = None
) -> HeadBatch:
    """Every sample of ``clips`` (``frames[clip id]``: a boolean mask of the frames to use, default all valid)."""
    lip_x, lip_y, pose_x, pose_y = [], [], [], []
    for c in clips:
        use = c.valid if frames is None else (c.valid & frames[c.id])
        lx, px = head_inputs(c, config, norms)
        lip_x.append(lx[use])
        lip_y.append((c.expr - rest_expression(c))[use][:, list(LIP)])
        pose_x.append(px[use])
        pose_y.append(c.head[use])
    ex, ey, _ = emotion_targets(clips)

    def cat(parts: list[np.ndarray], tail: tuple[int, ...]) -> Tensor:
        return torch.from_numpy(np.concatenate(parts) if parts else np.zeros((0, *tail), np.float32))

    return HeadBatch(
        cat(lip_x, (config.lip_in,)),
        cat(lip_y, (len(LIP), 3)),
        cat(pose_x, (config.pose_in,)),
        cat(pose_y, (21, 3)),
        torch.from_numpy(ex),
        torch.from_numpy(ey),
    )


def heads_loss(heads: PersonalHeads, batch: HeadBatch) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean squared error of each head on its normalised targets; the total is their sum."""
    scale = heads.out_scale
    parts: dict[str, Tensor] = {}
    if batch.lip_x.shape[0]:
        pred = heads.lip(batch.lip_x[:, None, :]).region_offsets
        parts["lip"] = torch.mean((pred - batch.lip_y / scale[0]) ** 2)
    if batch.pose_x.shape[0]:
        pred = heads.pose(batch.pose_x[:, None, :]).region_offsets
        parts["pose"] = torch.mean((pred - batch.pose_y / scale[1]) ** 2)
    if batch.emo_x.shape[0] and heads.emotion is not None:
        pred = heads.emotion(batch.emo_x[:, None, :]).region_offsets
        parts["emotion"] = torch.mean((pred - batch.emo_y / scale[2]) ** 2)
    if not parts:
        raise ValueError("the batch holds no samples")
    total = torch.stack(list(parts.values())).sum()
    return total, parts


def set_norms(heads: PersonalHeads, norms: Norms, identity: np.ndarray) -> None:
    heads.audio_mean.copy_(torch.from_numpy(norms.audio_mean))
    heads.audio_std.copy_(torch.from_numpy(norms.audio_std))
    heads.pose_std.copy_(torch.from_numpy(norms.pose_std))
    heads.out_scale.copy_(torch.from_numpy(norms.out_scale))
    heads.identity.copy_(torch.from_numpy(np.asarray(identity, np.float32).reshape(-1)))


def norms_of(heads: PersonalHeads) -> Norms:
    return Norms(
        heads.audio_mean.numpy().copy(),
        heads.audio_std.numpy().copy(),
        heads.pose_std.numpy().copy(),
        heads.out_scale.numpy().copy(),
    )
