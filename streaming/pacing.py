"""Transport-neutral pacing: the playout clock that releases a session's frames and audio at their pts.

Any transport that sends live media (WebRTC tracks, an agent framework's output, a virtual camera) paces both
streams on one :class:`SessionClock`, anchored by the first video frame, so audio and video leave in sync whatever
the speed at which the session produced them.
"""

from __future__ import annotations

import asyncio
import time

# The session releases a frame and its audio together; the clock starts this much after the first frame came
# so that each 20 ms audio slot is sent after (not racing) the chunk that fills it.
ANCHOR_MARGIN_S = 0.03


class SessionClock:
    """The shared playout clock of one peer, anchored by the first video frame about to be sent.

    Video anchors it because the session's first frame only comes out after the pipeline latency; audio waits
    for the anchor (or anchors it itself when no video comes), so it never runs ahead of the picture.
    """

    def __init__(self, margin_s: float = ANCHOR_MARGIN_S) -> None:
        self._t0: float | None = None
        self._margin_s = margin_s
        self.first_pts = 0.0  # pts of the frame that anchored the clock
        self.anchored = asyncio.Event()
        self.resyncs = 0

    @property
    def started(self) -> bool:
        return self._t0 is not None

    def now_pts(self) -> float:
        """Seconds on the output clock now (0 before the clock is anchored)."""
        if self._t0 is None:
            return 0.0
        return time.monotonic() - self._t0

    def shift(self, seconds: float) -> None:
        """Move the whole schedule later: the session itself fell behind, and both tracks follow it."""
        if self._t0 is not None:
            self._t0 += seconds
            self.resyncs += 1

    async def wait_until(self, pts: float) -> float:
        """Sleep until ``pts`` is due; returns how late it is (seconds, >= 0 when late)."""
        now = time.monotonic()
        if self._t0 is None:
            self._t0 = now - pts + self._margin_s
            self.first_pts = pts
            self.anchored.set()
        delay = self._t0 + pts - now
        if delay > 0:
            await asyncio.sleep(delay)
        return -delay
