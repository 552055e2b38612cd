"""What a transport (WebRTC server, websocket ingest, offline renderer, agent frameworks) needs of the engine.

:class:`LiveSession` is one live session (``streaming.session`` implements it); :class:`SessionFactory` opens
them and describes what it serves (``streaming.factory`` implements it over the runtime). Transports depend only
on these two protocols; ``streaming.testing`` ships doubles of both for transport tests.
"""

from __future__ import annotations

from collections.abc import Mapping
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

    def control(self, message: Mapping[str, Any]) -> dict[str, Any]:
        """Validate a control message now and return the resulting state; it takes effect in order with the
        audio. Raises ControlError naming the problem (unknown key, bad value, a control this mode cannot do)."""
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


class SessionFactory(Protocol):
    """What a server needs from the engine: a description of what it serves, and new sessions."""

    def describe(self) -> dict[str, Any]:
        """JSON-able facts for ``/health`` and the page: ``mode``, ``motion``, ``controls`` (the keys sessions
        honour), ``untrained``, ``banner`` (a line the user must see, or None), ``avatar``, ``fps``, ``size``."""
        ...

    async def open_session(self) -> LiveSession: ...

    def preview(self) -> np.ndarray | None:
        """The avatar at rest, ``[H, W, 3]`` uint8 RGB: what the page shows before a session starts (None: none)."""
        ...

    def metrics(self) -> dict[str, float]:
        """Numbers of what serves the sessions (the render worker: calls, frames, batch size, call time)."""
        ...

    async def close(self) -> None: ...
