"""The personalized motion generator (EP-Talk's use case): an avatar's own learned heads drive its face.

Per frame ``f`` (log-mel + loudness rows in, one :class:`~engine.motion.base.MotionFrame` out):

* LADP (lips): the audio rows ``f - past .. f + future`` and the face's identity -> LIP offsets;
* IMDP (head): the reference pose track of the person's clips, replayed back and forth from a seeded start
  (EP-Talk §3.3, the motion reference video), with the loudness around ``f`` -> every keypoint's displacement;
* IEDP (emotion): the ``emotion`` control picks the learned offset (an :class:`~engine.motion.emotion.EmotionBank`
  of the head's outputs), ramped and scaled by ``intensity`` like every other generator's;
* seeded blinks; lip scale; the portrait's own pose and expression underneath.

The offsets are added to the portrait's expression: ``mesh`` models (classic mode) in eye distances times the
avatar's eye distance ``unit``, ``keypoints`` models (neural mode) in LivePortrait's expression units. Unlike
EP-Talk the heads do not correct a diffusion model's output: they are the whole motion, so the generator needs no
other weights and runs in real time on a CPU.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar

import numpy as np
import torch

from engine.keypoints import NUM_KP, MotionParams, SourceFace
from engine.motion.base import MotionFrame
from engine.motion.classic import BLINK_DEPTH
from engine.motion.control_schema import ControlState, ControlValueError
from engine.motion.controls import ControllerConfig, MotionControls, default_blink_vector
from engine.motion.emotion import EMOTIONS, EmotionBank
from engine.motion.personal_model import AUDIO_DIM, PersonalModel, pool_bands

LEFT_EYE_KP, RIGHT_EYE_KP = (11, 13), (15, 16)  # upper and lower lid keypoints of each eye


def canonical_axes(kp: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Keypoints ``[21, >=2]`` -> (eye midpoint [2], eye-line angle (radians), eye distance), from the lid
    keypoints (the same definition as classic mode's face size)."""
    kp = np.asarray(kp, np.float64)[:, :2]
    left, right = kp[list(LEFT_EYE_KP)].mean(0), kp[list(RIGHT_EYE_KP)].mean(0)
    d = right - left
    return (left + right) / 2, float(math.atan2(d[1], d[0])), float(math.hypot(*d))


def canonical_keypoints(kp: np.ndarray) -> np.ndarray:
    """Keypoints ``[21, >=2]`` -> ``[21, 3]``: origin at the eye midpoint, eyes level, unit 1 eye distance, z 0."""
    mid, phi, iod = canonical_axes(kp)
    c, s = math.cos(-phi), math.sin(-phi)
    xy = (np.asarray(kp, np.float64)[:, :2] - mid) @ np.array([[c, -s], [s, c]]).T / max(iod, 1e-9)
    return np.concatenate([xy, np.zeros((len(xy), 1))], 1).astype(np.float32)


def identity_of(source: SourceFace, space: str) -> np.ndarray:
    """The identity features ``[63]`` of an avatar (what the lip head is conditioned on)."""
    kp = source.kp_canonical.detach().cpu().numpy().reshape(NUM_KP, 3)
    return (canonical_keypoints(kp) if space == "mesh" else kp).reshape(-1).astype(np.float32)


def play_index(frame: int, length: int) -> int:
    """Back-and-forth index into a track of ``length`` frames (no jump at the ends)."""
    if length <= 1:
        return 0
    period = 2 * (length - 1)
    i = frame % period
    return i if i < length else period - i


@dataclass(frozen=True)
class PersonalMotionConfig:
    fps: int = 25
    seed: int = 0  # blinks and the start of the reference pose track

    def __post_init__(self) -> None:
        if self.fps <= 0:
            raise ValueError(f"fps must be positive, got {self.fps}")


class PersonalMotion:
    """:class:`~engine.motion.base.MotionStage` over :class:`~engine.audio.LogMelFeatures` rows (see the module
    docstring). Deterministic for a seed; any chunking of the rows gives the same frames."""

    CONTROLS: ClassVar[Mapping[str, str]] = MappingProxyType(
        {
            "emotion": "the person's learned emotion offset (IEDP); only emotions their clips were labelled with",
            "intensity": "scales the emotion offset",
            "emotion_b": "second learned emotion of the interpolation (EDTalk)",
            "mix": "interpolation weight of emotion_b",
            "mouth_emotion": "mouth keypoints from this learned emotion (PC-Talk region mixing)",
            "eyes_emotion": "eye and brow keypoints from this learned emotion",
            "pure_emotion": "subtract the learned neutral offset (PC-Talk)",
            "lip_scale": "scales the learned lip motion (LADP)",
            "blink": "seeded blinks",
            "blink_rate": "blinks per second",
            "head_pose": "'diffusion': the learned head motion (IMDP); 'fixed': the portrait's pose",
            "ramp_s": "seconds every change ramps over",
        }
    )

    def __init__(
        self,
        model: PersonalModel,
        source: SourceFace,
        silence: np.ndarray,
        unit: float = 1.0,
        config: PersonalMotionConfig | None = None,
    ) -> None:
        self.model = model
        self.heads = model.heads.eval()
        self.config = cfg = config or PersonalMotionConfig()
        pc = model.config
        self.space = pc.space
        self.unit = float(unit)
        if not self.unit > 0:
            raise ValueError(f"unit must be positive, got {unit}")
        silence = np.asarray(silence, np.float32).reshape(-1)
        if silence.shape[0] != AUDIO_DIM:
            raise ValueError(
                f"personal motion reads {AUDIO_DIM}-column log-mel rows, the silence row has {silence.size}"
            )
        self.source = source
        self.fps = cfg.fps
        self.lookahead_frames = pc.lookahead
        self.untrained = model.untrained
        h = self.heads
        self._silence = self._normalise(silence[None])[0]
        identity = model.heads.identity.numpy() if pc.identity_from == "model" else identity_of(source, pc.space)
        self._identity = torch.from_numpy(np.asarray(identity, np.float32))
        self._reference = torch.from_numpy(np.asarray(model.reference_pose, np.float32)) / h.pose_std
        start = int(np.random.default_rng(cfg.seed).integers(0, max(1, 2 * len(model.reference_pose) - 2)))
        self._track_start = start
        with torch.no_grad():
            eye = torch.eye(len(EMOTIONS))
            offsets = h.emotion_offsets(eye) * self.unit  # [8, 21, 3]
        bank = EmotionBank({name: offsets[i] for i, name in enumerate(EMOTIONS) if name in model.emotions})
        if self.space == "mesh":
            blink = torch.zeros(NUM_KP, 3)
            for upper, lower in ((11, 13), (15, 16)):
                blink[upper, 1], blink[lower, 1] = BLINK_DEPTH, -0.01  # classic mode's own blink
            ctrl = ControllerConfig(fps=cfg.fps, seed=cfg.seed, blink_depth=self.unit, gaze_amplitude=0.0)
        else:
            blink = default_blink_vector()
            ctrl = ControllerConfig(fps=cfg.fps, seed=cfg.seed, gaze_amplitude=0.0)
        self.controls = MotionControls(source, bank, config=ctrl, blink_vector=blink)
        self._head_from, self._head_to, self._head_pos, self._head_len = 1.0, 1.0, 0, 0
        self._history = max(pc.past, pc.pose_context)  # rows before a frame that its inputs read
        self._rows = np.zeros((0, pc.row_dim), np.float32)
        self._base = self._next = self._n_in = 0
        self._new_stream()

    # --- controls ---

    def check_controls(self, state: ControlState) -> None:
        learned = {"neutral", *self.model.emotions}
        for key in ("emotion", "emotion_b", "mouth_emotion", "eyes_emotion"):
            name = getattr(state, key)
            if name is not None and name not in learned:
                raise ControlValueError(
                    f"{key}: this avatar's personal model learned no {name!r} (its clips were labelled "
                    f"{sorted(learned)}); personalize it with clips labelled {name!r}"
                )
        if state.head_pose == "reference":
            raise ControlValueError("head_pose: the personal model's own head motion is 'diffusion'; or use 'fixed'")
        if state.emotion_source != "label":
            raise ControlValueError("emotion_source: the personal model's emotions come from labels")

    def apply_controls(self, state: ControlState) -> None:
        self.controls.update(state.as_dict())
        r = self._head_pos / self._head_len if self._head_len else 1.0
        self._head_from = self._head_from + (self._head_to - self._head_from) * r
        self._head_to = 1.0 if state.head_pose == "diffusion" else 0.0
        self._head_len, self._head_pos = round(state.ramp_s * self.fps), 0

    # --- MotionStage ---

    def push(self, features: np.ndarray) -> list[MotionFrame]:
        rows = np.asarray(features, np.float32)
        if rows.ndim != 2 or rows.shape[1] != AUDIO_DIM:
            raise ValueError(f"personal motion expects log-mel rows [n, {AUDIO_DIM}], got shape {rows.shape}")
        if len(rows):
            self._rows = np.concatenate([self._rows, self._normalise(rows)])
            self._n_in += len(rows)
        return self._emit(self._n_in - self.lookahead_frames)

    def flush(self) -> list[MotionFrame]:
        pad = self.lookahead_frames + 1  # silence after the end of the stream
        self._rows = np.concatenate([self._rows, np.tile(self._silence, (pad, 1))])
        frames = self._emit(self._n_in)
        self._new_stream()
        return frames

    def interrupt(self) -> None:
        """Drop the rows not yet turned into frames; later frames start from silence (the lips close)."""
        self._next = self._n_in
        self._rows = np.tile(self._silence, (self._history, 1))
        self._base = self._n_in - self._history

    # --- internals ---

    def _new_stream(self) -> None:
        self._rows = np.tile(self._silence, (self._history, 1)).astype(np.float32)  # the stream's past is silence
        self._base = -self._history  # frame index of the buffer's first row
        self._next = 0  # next frame to emit
        self._n_in = 0  # rows pushed
        self.controls.reset()

    def _normalise(self, rows: np.ndarray) -> np.ndarray:
        h = self.heads
        return pool_bands((rows - h.audio_mean.numpy()) / h.audio_std.numpy(), self.model.config.bands)

    @torch.inference_mode()
    def _emit(self, stop: int) -> list[MotionFrame]:
        """Frames ``self._next .. stop - 1`` (their rows up to ``stop - 1 + lookahead`` are buffered)."""
        count = stop - self._next
        if count <= 0:
            return []
        pc = self.model.config
        pos = np.arange(self._next, stop) - self._base  # buffer rows of the frames
        rows = self._rows
        ctx = np.stack([rows[pos + k] for k in range(-pc.past, pc.future + 1)], 1)  # [n, window, bands + 1]
        lip_x = torch.cat([torch.from_numpy(ctx.reshape(count, -1)), self._identity.expand(count, -1)], 1)
        loud = np.stack([rows[pos + k, -1] for k in range(-pc.pose_context, pc.pose_context + 1)], 1)
        n_ref = self._reference.shape[0]
        frames = range(self._next, stop)
        ref = self._reference[[play_index(f + self._track_start, n_ref) for f in frames]]
        pose_x = torch.cat([ref, torch.from_numpy(loud.astype(np.float32))], 1)
        lips = self.heads.lip_offsets(lip_x) * self.unit  # [n, 21, 3]
        head = self.heads.head_offsets(pose_x) * self.unit
        src = self.source.params
        out = []
        for i, f in enumerate(frames):
            p = MotionParams(src.scale, src.pitch, src.yaw, src.roll, src.t, src.exp + lips[i : i + 1].to(src.exp))
            p = self.controls.apply(p, f, None)
            w = self._head_weight()
            if w > 0:
                p = p._replace(exp=p.exp + w * head[i : i + 1].to(p.exp))
            out.append(MotionFrame(f, p))
        self._next = stop
        drop = self._next - self._history - self._base  # rows no later frame reads
        if drop > 0:
            self._rows = self._rows[drop:]
            self._base += drop
        return out

    def _head_weight(self) -> float:
        if self._head_len and self._head_pos < self._head_len:
            self._head_pos += 1
        r = self._head_pos / self._head_len if self._head_len else 1.0
        return self._head_from + (self._head_to - self._head_from) * r
