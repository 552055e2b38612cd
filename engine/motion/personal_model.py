"""A person's learned motion: EP-Talk's three displacement heads with the statistics they were trained on.

:class:`PersonalHeads` bundles (it is a container, each network has its own file, :mod:`engine.motion.heads`):

* ``lip`` (LADP, :class:`~engine.motion.heads.LipHead`): a frame's audio context (log-mel rows ``t - past ..
  t + future``, normalised, the 80 bins averaged into ``bands`` bands, and the loudness) and the face's identity
  (its canonical keypoints) -> LIP offsets;
* ``pose`` (IMDP, :class:`~engine.motion.heads.PoseHead`): reference head-pose features (pitch, yaw, roll, tx,
  ty, tz, log scale; smoothed, normalised) and the loudness around the frame -> every keypoint's displacement;
* ``emotion`` (IEDP, :class:`~engine.motion.heads.EmotionHead`, optional): an emotion one-hot x intensity ->
  EMOTION offsets.

Each head reads a one-frame window with a kernel of 1: the temporal context is stacked into the feature vector,
because the heads' average pooling over a longer window would blur the lips over the whole window (a 9-frame
window smooths a syllable away). Outputs are in units of the ``space``: ``mesh`` offsets are inter-ocular
distances (classic mode multiplies by the avatar's eye distance), ``keypoints`` offsets are LivePortrait
expression units. ``reference_pose [N, 7]`` is the head-pose track the runtime replays into the IMDP
(EP-Talk §3.3: the motion reference video's pose features drive the predictor).

Stored as ``personal.safetensors`` (the state dict, the arrays) + ``personal.json`` (config, emotions, how it was
trained) in a folder: an avatar's entry in the avatar store, or a training run.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from engine.keypoints import NUM_KP
from engine.motion.emotion import EMOTIONS
from engine.motion.heads import EmotionHead, LipHead, PoseHead

SPACES = ("mesh", "keypoints")
AUDIO_DIM = 81  # LogMelFeatures rows: 80 log-mel bins + loudness dB
N_MELS = AUDIO_DIM - 1
POSE_DIM = 7
IDENTITY_DIM = NUM_KP * 3
WEIGHTS_FILE = "personal.safetensors"
META_FILE = "personal.json"
FORMAT = 1


class PersonalModelError(ValueError):
    """A personal model that is missing, damaged or does not fit; the message says which and why."""


@dataclass(frozen=True)
class PersonalConfig:
    space: str = "mesh"
    bands: int = 16  # the 80 log-mel bins averaged into this many bands (fewer inputs: minutes of data suffice)
    past: int = 4  # audio rows before the frame the lip head reads
    future: int = 2  # ... and after it (the motion stage's lookahead)
    pose_context: int = 2  # loudness rows on each side of the frame the pose head reads
    pose_smooth: float = 3.0  # Gaussian sigma (frames) of the reference pose features
    hidden: int = 128
    identity_from: str = "model"  # "model": the stored identity (one person); "avatar": the avatar's keypoints

    def __post_init__(self) -> None:
        if self.space not in SPACES:
            raise PersonalModelError(f"space must be one of {SPACES}, got {self.space!r}")
        if self.past < 0 or self.future < 0 or self.pose_context < 0 or self.pose_smooth < 0 or self.hidden < 1:
            raise PersonalModelError(f"invalid personal model config: {self}")
        if self.bands < 1 or N_MELS % self.bands:
            raise PersonalModelError(f"bands must divide {N_MELS}, got {self.bands}")
        if self.identity_from not in ("model", "avatar"):
            raise PersonalModelError(f"identity_from must be 'model' or 'avatar', got {self.identity_from!r}")

    @property
    def row_dim(self) -> int:
        """Columns of one pooled audio row: the bands and the loudness."""
        return self.bands + 1

    @property
    def lip_in(self) -> int:
        return self.row_dim * (self.past + self.future + 1) + IDENTITY_DIM

    @property
    def pose_in(self) -> int:
        return POSE_DIM + 2 * self.pose_context + 1

    @property
    def lookahead(self) -> int:
        return max(self.future, self.pose_context)


def pool_bands(rows: np.ndarray, bands: int) -> np.ndarray:
    """Normalised log-mel rows ``[..., 81]`` -> ``[..., bands + 1]``: adjacent bins averaged, loudness kept last."""
    mel = rows[..., :N_MELS].reshape(*rows.shape[:-1], bands, N_MELS // bands).mean(-1)
    return np.concatenate([mel, rows[..., N_MELS:]], -1).astype(np.float32)


class PersonalHeads(nn.Module):
    """The three heads and their normalisation buffers (see the module docstring)."""

    audio_mean: Tensor
    audio_std: Tensor
    pose_std: Tensor
    identity: Tensor
    out_scale: Tensor

    def __init__(self, config: PersonalConfig, with_emotion: bool = True) -> None:
        super().__init__()
        self.config = config
        self.lip = LipHead(config.lip_in, hidden=config.hidden, kernel=1)
        self.pose = PoseHead(config.pose_in, hidden=config.hidden, kernel=1)
        self.emotion = EmotionHead(len(EMOTIONS), hidden=config.hidden // 2, kernel=1) if with_emotion else None
        self.register_buffer("audio_mean", torch.zeros(AUDIO_DIM))
        self.register_buffer("audio_std", torch.ones(AUDIO_DIM))
        self.register_buffer("pose_std", torch.ones(POSE_DIM))
        self.register_buffer("identity", torch.zeros(IDENTITY_DIM))
        self.register_buffer("out_scale", torch.ones(3))  # lip, pose, emotion: head outputs x this = space units

    def lip_offsets(self, x: Tensor) -> Tensor:
        """``x [B, lip_in]`` (normalised) -> LIP offsets ``[B, 21, 3]`` in space units."""
        return self.lip(x[:, None, :]).offsets * self.out_scale[0]

    def head_offsets(self, x: Tensor) -> Tensor:
        """``x [B, pose_in]`` (normalised) -> every keypoint's displacement ``[B, 21, 3]`` in space units."""
        return self.pose(x[:, None, :]).offsets * self.out_scale[1]

    def emotion_offsets(self, x: Tensor) -> Tensor:
        """``x [B, 8]`` (one-hot x intensity) -> EMOTION offsets ``[B, 21, 3]`` in space units (zero without IEDP)."""
        if self.emotion is None:
            return x.new_zeros(x.shape[0], NUM_KP, 3)
        return self.emotion(x[:, None, :]).offsets * self.out_scale[2]


@dataclass
class PersonalModel:
    heads: PersonalHeads
    reference_pose: np.ndarray  # [N, 7] pose deviations replayed at run time
    emotions: tuple[str, ...]  # emotions the IEDP learned (neutral always included when it exists)
    untrained: bool = False
    info: dict[str, Any] | None = None  # clips, seconds, losses, when

    @property
    def config(self) -> PersonalConfig:
        return self.heads.config

    def save(self, directory: str | Path) -> None:
        """Write ``personal.safetensors`` + ``personal.json`` into ``directory`` (which must exist)."""
        directory = Path(directory)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.heads.state_dict().items()}
        tensors["reference_pose"] = torch.from_numpy(np.ascontiguousarray(self.reference_pose, np.float32))
        save_file(tensors, str(directory / WEIGHTS_FILE))
        meta = {
            "format": FORMAT,
            "config": asdict(self.config),
            "emotions": list(self.emotions),
            "with_emotion": self.heads.emotion is not None,
            "untrained": self.untrained,
            "info": self.info or {},
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))

    @classmethod
    def load(cls, directory: str | Path) -> PersonalModel:
        directory = Path(directory)
        meta_path, weights_path = directory / META_FILE, directory / WEIGHTS_FILE
        if not meta_path.is_file() or not weights_path.is_file():
            raise PersonalModelError(f"{directory}: no personal model ({META_FILE} and {WEIGHTS_FILE})")
        try:
            meta = json.loads(meta_path.read_text())
            tensors = load_file(str(weights_path))
        except (OSError, ValueError) as exc:
            raise PersonalModelError(f"{directory}: damaged personal model ({exc})") from exc
        if meta.get("format") != FORMAT:
            raise PersonalModelError(f"{meta_path}: unsupported format {meta.get('format')!r}")
        unknown = set(meta.get("config", {})) - set(PersonalConfig.__dataclass_fields__)
        if unknown:
            raise PersonalModelError(f"{meta_path}: unknown config keys {sorted(unknown)}")
        heads = PersonalHeads(PersonalConfig(**meta["config"]), with_emotion=bool(meta.get("with_emotion", True)))
        reference = tensors.pop("reference_pose", None)
        try:
            heads.load_state_dict(tensors, strict=True)
        except RuntimeError as exc:
            raise PersonalModelError(f"{weights_path}: does not match its config ({exc})") from exc
        if reference is None or reference.ndim != 2 or reference.shape[1] != POSE_DIM or reference.shape[0] < 1:
            raise PersonalModelError(f"{weights_path}: missing or malformed reference_pose")
        emotions = tuple(meta.get("emotions", ()))
        if any(e not in EMOTIONS for e in emotions):
            raise PersonalModelError(f"{meta_path}: unknown emotions {emotions}")
        heads.eval()
        return cls(heads, reference.numpy(), emotions, bool(meta.get("untrained", False)), dict(meta.get("info", {})))


def untrained_model(config: PersonalConfig, seed: int = 0) -> PersonalModel:
    """Heads with seeded random weights: what an untrained predictor gives (noise; tests and baselines)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        heads = PersonalHeads(config).eval()
    rng = np.random.default_rng(seed)
    return PersonalModel(heads, rng.normal(0.0, 1.0, (250, POSE_DIM)).astype(np.float32), (), untrained=True)
