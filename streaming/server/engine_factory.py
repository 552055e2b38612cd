"""The server's session factory over the engine runtime (:mod:`streaming.runtime`): one renderer per process,
every session on the shared render worker."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from streaming.api import LiveSession

logger = logging.getLogger(__name__)


class EngineFactoryError(RuntimeError):
    """The engine cannot serve as asked (no such avatar, unreadable weights, a mode that cannot be built)."""


class RuntimeFactory:
    """:class:`streaming.server.app.SessionFactory` backed by a :class:`streaming.runtime.Runtime`."""

    def __init__(self, runtime: Any, avatar: str | None) -> None:
        self.runtime = runtime
        self.avatar = avatar

    def describe(self) -> dict[str, Any]:
        from engine.motion.emotion import EMOTIONS

        info = dict(self.runtime.describe())
        info.pop("sessions", None)  # the server counts its own
        info["avatar"] = self.avatar or "default"
        info["emotions"] = list(EMOTIONS)
        return info

    async def open_session(self) -> LiveSession:
        session: LiveSession = await self.runtime.open_session(self.avatar)
        return session

    async def close(self) -> None:
        await self.runtime.aclose()


async def open_engine_factory(
    *,
    avatar: str | None = None,
    weights: Path | None = None,
    preset: str | None = None,
    mode: str | None = None,
    backend: str = "eager",
) -> RuntimeFactory:
    """Build the runtime for ``mode`` (None: neural when weights are imported, else classic) and check that the
    avatar loads, so a typo fails at start-up rather than at the first visitor."""
    from engine.config import ConfigError
    from streaming.runtime import Runtime, RuntimeBuildError, RuntimeConfig

    options: dict[str, Any] = {"mode": mode or "auto", "backend": backend}
    if weights is not None:
        options["weights"] = str(weights)
    if preset is not None:
        options["preset"] = preset
    try:
        runtime = Runtime.create(RuntimeConfig(**options))
    except (RuntimeBuildError, FileNotFoundError, ValueError, ConfigError, KeyError) as exc:
        raise EngineFactoryError(f"cannot build the {options['mode']} runtime: {exc}") from exc
    try:
        runtime.prepare(runtime.load_avatar(avatar))
    except Exception as exc:
        await runtime.aclose()
        raise EngineFactoryError(f"cannot load avatar {avatar or 'default'!r}: {exc}") from exc
    if runtime.untrained:
        logger.warning("%s", runtime.untrained_message)
    return RuntimeFactory(runtime, avatar)
