"""What a transport (WebRTC server, websocket ingest, offline renderer, Python client) needs of a session.

``streaming.session`` implements it; transports depend only on this protocol.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from streaming.frames import OutputAudio, VideoFrame


class ControlError(ValueError):
    """A control message is invalid (unknown key, unknown emotion, out-of-range or NaN value)."""


class LiveSession(Protocol):
    id: str
    fps: int
    size: int  # video frames are size x size
    untrained: bool  # rendering from untrained weights: transports must show a banner

    def push_audio(self, pcm: np.ndarray, sample_rate: int) -> None:
        """Any rate; ``pcm`` is ``[n]`` or ``[n, channels]`` int16 or float32. Raises ValueError on bad input."""
        ...

    def control(self, message: dict[str, Any]) -> dict[str, Any]:
        """Apply a control message (validated); returns the resulting state. Raises ControlError."""
        ...

    def interrupt(self) -> None: ...

    def end_of_stream(self) -> None: ...

    async def next_video(self) -> VideoFrame | None:
        """The next video frame in pts order (None after the end). Never stalls: idles without audio."""
        ...

    async def next_audio(self) -> OutputAudio | None:
        """The output audio that belongs to the frames (input delayed by the pipeline latency)."""
        ...

    def metrics(self) -> dict[str, float]: ...

    async def close(self) -> None:
        """Free the session's tasks and buffers (idempotent)."""
        ...
