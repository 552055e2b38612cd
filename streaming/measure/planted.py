"""Talking clips with a known (planted) motion style, rendered by the engine's classic mode on a real photo.

The instrument of the personalization tests and benchmarks: speech (espeak-ng when installed, else a voiced
synthetic signal with syllables) drives classic motion whose lip amplitude and head sway are set, the frames are
rendered by the classic renderer and written as an mp4 with the audio. Learning from these clips must recover the
planted lip scale and head-motion style.

The lip amplitude is planted through the classic stage's ``lip_scale`` control when the stage honours it, else
through ``ClassicMotionConfig.jaw_gain`` (the jaw's travel, which is what the lip scale scales).
:func:`lip_amplitude` and :func:`head_style` measure what a learned personal generator reproduces of it.
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

from engine.audio.features import LogMelFeatures, log_mel_offline
from engine.audio.pcm import SAMPLE_RATE, resample
from engine.avatar.record import Avatar
from engine.keypoints import keypoints_from_params
from engine.media import VideoWriter
from engine.motion.classic import ClassicFeatures, ClassicMotion, ClassicMotionConfig
from engine.motion.control_schema import ControlState
from engine.motion.personal import PersonalMotion
from engine.motion.personal_model import PersonalModel
from engine.render.classic import ClassicRenderer, face_size
from engine.train.tracking import fit_similarity

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
    emotion: str = "neutral"  # classic mode's expression offsets (engine.motion.classic.EMOTIONS)
    intensity: float = 1.0

    def motion(self, face: float, fps: int = 25) -> ClassicMotion:
        has_control = "lip_scale" in ClassicMotion.CONTROLS
        gain = DEFAULT_JAW_GAIN if has_control else DEFAULT_JAW_GAIN * self.lip_scale
        motion = ClassicMotion(
            # the expression is there from the first frame (no ramp in from neutral)
            ClassicMotionConfig(
                fps=fps, jaw_gain=gain, head_motion=self.head_motion, seed=self.seed, emotion_ramp_frames=1
            ),
            face_size=face,
        )
        # ramp_s 0: the planted style holds from the first frame
        state = dataclasses.replace(ControlState(), emotion=self.emotion, intensity=self.intensity, ramp_s=0.0)
        if has_control:  # the classic stage's own control, once it has one
            state = dataclasses.replace(state, lip_scale=self.lip_scale)
        motion.apply_controls(state)
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
    with VideoWriter(out, fps, frames.shape[1]) as writer:
        for rgb in frames:
            writer.video(rgb)
        writer.audio(audio)
    return Path(out)


def render_clip(out: str | Path, avatar: Avatar, audio: np.ndarray, style: PlantedStyle, size: int = 256) -> Path:
    """Render and write one planted clip (mp4, H.264 + AAC)."""
    return write_clip(out, render_frames(avatar, audio, style, size), audio)


# --- what a learned generator reproduces of a planted style ------------------------------------------------------

LOWER_FACE = (17, 19, 20)  # the LIP keypoints speech moves most: the lip amplitude is measured on them
HEAD_KEYPOINTS = (0, 3, 4, 5, 9)  # forehead, nose tip, cheeks, nose bridge: the head, not the mouth


def lip_amplitude(model: PersonalModel, avatar: Avatar, audio: np.ndarray) -> float:
    """Regression slope of the personal generator's lower-face lip offsets on the default classic generator's
    (the same audio, head motion off): 1.6 for a person whose lips move 1.6x as far as classic mode's."""
    source = ClassicRenderer().prepare(avatar).source
    fs = face_size(source)
    stage = PersonalMotion(model, source, LogMelFeatures().silence(), unit=fs)
    stage.apply_controls(dataclasses.replace(ControlState(), head_pose="fixed", ramp_s=0.0, blink=False))
    ours = stage.push(log_mel_offline(audio)) + stage.flush()
    classic = ClassicMotion(ClassicMotionConfig(head_motion=0.0), face_size=fs)
    features = ClassicFeatures()
    ref = classic.push(np.concatenate([features.push(audio), features.flush()])) + classic.flush()
    n = min(len(ours), len(ref))
    base = source.params.exp[0]
    p = np.stack([(f.params.exp[0] - base)[list(LOWER_FACE), 1].numpy() for f in ours[:n]]).ravel()
    c = np.stack([(f.params.exp[0] - base)[list(LOWER_FACE), 1].numpy() for f in ref[:n]]).ravel()
    p, c = p - p.mean(), c - c.mean()
    return float(p @ c / (c @ c))


def head_style(model: PersonalModel, avatar: Avatar, frames: int) -> np.ndarray:
    """Standard deviations ``[roll (degrees), tx, ty (eye distances)]`` of the generated head motion over
    ``frames`` (a similarity fit of the head keypoints to the first frame's)."""
    source = ClassicRenderer().prepare(avatar).source
    fs = face_size(source)
    stage = PersonalMotion(model, source, LogMelFeatures().silence(), unit=fs)
    stage.apply_controls(dataclasses.replace(ControlState(), blink=False))
    audio = np.concatenate([speech(p) for p in PHRASES])
    rows = log_mel_offline(audio)
    rows = np.tile(rows, (frames // len(rows) + 1, 1))[:frames]
    out = stage.push(rows) + stage.flush()
    kp = torch.cat([keypoints_from_params(source.kp_canonical[None], f.params) for f in out])[:, :, :2].numpy()
    idx = list(HEAD_KEYPOINTS)
    sims = [fit_similarity(kp[0, idx], k[idx]) for k in kp]
    roll = np.degrees([s[1] for s in sims])
    shift = np.array([s[2] for s in sims]) / fs
    return np.array([roll.std(), shift[:, 0].std(), shift[:, 1].std()])
