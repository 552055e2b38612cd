"""One reader of a live session's output, any number of subscribers: one session renders once, and every peer that
shows it (the peer that opened it, WHEP viewers) gets the same frames and audio.

A pump reads ``next_video`` / ``next_audio`` as soon as the session releases them (the session never waits for its
readers: it drops what a slow reader leaves, so the pump always reads, with or without subscribers) and hands each
item to every subscriber's bounded queue. A subscriber that falls behind loses its oldest items, counted in
``video_dropped`` / ``audio_dropped``, and never slows the session or the other subscribers. Each subscriber is a
media source with the session's own ``next_video`` / ``next_audio``, so the paced tracks read it unchanged.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, Generic, TypeVar

from streaming.api import LiveSession
from streaming.frames import OutputAudio, VideoFrame

logger = logging.getLogger(__name__)

T = TypeVar("T")
VIDEO_BACKLOG = 50  # frames (2 s at 25 fps) a subscriber may fall behind before its oldest are dropped
AUDIO_BACKLOG = 200  # output audio chunks (a few seconds)


class _Queue(Generic[T]):
    """Bounded FIFO that drops its oldest item when full; ``None`` (the end) is kept and repeated for every get."""

    def __init__(self, limit: int) -> None:
        self._items: deque[T | None] = deque()
        self._limit = limit
        self._ready = asyncio.Event()
        self.dropped = 0
        self.ended = False

    def put(self, item: T | None) -> None:
        if self.ended:
            return
        if item is None:
            self.ended = True
        elif len(self._items) >= self._limit:
            self._items.popleft()
            self.dropped += 1
        self._items.append(item)
        self._ready.set()

    async def get(self) -> T | None:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item = self._items[0]
        if item is not None:  # the end stays at the head: every later get sees it too
            self._items.popleft()
        return item


class Subscriber:
    """One peer's view of a fanned-out session (``next_video`` / ``next_audio`` like the session's own)."""

    def __init__(self, fanout: Fanout) -> None:
        self._fanout = fanout
        self.video: _Queue[VideoFrame] = _Queue(VIDEO_BACKLOG)
        self.audio: _Queue[OutputAudio] = _Queue(AUDIO_BACKLOG)

    async def next_video(self) -> VideoFrame | None:
        return await self.video.get()

    async def next_audio(self) -> OutputAudio | None:
        return await self.audio.get()

    @property
    def video_dropped(self) -> int:
        return self.video.dropped

    def close(self) -> None:
        """Stop receiving; pending and later reads return the end."""
        self._fanout.unsubscribe(self)
        self.video.put(None)
        self.audio.put(None)


class Fanout:
    def __init__(self, session: LiveSession) -> None:
        self.session = session
        self._subscribers: set[Subscriber] = set()
        self._tasks: list[asyncio.Task[Any]] = []
        self.ended = False
        self.video_frames = 0  # frames read from the session (each rendered once, however many subscribers)

    def start(self) -> None:
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._pump(self.session.next_video, "video"), name=f"fanout-{self.session.id}-v"),
                asyncio.create_task(self._pump(self.session.next_audio, "audio"), name=f"fanout-{self.session.id}-a"),
            ]

    def subscribe(self) -> Subscriber:
        subscriber = Subscriber(self)
        if self.ended:
            subscriber.video.put(None)
            subscriber.audio.put(None)
        else:
            self._subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.discard(subscriber)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    async def _pump(self, read: Any, kind: str) -> None:
        try:
            while True:
                item = await read()
                if item is not None and kind == "video":
                    self.video_frames += 1
                for subscriber in list(self._subscribers):
                    getattr(subscriber, kind).put(item)
                if item is None:
                    return
        except asyncio.CancelledError:
            raise
        except Exception:  # a session bug ends this session's output, never the server
            logger.exception("session %s: reading its %s failed", self.session.id, kind)
            for subscriber in list(self._subscribers):
                getattr(subscriber, kind).put(None)
        finally:
            if kind == "video":
                self.ended = True

    def stop(self) -> None:
        """Stop reading (the session is closed by its owner) and end every subscriber."""
        for task in self._tasks:
            task.cancel()
        self.ended = True
        for subscriber in list(self._subscribers):
            subscriber.close()

    async def close(self) -> None:
        self.stop()
        await asyncio.gather(*self._tasks, return_exceptions=True)
