"""Received video frames waiting for the time they are shown (the window and the virtual camera share it)."""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

import numpy as np

from streaming.transports.webrtc.playout import PlayoutClock

# With audio playing but its clock not started yet (the first sound is still in aiortc's jitter buffer), a
# frame waits at most this long after it arrived before it is shown anyway.
MAX_WAIT_FOR_AUDIO_S = 0.5
MAX_QUEUE = 50  # two seconds at 25 fps: a picture that far behind its sound is dropped


class PendingFrame(NamedTuple):
    pts_s: float
    arrival: float  # time.monotonic() when it was received
    rgb: np.ndarray  # [H, W, 3] uint8


class FrameQueue:
    """Frames in arrival order; ``take_due(now)`` returns the newest one whose time has come.

    Without a playout clock a frame is due when it arrives. With one (the avatar's audio is played), frame
    ``pts`` is due when the audio device plays ``pts``, minus ``lead_s`` (time the output itself adds later,
    e.g. a virtual camera's one-frame delay).
    """

    def __init__(self, clock: PlayoutClock | None = None, lead_s: float = 0.0) -> None:
        self.clock = clock
        self.lead_s = lead_s
        self._frames: deque[PendingFrame] = deque()
        self.skipped = 0  # frames that were never shown because a newer one was due as well

    def put(self, rgb: np.ndarray, pts_s: float, arrival: float) -> None:
        if len(self._frames) >= MAX_QUEUE:
            self._frames.popleft()
            self.skipped += 1
        self._frames.append(PendingFrame(pts_s, arrival, rgb))

    def due_at(self, frame: PendingFrame) -> float:
        if self.clock is None:
            return frame.arrival
        due = self.clock.due(frame.pts_s)
        if due is None:
            return frame.arrival + MAX_WAIT_FOR_AUDIO_S
        return due - self.lead_s

    def next_due(self) -> float | None:
        """When the oldest waiting frame is due (monotonic s), or None when none waits."""
        return self.due_at(self._frames[0]) if self._frames else None

    def take_due(self, now: float) -> PendingFrame | None:
        found: PendingFrame | None = None
        while self._frames and self.due_at(self._frames[0]) <= now:
            if found is not None:
                self.skipped += 1
            found = self._frames.popleft()
        return found
