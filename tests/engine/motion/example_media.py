"""Examples for the emotion and reference-clip tests, made here deterministically (no downloads).

Emotion photos are the default avatar rendered by classic mode with an emotion's action units, so the example and
its neutral example are the same face; a reference clip is the default avatar swaying its head (classic mode's
idle motion, amplified) and smiling, written as an mp4. ``speech`` is a voiced, syllable-paced test signal.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch

from engine.avatar.default import default_avatar
from engine.media import VideoWriter
from engine.motion.classic import ClassicMotion, ClassicMotionConfig
from engine.motion.control_schema import ControlState
from engine.render.base import PreparedAvatar
from engine.render.classic import ClassicRenderer, face_size

STILL = {"head_pose": "fixed", "blink": False, "gaze": False, "ramp_s": 0.0}


def _prepared() -> tuple[ClassicRenderer, PreparedAvatar]:
    renderer = ClassicRenderer()
    return renderer, renderer.prepare(default_avatar())


def _render(renderer: ClassicRenderer, prepared: PreparedAvatar, params: object) -> np.ndarray:
    with torch.inference_mode():
        out = renderer.render([prepared], renderer.drive(prepared, params))  # type: ignore[arg-type]
    return (out[0].permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)


def emotion_photo(path: Path, emotion: str = "neutral", intensity: float = 1.0) -> Path:
    """The default avatar showing ``emotion`` (classic action units), as a PNG."""
    renderer, prepared = _prepared()
    motion = ClassicMotion(ClassicMotionConfig(), face_size=face_size(prepared.source), source=prepared.source)
    motion.apply_controls(ControlState(emotion=emotion, intensity=intensity, **STILL))  # type: ignore[arg-type]
    frame = motion.push(np.zeros((4, 4), np.float32))[-1]
    cv2.imwrite(str(path), cv2.cvtColor(_render(renderer, prepared, frame.params), cv2.COLOR_RGB2BGR))
    return path


def sway_clip(path: Path, frames: int = 20, head_motion: float = 5.0) -> np.ndarray:
    """The default avatar smiling a little and swaying its head ``head_motion`` times classic mode's idle amplitude,
    ``frames`` frames at 25 fps -> the true (pitch, yaw, roll) of each frame ``[frames, 3]``."""
    renderer, prepared = _prepared()
    motion = ClassicMotion(
        ClassicMotionConfig(head_motion=head_motion), face_size=face_size(prepared.source), source=prepared.source
    )
    motion.apply_controls(ControlState(blink=False, gaze=False, ramp_s=0.0, emotion="happy", intensity=0.6))
    rows = np.zeros((frames + 1, 4), np.float32)
    out = motion.push(rows)[:frames]
    # a sway this short barely rolls: spread the clip over 8 s of the sway by sampling every 10th frame's pose
    slow = ClassicMotion(ClassicMotionConfig(head_motion=head_motion))
    slow.apply_controls(ControlState(blink=False, gaze=False, ramp_s=0.0))
    poses = slow.push(np.zeros((10 * frames + 1, 4), np.float32))[::10][:frames]
    truth = []
    with VideoWriter(path, 25, prepared.avatar.crop.shape[0]) as writer:
        for face, pose in zip(out, poses, strict=True):
            p = face.params._replace(pitch=pose.params.pitch, yaw=pose.params.yaw, roll=pose.params.roll)
            truth.append([float(p.pitch[0]), float(p.yaw[0]), float(p.roll[0])])
            writer.video(_render(renderer, prepared, p))
        writer.audio(np.zeros(frames * 640, np.float32))
    return np.asarray(truth)


def speech(seconds: float, rate: int = 16_000, level: float = 0.3, seed: int = 0) -> np.ndarray:
    """A voiced test signal: a gliding harmonic tone with a syllable-rate envelope and short pauses."""
    t = np.arange(int(seconds * rate)) / rate
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 6))
    env = np.clip(np.sin(2 * np.pi * 4 * t + seed), 0, None) * (np.sin(2 * np.pi * 0.9 * t + 1.0) > -0.5)
    return (level * voice * env / 1.5).astype(np.float32)


_CACHE = tempfile.TemporaryDirectory(prefix="example-media-")  # made once per test process, removed at its end


@functools.cache
def _cached_photo(emotion: str) -> Path:
    return emotion_photo(Path(_CACHE.name) / f"{emotion}.png", emotion)


@functools.cache
def _cached_clip(frames: int) -> tuple[Path, bytes]:
    path = Path(_CACHE.name) / f"sway-{frames}.mp4"
    truth = sway_clip(path, frames)
    return path, truth.tobytes()


def photo(directory: Path, emotion: str) -> Path:
    """:func:`emotion_photo` copied into ``directory`` (rendered once per test process)."""
    return Path(shutil.copy(_cached_photo(emotion), directory / f"{emotion}.png"))


def clip(directory: Path, frames: int = 12) -> tuple[Path, np.ndarray]:
    """:func:`sway_clip` copied into ``directory`` with its true poses (rendered once per test process)."""
    path, truth = _cached_clip(frames)
    return Path(shutil.copy(path, directory / path.name)), np.frombuffer(truth).reshape(frames, 3)
