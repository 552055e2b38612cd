"""The avatar as a pipecat video service (``pip install avatar-engine[pipecat]``): TTS audio in, the avatar's frames
and that audio, delayed to match them, out. The engine runs in this process (classic or neural, any backend);
no separate server is needed.

Place :class:`AvatarVideoService` right after the TTS service, before the output transport::

    runtime = Runtime.create(RuntimeConfig(mode="classic"))  # inside the running loop; share it between pipelines
    avatar = AvatarVideoService(runtime=runtime, controls={"emotion": "happy"})
    params = TransportParams(audio_out_enabled=True, **avatar_video_params(runtime))
    pipeline = Pipeline([transport.input(), stt, user_agg, llm, tts, avatar, transport.output(), assistant_agg])

Frames in (downstream): ``TTSAudioRawFrame`` at any rate goes to the engine and is not passed on; an
``InterruptionFrame`` stops the avatar speaking at once (the engine forgets the speech, no stale audio follows);
:class:`AvatarControlFrame` (or :meth:`AvatarVideoService.set_controls`) changes emotion, intensity, ... through
the engine's one control schema, and a control the running motion generator cannot honour is reported upstream
as an ``ErrorFrame`` with the reason. Frames out: ``OutputImageRawFrame`` (RGB, ``fps`` per second, for
``video_out_is_live=True`` transports) and the TTS audio again, as ``TTSAudioRawFrame`` with its original rate,
channels and context id, each piece with the frame it belongs to. Other downstream data and control frames
(``TTSStoppedFrame``, text frames, ...) keep their place after the audio that came before them, so the output
transport sees the same stream the TTS produced, only later by the engine's latency. System frames and upstream
frames pass straight through.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pipecat.frames.frames import (
    CancelFrame,
    DataFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    OutputImageRawFrame,
    StartFrame,
    SystemFrame,
    TTSAudioRawFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from engine.avatar.record import Avatar
from engine.motion.control_schema import ControlValueError, validate_control
from streaming.api import ControlError, LiveSession
from streaming.pipelines import RuntimeConfig
from streaming.runtime import Runtime
from streaming.session import Session
from streaming.transports.speech import Picture, Speech, SpeechSync, as_int16

logger = logging.getLogger(__name__)

DRAIN_MARGIN_S = 2.0  # on EndFrame, wait for the speech still in flight plus this much before ending anyway


@dataclass
class AvatarControlFrame(DataFrame):
    """Change the avatar's controls (the engine's control schema: emotion, intensity, lip_scale, ...), in order
    with the audio around it."""

    controls: Mapping[str, Any] = field(default_factory=dict)


def avatar_video_params(runtime: Runtime) -> dict[str, Any]:
    """The ``TransportParams`` video fields this avatar needs (live video of the runtime's size and fps)."""
    size = int(runtime.renderer.size)
    return {
        "video_out_enabled": True,
        "video_out_is_live": True,
        "video_out_width": size,
        "video_out_height": size,
        "video_out_framerate": int(runtime.config.session.fps),
    }


class _End:
    """The marker an EndFrame leaves in the speech ledger: all speech before it has been pushed on."""


class AvatarVideoService(FrameProcessor):
    """A pipecat frame processor that runs the avatar engine in-process (see the module docstring).

    Pass a ``runtime`` (shared by every pipeline of the process: one render worker batches all their frames) or a
    ``config`` to build one for this pipeline (closed with it). ``avatar``: a stored avatar's name, an
    :class:`~engine.avatar.record.Avatar`, or None for the default avatar. ``controls``: the initial controls.
    """

    def __init__(
        self,
        *,
        runtime: Runtime | None = None,
        config: RuntimeConfig | None = None,
        avatar: str | Avatar | None = None,
        controls: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if runtime is not None and config is not None:
            raise ValueError("pass either a runtime or a config to build one, not both")
        self._runtime = runtime
        self._config = config
        self._owns_runtime = runtime is None
        self._avatar = avatar
        self._initial_controls = dict(controls or {})
        self._session: Session | None = None
        self._sync: SpeechSync | None = None
        self._pump: asyncio.Task[None] | None = None
        self._ended = asyncio.Event()

    # --- public ------------------------------------------------------------------------------------------------

    @property
    def session(self) -> LiveSession | None:
        """The engine session (None before the pipeline started and after it ended)."""
        return self._session

    @property
    def speech(self) -> SpeechSync | None:
        """The speech ledger (counters: ``pushed_samples``, ``released_samples``, ``interrupted_samples``)."""
        return self._sync

    def set_controls(self, controls: Mapping[str, Any]) -> dict[str, Any]:
        """Validate and apply controls now; returns the new control state. Raises
        :class:`~streaming.api.ControlError` naming the problem (unknown key, bad value, a control the running
        motion generator cannot honour). Before the pipeline starts, the controls are kept for the session."""
        if self._session is None:
            try:
                validate_control({**self._initial_controls, **controls})
            except ControlValueError as exc:
                raise ControlError(str(exc)) from exc
            self._initial_controls.update(controls)
            return dict(self._initial_controls)
        return self._session.control(controls)

    def metrics(self) -> dict[str, float]:
        out = dict(self._session.metrics()) if self._session is not None else {}
        if self._sync is not None:
            out.update(
                speech_pushed_samples=float(self._sync.pushed_samples),
                speech_released_samples=float(self._sync.released_samples),
                speech_interrupted_samples=float(self._sync.interrupted_samples),
                rest_pictures=float(self._sync.rest_pictures),
            )
        return out

    # --- pipecat -----------------------------------------------------------------------------------------------

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame):
            await self.push_frame(frame, direction)
            try:
                await self._open()
            except Exception as exc:  # a missing avatar, weights that cannot load, refused initial controls
                await self._close(drain=False)
                await self.push_error(f"avatar: cannot start: {exc}", exception=exc, force_treat_as_permanent=True)
        elif isinstance(frame, EndFrame):
            await self._close(drain=True)
            await self.push_frame(frame, direction)
        elif isinstance(frame, CancelFrame):
            await self._close(drain=False)
            await self.push_frame(frame, direction)
        elif direction != FrameDirection.DOWNSTREAM:
            await self.push_frame(frame, direction)
        elif isinstance(frame, InterruptionFrame):
            held = self._sync.interrupt() if self._sync is not None else []
            await self.push_frame(frame, direction)
            for item in held:
                if isinstance(item, Frame) and not item.interruptible:
                    await self.push_frame(item)
        elif isinstance(frame, TTSAudioRawFrame):
            await self._speak(frame)
        elif isinstance(frame, AvatarControlFrame):
            try:
                self.set_controls(frame.controls)
            except ControlError as exc:
                await self.push_error(f"avatar control refused: {exc}", exception=exc)
        elif isinstance(frame, SystemFrame) or self._sync is None:
            await self.push_frame(frame, direction)
        else:
            self._sync.mark(frame)

    async def cleanup(self) -> None:
        await super().cleanup()
        await self._close(drain=False)

    # --- internals ---------------------------------------------------------------------------------------------

    async def _open(self) -> None:
        if self._session is not None:
            return
        if self._runtime is None:
            self._runtime = Runtime.create(self._config or RuntimeConfig())
        if self._runtime.pipeline.banner:
            logger.info("avatar: %s", self._runtime.pipeline.banner)
        self._session = await self._runtime.open_session(self._avatar, controls=self._initial_controls or None)
        self._sync = SpeechSync(self._session)
        self._ended.clear()
        self._pump = self.create_task(self._push_events(self._sync), name=f"{self}::avatar")

    async def _speak(self, frame: TTSAudioRawFrame) -> None:
        if self._sync is None:
            return
        try:
            if len(frame.audio) % (2 * frame.num_channels):
                raise ValueError(
                    f"{len(frame.audio)} bytes is not a whole number of {frame.num_channels}-channel int16 samples"
                )
            pcm = as_int16(np.frombuffer(frame.audio, dtype="<i2"), frame.num_channels)
            self._sync.push(pcm, frame.sample_rate, meta=frame.context_id)
        except ValueError as exc:
            await self.push_error(f"avatar: TTS audio rejected: {exc}", exception=exc)

    async def _push_events(self, sync: SpeechSync) -> None:
        async for event in sync:
            if isinstance(event, Picture):
                rgb = np.ascontiguousarray(event.frame.rgb)
                image = OutputImageRawFrame(image=rgb.tobytes(), size=(rgb.shape[1], rgb.shape[0]), format="RGB")
                await self.push_frame(image)
            elif isinstance(event, Speech):
                audio = TTSAudioRawFrame(
                    audio=np.ascontiguousarray(event.pcm).tobytes(),
                    sample_rate=event.sample_rate,
                    num_channels=int(event.pcm.shape[1]),
                    context_id=event.meta,
                )
                await self.push_frame(audio)
            elif isinstance(event.item, _End):
                self._ended.set()
            else:
                await self.push_frame(event.item)
        self._ended.set()

    async def _close(self, *, drain: bool) -> None:
        sync, session = self._sync, self._session
        if sync is not None and drain:
            # let the speech already handed over play out, and its frames follow it, before ending
            sync.mark(_End())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._ended.wait(), sync.pending_s + DRAIN_MARGIN_S + 1.0)
        self._sync = None
        self._session = None
        if self._pump is not None:
            await self.cancel_task(self._pump)
            self._pump = None
        if sync is not None:
            await sync.aclose()
        if session is not None and self._runtime is not None:
            await self._runtime.close_session(session)
        if self._owns_runtime and self._runtime is not None:
            runtime, self._runtime = self._runtime, None
            await runtime.aclose()


__all__ = ["AvatarControlFrame", "AvatarVideoService", "avatar_video_params"]
