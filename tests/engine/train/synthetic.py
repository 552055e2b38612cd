"""Synthetic datasets with planted mappings, written through the real shard writer (no video involved).

* Audio: 16 smooth random band values per frame, each repeated over 5 mel bins (so the heads' band pooling keeps
  them exactly), and a loudness column.
* Lips: ``expr[LIP] = geometry[LIP] + A @ [bands, loudness / 10]`` (a planted linear map ``A``, mostly on the
  lower lip and chin).
* Head: smooth random roll / tx / ty / log-scale; ``head = P @ pose deviation`` (a planted linear map ``P``).
* Emotion (optional): the clip's expression carries ``intensity x offset[emotion]`` on the EMOTION keypoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter1d

from engine.keypoints import EMOTION, LIP, NUM_KP, MotionParams
from engine.motion.decode import encode_motion
from engine.motion.emotion import EMOTIONS
from engine.train.shards import ShardWriter

BANDS = 16
N_IN = BANDS + 1


@dataclass(frozen=True)
class Planted:
    lip: np.ndarray  # [len(LIP) * 2, N_IN]: x, y of each LIP keypoint from the band values and loudness / 10
    head: np.ndarray  # [NUM_KP * 2, 4]: x, y of every keypoint from roll, tx, ty, log scale deviations
    emotion: np.ndarray  # [8, len(EMOTION), 2]: offsets per emotion (neutral 0)


# how much speech moves each LIP keypoint's x and y (as in a face: the lower lip and the chin drop, the upper lip
# and the corners move little), so a clip's expression at rest is not drowned by its words
_SPEECH = {6: (0.2, 0.3), 12: (0.2, 0.3), 14: (0.1, 0.4), 17: (0.2, 1.0), 19: (0.1, 0.8), 20: (0.2, 0.9)}


def planted(seed: int = 0) -> Planted:
    rng = np.random.default_rng(seed)
    emotion = rng.normal(0, 0.06, (len(EMOTIONS), len(EMOTION), 2))
    emotion[EMOTIONS.index("neutral")] = 0.0
    weight = np.array([w for k in LIP for w in _SPEECH[k]])[:, None]
    lip = rng.normal(0, 0.05, (len(LIP) * 2, N_IN)) * weight
    return Planted(lip, rng.normal(0, 0.05, (NUM_KP * 2, 4)), emotion)


def _smooth(rng: np.random.Generator, n: int, dims: int, sigma: float) -> np.ndarray:
    x = gaussian_filter1d(rng.normal(0, 1, (n, dims)), sigma, axis=0, mode="nearest")
    return x / (x.std(0, keepdims=True) + 1e-9)


def clip_arrays(
    plant: Planted,
    rng: np.random.Generator,
    frames: int,
    geometry: np.ndarray,
    emotion: str | None = None,
    intensity: float = 1.0,
    noise: float = 0.0,
    pauses: bool = False,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One clip's arrays (mesh space) and its inputs ``[T, N_IN]`` (bands, loudness / 10). ``pauses``: a third of
    the frames (in runs) are silence: no band energy, -60 dB, as between a speaker's phrases."""
    bands = _smooth(rng, frames, BANDS, 1.5)
    loud = -35.0 + 12.0 * _smooth(rng, frames, 1, 2.0)[:, 0]
    if pauses:
        silent = _smooth(rng, frames, 1, 4.0)[:, 0] < -0.45
        bands[silent] = 0.0
        loud[silent] = -60.0
    audio = np.concatenate([np.repeat(bands, 80 // BANDS, axis=1), loud[:, None]], 1).astype(np.float32)
    inputs = np.concatenate([bands, loud[:, None] / 10.0], 1)
    expr = np.tile(geometry[None], (frames, 1, 1)).astype(np.float64)
    expr[:, list(LIP), :2] += (inputs @ plant.lip.T).reshape(frames, len(LIP), 2)
    if emotion is not None:
        expr[:, list(EMOTION), :2] += intensity * plant.emotion[EMOTIONS.index(emotion)]
    expr[:, :, :2] += rng.normal(0, noise, (frames, NUM_KP, 2))
    pose = np.zeros((frames, 7))
    dev = _smooth(rng, frames, 4, 6.0) * np.array([1.5, 0.03, 0.02, 0.01])  # roll deg, tx, ty, log scale
    pose[:, 2], pose[:, 3], pose[:, 4], pose[:, 6] = dev[:, 0], dev[:, 1], dev[:, 2], np.exp(dev[:, 3])
    feats = np.stack([pose[:, 2], pose[:, 3], pose[:, 4], np.log(pose[:, 6])], 1)
    feats -= feats.mean(0)
    head = np.zeros((frames, NUM_KP, 3))
    head[:, :, :2] = (feats @ plant.head.T).reshape(frames, NUM_KP, 2)
    arrays = {
        "audio": audio,
        "valid": np.ones(frames, np.uint8),
        "mesh/expr": expr.astype(np.float32),
        "mesh/head": head.astype(np.float32),
        "mesh/pose": pose.astype(np.float32),
        "mesh/geometry": geometry.astype(np.float32),
    }
    return arrays, inputs


def geometry_of(rng: np.random.Generator) -> np.ndarray:
    g = np.zeros((NUM_KP, 3))
    g[:, :2] = rng.normal(0, 0.6, (NUM_KP, 2))
    return g


def write_dataset(
    root: Path,
    plant: Planted,
    clips: Sequence[dict[str, object]],
    seed: int = 0,
) -> None:
    """``clips``: dicts with ``frames``, ``split``, optional ``speaker``, ``emotion``, ``intensity``, ``noise``."""
    rng = np.random.default_rng(seed)
    speakers: dict[object, np.ndarray] = {}
    writer = ShardWriter(root, {"synthetic": True, "spaces": ["mesh"]}, max_clips=8)
    for i, spec in enumerate(clips):
        speaker = spec.get("speaker", f"s{i}")
        geometry = speakers.setdefault(speaker, geometry_of(rng))
        frames = int(spec["frames"])  # type: ignore[call-overload]
        arrays, _ = clip_arrays(
            plant,
            rng,
            frames,
            geometry,
            spec.get("emotion"),  # type: ignore[arg-type]
            float(spec.get("intensity", 1.0)),  # type: ignore[arg-type]
            float(spec.get("noise", 0.0)),  # type: ignore[arg-type]
            bool(spec.get("pauses", False)),
        )
        meta = {"id": f"clip{i:03d}", "speaker": speaker, "emotion": spec.get("emotion"),
                "intensity": spec.get("intensity", 1.0 if spec.get("emotion") else None), "split": spec["split"],
                "frames": frames, "spaces": ["mesh"]}  # fmt: skip
        writer.add(meta, arrays)
    writer.close()


def _soft_logits(motion: np.ndarray) -> np.ndarray:
    """Pose logits as a network's are (a few units deep, not hundreds): the encoded Gaussian flattened 20x. The
    decoded angle moves by well under a degree for the small angles used here."""
    out = motion.copy()
    out[:, 1:199] *= 0.05
    return out


def write_keypoint_dataset(root: Path, clips: Sequence[dict[str, object]], seed: int = 0) -> None:
    """Clips in the keypoints space (what the diffusion tasks read): ``motion [T, 265]`` in Ditto's layout with
    smooth pose and expression, the lips following the loudness, and ``emotion`` adding a planted offset to the
    expression. ``clips``: dicts with ``frames``, ``split``, optional ``emotion``."""
    rng = np.random.default_rng(seed)
    offsets = rng.normal(0, 0.02, (len(EMOTIONS), NUM_KP, 3))
    offsets[EMOTIONS.index("neutral")] = 0.0
    writer = ShardWriter(root, {"synthetic": True, "spaces": ["keypoints"]}, max_clips=8)
    for i, spec in enumerate(clips):
        n = int(spec["frames"])  # type: ignore[call-overload]
        loud = -35.0 + 12.0 * _smooth(rng, n, 1, 2.0)[:, 0]
        bands = _smooth(rng, n, BANDS, 1.5)
        audio = np.concatenate([np.repeat(bands, 80 // BANDS, axis=1), loud[:, None]], 1).astype(np.float32)
        pose = _smooth(rng, n, 3, 8.0) * 3.0
        exp = 0.01 * _smooth(rng, n, NUM_KP * 3, 3.0).reshape(n, NUM_KP, 3)
        exp[:, list(LIP), 1] += 0.002 * (loud[:, None] + 35.0)
        emotion = spec.get("emotion")
        if emotion is not None:
            exp += offsets[EMOTIONS.index(str(emotion))]
        params = MotionParams(
            scale=torch.ones(n, 1),
            pitch=torch.from_numpy(pose[:, 0]).float(),
            yaw=torch.from_numpy(pose[:, 1]).float(),
            roll=torch.from_numpy(pose[:, 2]).float(),
            t=torch.zeros(n, 3),
            exp=torch.from_numpy(exp).float(),
        )
        arrays = {
            "audio": audio,
            "valid": np.ones(n, np.uint8),
            "keypoints/motion": _soft_logits(encode_motion(params).numpy()).astype(np.float32),
            "keypoints/geometry": (0.3 * rng.normal(0, 1, (NUM_KP, 3))).astype(np.float32),
        }
        meta = {"id": f"kp{i:03d}", "speaker": "s", "emotion": emotion, "intensity": 1.0 if emotion else None,
                "split": spec["split"], "frames": n, "spaces": ["keypoints"]}  # fmt: skip
        writer.add(meta, arrays)
    writer.close()
