"""Talking clips with a known (planted) motion style, rendered by the engine's classic mode on a real photo.

The instrument of the personalization tests and benchmarks: speech (espeak-ng when installed, else a voiced
synthetic signal with syllables) drives classic motion whose lip amplitude and head sway are set, the frames are
rendered by the classic renderer and written as an mp4 with the audio. Learning from these clips must recover the
planted lip scale and head-motion style.

The lip amplitude is planted through the classic stage's ``lip_scale`` control when the stage honours it, else
through ``ClassicMotionConfig.jaw_gain`` (the jaw's travel, which is what the lip scale scales).
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import tempfile
import wave
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from engine.audio.pcm import SAMPLE_RATE, resample
from engine.avatar.record import Avatar
from engine.media import Mp4Writer
from engine.motion.classic import ClassicFeatures, ClassicMotion, ClassicMotionConfig
from engine.motion.control_schema import ControlState
from engine.render.classic import ClassicRenderer, face_size

DEFAULT_JAW_GAIN = ClassicMotionConfig().jaw_gain
PHRASES = (
    "The quick brown fox jumps over the lazy dog, and then it runs home.",
    "I talk about the moon and the stars, and we watch the sky at night.",
    "Please call me tomorrow morning, before the meeting starts at nine.",
    "A big red balloon floated over the market and the old stone bridge.",
    "We went to the beach on Sunday, ate ice cream, and swam in the sea.",
    "Open the window, the room is warm, and the birds are singing outside.",
)


@dataclass(frozen=True)
class PlantedStyle:
    lip_scale: float = 1.0  # x the classic jaw travel
    head_motion: float = 1.0  # x the classic idle head sway
    seed: int = 0  # the sway's phases and the blinks

    def motion(self, face: float, fps: int = 25) -> ClassicMotion:
        has_control = "lip_scale" in ClassicMotion.CONTROLS
        gain = DEFAULT_JAW_GAIN if has_control else DEFAULT_JAW_GAIN * self.lip_scale
        motion = ClassicMotion(
            ClassicMotionConfig(fps=fps, jaw_gain=gain, head_motion=self.head_motion, seed=self.seed), face_size=face
        )
        if has_control:  # the classic stage's own control, once it has one
            motion.apply_controls(dataclasses.replace(ControlState(), lip_scale=self.lip_scale))
        return motion


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def speech(text: str, seed: int = 0, gap_s: float = 0.4) -> np.ndarray:
    """16 kHz float32 speech of ``text`` (espeak-ng) with ``gap_s`` of silence around it; without espeak-ng a
    voiced synthetic phrase (130 Hz buzz with vowel harmonics, syllables at a seeded 3-5 Hz) of similar length."""
    gap = np.zeros(int(gap_s * SAMPLE_RATE), np.float32)
    espeak = shutil.which("espeak-ng")
    if espeak is not None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "s.wav"
            subprocess.run([espeak, "-s", "165", "-w", str(path), text], check=True, capture_output=True)
            with wave.open(str(path)) as w:
                x = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768.0
                rate = w.getframerate()
        loud = np.nonzero(np.abs(x) > 0.02)[0]
        x = resample(x[loud[0] : loud[-1] + 1], rate, SAMPLE_RATE).astype(np.float32)
    else:
        rng = np.random.default_rng(seed)
        t = np.arange(int(len(text) * 0.065 * SAMPLE_RATE)) / SAMPLE_RATE
        buzz = sum(np.sin(2 * np.pi * 130 * k * t) / k for k in range(1, 12))
        rate_hz = rng.uniform(3.0, 5.0)
        env = np.clip(np.sin(2 * np.pi * rate_hz * t + rng.uniform(0, 6)), 0, None) ** 0.7
        x = (0.25 * buzz * env).astype(np.float32)
    return np.concatenate([gap, x, gap]).astype(np.float32)


def small_avatar(avatar: Avatar, size: int) -> Avatar:
    """``avatar`` with its crop (and landmarks) scaled to ``size`` pixels: the classic renderer at ``size``."""
    side = avatar.crop.shape[0]
    crop = cv2.resize(avatar.crop, (size, size), interpolation=cv2.INTER_AREA)
    k = size / side
    landmarks = None if avatar.landmarks is None else ((avatar.landmarks + 0.5) * k - 0.5).astype(np.float32)
    return dataclasses.replace(avatar, crop=crop, landmarks=landmarks, features={})


def render_frames(avatar: Avatar, audio: np.ndarray, style: PlantedStyle, size: int = 256) -> np.ndarray:
    """Classic-mode frames ``[T, size, size, 3]`` uint8 of ``avatar`` saying ``audio`` with ``style``."""
    renderer = ClassicRenderer(size=size, flow_size=min(128, size // 2))
    prepared = renderer.prepare(small_avatar(avatar, size) if avatar.crop.shape[0] != size else avatar)
    motion = style.motion(face_size(prepared.source))
    features = ClassicFeatures()
    frames = motion.push(np.concatenate([features.push(audio), features.flush()])) + motion.flush()
    out = []
    with torch.inference_mode():
        for i in range(0, len(frames), 16):
            chunk = frames[i : i + 16]
            kp = torch.cat([renderer.drive(prepared, f.params) for f in chunk])
            rgb = renderer.render([prepared] * len(chunk), kp)
            out.append((rgb.permute(0, 2, 3, 1).numpy() * 255.0 + 0.5).astype(np.uint8))
    return np.concatenate(out)


def write_clip(out: str | Path, frames: np.ndarray, audio: np.ndarray, fps: int = 25) -> Path:
    with Mp4Writer(out, fps, frames.shape[1]) as writer:
        for rgb in frames:
            writer.video(rgb)
        writer.audio(audio)
    return Path(out)


def render_clip(out: str | Path, avatar: Avatar, audio: np.ndarray, style: PlantedStyle, size: int = 256) -> Path:
    """Render and write one planted clip (mp4, H.264 + AAC)."""
    return write_clip(out, render_frames(avatar, audio, style, size), audio)
