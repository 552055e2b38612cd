"""The engine runtime: hosts the sessions of one process and their shared render worker.

What the sessions run is assembled by :mod:`streaming.pipelines` (the composition root); the runtime only opens
and closes sessions on it. How a transport (server, CLI, client) opens a session::

    from streaming.pipelines import RuntimeConfig
    from streaming.runtime import Runtime

    runtime = Runtime.create(RuntimeConfig(mode="classic"))  # inside a running event loop
    if runtime.pipeline.banner:
        print(runtime.pipeline.banner)  # e.g. untrained weights: the output is noise
    session = await runtime.open_session("default")  # avatar name (None: the default avatar), or an Avatar
    session.control({"emotion": "happy", "intensity": 0.8})
    session.push_audio(pcm, 48_000)  # any rate, [n] or [n, channels], int16 or float32
    frame = await session.next_video()  # VideoFrame (pts = frame_index / fps), None after the end
    audio = await session.next_audio()  # OutputAudio: the input delayed to match the frames
    session.interrupt()  # barge-in
    await session.close()
    await runtime.aclose()  # every session, the worker task and its thread
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import torch

from engine.avatar.prepare import prepare_avatar
from engine.avatar.record import Avatar
from engine.avatar.store import DEFAULT_NAME, AvatarStore
from engine.render.base import PreparedAvatar
from streaming.batching import BatchRenderer
from streaming.clock import Clock, MonotonicClock
from streaming.pipelines import Pipeline, RuntimeConfig, build
from streaming.session import Session, SessionConfig

logger = logging.getLogger(__name__)


class Runtime:
    """Owns the pipeline's renderer, the shared render worker and the open sessions. Build with :meth:`create`."""

    def __init__(self, pipeline: Pipeline, *, clock: Clock | None = None) -> None:
        self.pipeline = pipeline
        self.config = pipeline.config
        self.mode = pipeline.renderer_name
        self.renderer = pipeline.renderer
        self.clock: Clock = clock or MonotonicClock()
        self.worker = BatchRenderer(self.renderer, self.clock, self.config.batch)
        self.untrained = pipeline.untrained
        self.sessions: dict[str, Session] = {}
        self._prepared: dict[tuple[str, str], PreparedAvatar] = {}
        self._closed = False

    @classmethod
    def create(cls, config: RuntimeConfig | None = None, *, clock: Clock | None = None) -> Runtime:
        """Build the pipeline for ``config`` (:func:`streaming.pipelines.build`); call inside a running loop."""
        return cls(build(config or RuntimeConfig()), clock=clock)

    def describe(self) -> dict[str, Any]:
        """What this runtime serves (JSON-able): the pipeline's description, sessions and batching."""
        return {**self.pipeline.describe(), "sessions": len(self.sessions), "max_batch": self.config.batch.max_batch}

    # --- avatars ---

    def load_avatar(self, name: str | None = None, image: str | Path | None = None) -> Avatar:
        """A stored avatar by name (None: the default avatar), or a portrait image prepared now (not stored)."""
        if image is not None:
            path = Path(image)
            return prepare_avatar(path, name or path.stem)
        return AvatarStore().get(name or DEFAULT_NAME)

    def prepare(self, avatar: Avatar) -> PreparedAvatar:
        """The renderer's per-avatar state (computed once per avatar and runtime)."""
        key = (avatar.name, avatar.content_hash)
        if key not in self._prepared:
            with torch.inference_mode():
                self._prepared[key] = self.renderer.prepare(avatar)
        return self._prepared[key]

    # --- sessions ---

    async def open_session(
        self,
        avatar: str | Avatar | None = None,
        *,
        config: SessionConfig | None = None,
        controls: dict[str, Any] | None = None,
        session_id: str | None = None,
    ) -> Session:
        """A new :class:`streaming.api.LiveSession` for ``avatar`` on the shared render worker."""
        if self._closed:
            raise RuntimeError("the runtime is closed")
        record = avatar if isinstance(avatar, Avatar) else self.load_avatar(avatar)
        prepared = self.prepare(record)
        features, motion = self.pipeline.stages(prepared)
        cfg = config or self.config.session
        if cfg.fps != features.fps:
            raise ValueError(f"this runtime's feature stage runs at {features.fps} fps, not {cfg.fps}")
        session = Session(
            features=features,
            motion=motion,
            renderer=self.renderer,
            prepared=prepared,
            worker=self.worker,
            config=cfg,
            clock=self.clock,
            session_id=session_id,
            motion_name=self.pipeline.motion_name,
        )
        if controls:
            try:
                session.control(controls)
            except Exception:
                await session.close()
                raise
        self.sessions[session.id] = session
        return session

    async def close_session(self, session: Session) -> None:
        self.sessions.pop(session.id, None)
        await session.close()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.gather(*(s.close() for s in self.sessions.values()))
        self.sessions.clear()
        await self.worker.aclose()
