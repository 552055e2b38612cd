"""The session factory a server uses (:class:`streaming.api.SessionFactory`), over the engine runtime: one
pipeline per process, every session on the shared render worker."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from engine.config import ConfigError
from engine.motion.emotion import EMOTIONS
from export.backends import BackendError
from streaming.api import LiveSession
from streaming.pipelines import PipelineError, RuntimeConfig, registry
from streaming.runtime import Runtime
from streaming.session import latency_budget_s, stage_lookahead

logger = logging.getLogger(__name__)


class EngineFactoryError(RuntimeError):
    """The engine cannot serve as asked (no such avatar, unreadable weights, a pipeline that cannot be built)."""


class RuntimeFactory:
    """:class:`streaming.api.SessionFactory` backed by a :class:`streaming.runtime.Runtime`."""

    def __init__(
        self,
        runtime: Runtime,
        avatar: str | None,
        latency_budget_s: float | None = None,
        picture: np.ndarray | None = None,
    ) -> None:
        self.runtime = runtime
        self.avatar = avatar
        self.latency_budget_s = latency_budget_s
        self._picture = picture  # [S, S, 3] uint8: the avatar's face crop, which sessions render from

    def describe(self) -> dict[str, Any]:
        info = dict(self.runtime.describe())
        info.pop("sessions", None)  # the server counts its own
        info["avatar"] = self.avatar or "default"
        info["emotions"] = list(EMOTIONS)
        info["registry"] = registry()
        if self.latency_budget_s is not None:
            info["latency_budget_ms"] = round(self.latency_budget_s * 1000.0, 1)
        return info

    async def open_session(self) -> LiveSession:
        session: LiveSession = await self.runtime.open_session(self.avatar)
        return session

    def preview(self) -> np.ndarray | None:
        return self._picture

    def metrics(self) -> dict[str, float]:
        return self.runtime.worker.stats()

    async def close(self) -> None:
        await self.runtime.aclose()


async def open_engine_factory(config: RuntimeConfig, avatar: str | None = None) -> RuntimeFactory:
    """Build the runtime and check that the avatar loads, so a typo fails at start-up rather than at the first
    visitor."""
    try:
        runtime = Runtime.create(config)
    except (PipelineError, BackendError, FileNotFoundError, ValueError, ConfigError, KeyError) as exc:
        raise EngineFactoryError(f"cannot build the runtime: {exc}") from exc
    try:
        record = runtime.load_avatar(avatar)
        prepared = runtime.prepare(record)
        features, motion = runtime.pipeline.stages(prepared)  # what each session will run: its latency budget
    except Exception as exc:
        await runtime.aclose()
        raise EngineFactoryError(f"cannot load avatar {avatar or 'default'!r}: {exc}") from exc
    session = config.session
    budget = latency_budget_s(session, session.lookahead_frames or stage_lookahead(features, motion, session.fps))
    return RuntimeFactory(runtime, avatar, budget, picture=record.crop)
