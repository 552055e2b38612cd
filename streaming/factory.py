"""The session factory a server uses (:class:`streaming.api.SessionFactory`), over the engine runtime: one
pipeline per process, every session on the shared render worker."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import numpy as np

from engine.avatar.face import FaceLocator
from engine.config import ConfigError
from engine.motion.control_schema import ControlState
from engine.motion.emotion import EMOTIONS
from engine.motion.examples import describe, emotion_example
from engine.motion.library import LibraryError, MotionLibrary, classic_stored, neural_stored
from engine.paths import default_weights_dir
from engine.render.neural import NeuralRenderer
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
        start_state: ControlState | None = None,
    ) -> None:
        self.runtime = runtime
        self.avatar = avatar
        self.latency_budget_s = latency_budget_s
        self._picture = picture  # [S, S, 3] uint8: the avatar's face crop, which sessions render from
        self.start_state = start_state  # the control state a session starts from (its motion stage's own)

    def describe(self) -> dict[str, Any]:
        info = dict(self.runtime.describe())
        info.pop("sessions", None)  # the server counts its own
        info["avatar"] = self.avatar or "default"
        info["emotions"] = list(EMOTIONS)
        info["stored_emotions"] = self.stored_emotions()
        info["registry"] = registry()
        if self.start_state is not None:  # the schema's defaults as this motion generator starts (e.g. smoothing)
            start = self.start_state.as_dict()
            schema = info.get("control_schema") or {}
            info["control_schema"] = {k: {**v, "default": start.get(k, v.get("default"))} for k, v in schema.items()}
        if self.latency_budget_s is not None:
            info["latency_budget_ms"] = round(self.latency_budget_s * 1000.0, 1)
        return info

    def stored_emotions(self) -> list[str]:
        """The emotions with a stored example the served avatar's sessions can show (in this renderer's space)."""
        library = MotionLibrary()
        name = self.avatar or "default"
        try:
            renderer = self.runtime.renderer
            avatar = self.runtime.load_avatar(self.avatar)
            if isinstance(renderer, NeuralRenderer):
                source = self.runtime.prepare(avatar).source
                neural = neural_stored(library, name, source, renderer.nets.weights_id).poll()
                return sorted(neural[0].stored) if neural is not None else []
            classic = classic_stored(library, name, avatar.landmarks).poll()
            return sorted(classic[0]) if classic is not None else []
        except (LibraryError, ValueError, OSError) as exc:
            logger.warning("cannot list the stored emotions: %s", exc)
            return []

    async def add_emotion(self, name: str, example: Path, neutral: Path | None = None) -> dict[str, Any]:
        """Store emotion ``name`` from an uploaded example for the served avatar (``engine emotion add``'s flow, in
        this renderer's space; a worker thread runs it). Raises ``ValueError`` with the reason when it cannot."""
        renderer = self.runtime.renderer if isinstance(self.runtime.renderer, NeuralRenderer) else None
        avatar = self.runtime.load_avatar(self.avatar)

        def work() -> dict[str, Any]:
            record = emotion_example(
                name,
                example,
                neutral=neutral,
                avatar=avatar,
                scope=avatar.name,
                renderer=renderer,
                locator=FaceLocator(default_weights_dir() / "detectors"),
                mesh=True,
            )
            MotionLibrary().put_emotion(record)
            return {"name": record.name, "spaces": record.spaces(), "message": f"stored {describe(record)}"}

        return await asyncio.to_thread(work)

    async def open_session(self) -> LiveSession:
        session: LiveSession = await self.runtime.open_session(self.avatar)
        return session

    def preview(self) -> np.ndarray | None:
        return self._picture

    def metrics(self) -> dict[str, float]:
        motion = self.runtime.pipeline.motion_stats
        return {**self.runtime.worker.stats(), **(motion() if motion is not None else {})}

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
    start = getattr(motion, "state", None)  # as the session reads it (streaming.session)
    return RuntimeFactory(
        runtime, avatar, budget, picture=record.crop, start_state=start if isinstance(start, ControlState) else None
    )
