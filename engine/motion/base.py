"""Contracts between the motion stages, so the streaming pipeline does not know which path made a frame.

Frame ``i`` of a session covers audio ``[i/fps, (i+1)/fps)``; every stage keeps that indexing.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import numpy as np

from engine.keypoints import MotionParams


class MotionFrame(NamedTuple):
    frame_index: int  # video frame index on the session clock: pts = frame_index / fps
    params: MotionParams  # batch 1; absolute pose/expression for the avatar (already relative to its source)


class FeatureStage(Protocol):
    """Streaming audio features (``engine.audio``): 16 kHz mono float32 in, one feature row per video frame."""

    fps: int
    dim: int

    def push(self, pcm: np.ndarray) -> np.ndarray:
        """Append audio; return the newly complete feature rows ``[n, dim]`` (possibly ``n = 0``)."""
        ...

    def flush(self) -> np.ndarray:
        """End of stream: rows for the remaining audio, so the total is ``ceil(samples / 16000 * fps)``."""
        ...

    def reset(self) -> None: ...


class MotionStage(Protocol):
    """Features in, motion frames out (diffusion window scheduler, or classic analytic motion)."""

    lookahead_frames: int  # feature rows needed past frame i before frame i can be emitted

    def push(self, features: np.ndarray) -> list[MotionFrame]:
        """Append feature rows ``[n, dim]``; return the frames that became ready, in index order."""
        ...

    def flush(self) -> list[MotionFrame]:
        """End of stream: every remaining frame (one per pushed feature row in total)."""
        ...

    def interrupt(self) -> None:
        """Barge-in: drop buffered features and pending motion; later frames return smoothly to idle."""
        ...
