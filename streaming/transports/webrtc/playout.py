"""What the client's outputs share: its error type and the playout clock that keeps picture and sound together.

The server numbers both tracks on one output clock and starts them at the same instant, and aiortc numbers each
received track from its first packet, so a video frame and the audio samples with the same presentation time
(pts, seconds) belong together. When the avatar's audio is played, the audio device decides when each sample is
heard; the :class:`PlayoutClock` remembers that mapping (pts -> local ``time.monotonic()``) and the window and
the virtual camera show each frame when its pts is heard.
"""

from __future__ import annotations

import threading

# How far the audio device's clock may move from the stream's before the mapping is re-anchored instead of being
# smoothed (an underrun, a gap in the received audio, or a device that was suspended).
RESYNC_S = 0.1
SMOOTHING = 0.05  # weight of the newest audio callback in the smoothed mapping (callbacks jitter by a few ms)


class ClientError(RuntimeError):
    """The client cannot run as asked (server refused, missing optional dependency, bad input file)."""


class PlayoutClock:
    """Stream time (pts, s) -> the local monotonic time at which it is presented, set by the audio output.

    Thread-safe: the audio device's callback thread updates it and the event loop reads it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._offset: float | None = None  # monotonic time - pts

    def update(self, pts_s: float, heard_at: float) -> None:
        """The sample at ``pts_s`` is heard at monotonic time ``heard_at``."""
        offset = heard_at - pts_s
        with self._lock:
            if self._offset is None or abs(offset - self._offset) > RESYNC_S:
                self._offset = offset
            else:
                self._offset += SMOOTHING * (offset - self._offset)

    @property
    def running(self) -> bool:
        with self._lock:
            return self._offset is not None

    def due(self, pts_s: float) -> float | None:
        """When the picture at ``pts_s`` must be shown (monotonic s), or None before any audio was played."""
        with self._lock:
            return None if self._offset is None else pts_s + self._offset
