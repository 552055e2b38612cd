"""Typed frames that flow between the session's stages (pipecat-style: small immutable messages).

Data frames: :class:`AudioChunk` -> :class:`FeatureRows` -> :class:`MotionOut` -> :class:`Driven` -> (render
worker) -> :class:`VideoFrame` with its :class:`OutputAudio`. System frames: :class:`Control` (a validated control
state, applied by the motion stage on its own thread in order with the audio), :class:`Interrupt` (barge-in) and
:class:`EndOfStream`.

Time is counted in samples of the session's 16 kHz audio clock and in video frame indices; ``pts`` in seconds
is derived, never stored independently, so audio and video cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.motion.base import MotionFrame
from engine.motion.control_schema import ControlState


@dataclass(frozen=True)
class AudioChunk:
    """Input audio already converted to the engine clock: float32 mono 16 kHz in [-1, 1]."""

    samples: np.ndarray  # [n] float32
    start: int  # index of samples[0] on the session's audio clock


@dataclass(frozen=True)
class FeatureRows:
    """Feature rows ``[n, dim]`` from the feature stage (one row per video frame, in frame order)."""

    rows: np.ndarray


@dataclass(frozen=True)
class MotionOut:
    motion: MotionFrame


@dataclass(frozen=True)
class Driven:
    """Driving keypoints of one frame, ready for the renderer."""

    frame_index: int
    kp: torch.Tensor  # [1, 21, 3]


@dataclass(frozen=True)
class VideoFrame:
    frame_index: int  # pts = frame_index / fps
    fps: int
    rgb: np.ndarray  # [H, W, 3] uint8
    created: float = 0.0  # monotonic time the frame left the renderer (for latency metrics)
    repeated: bool = False  # the same picture as the slot before: the renderer was late for this slot
    lag: int = 0  # slots between this picture's own frame and this one (0: its own; > 0: a late or repeated one)

    @property
    def pts(self) -> float:
        return self.frame_index / self.fps


@dataclass(frozen=True)
class OutputAudio:
    """Output audio aligned with video: ``samples`` start at ``start`` on the output clock (= frame n at n/fps)."""

    samples: np.ndarray  # [n] float32 mono 16 kHz
    start: int


@dataclass(frozen=True)
class Control:
    """The session's new control state (validated against the schema and the motion stage when it was sent)."""

    state: ControlState


@dataclass(frozen=True)
class Interrupt:
    """Barge-in: drop buffered audio and motion now, return to idle smoothly."""


@dataclass(frozen=True)
class EndOfStream:
    """No more input audio: flush every stage, then close the output."""
