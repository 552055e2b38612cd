"""The avatar in LiveKit Agents (``pip install avatar-engine[livekit]``): LiveKit's ``VideoGenerator`` contract on
the engine, wired both ways LiveKit runs avatars. See docs/livekit.md for the guide.

* :class:`EngineVideoGenerator`: ``push_audio`` (agent speech, any rate, and ``AudioSegmentEnd``),
  ``clear_buffer`` (barge-in: the engine forgets the speech and the mouth stops at once), and an async iterator of
  ``rtc.VideoFrame`` (RGB24, the session's fps, idle frames between utterances), ``rtc.AudioFrame`` (the speech
  again, at the runner's rate, each piece with the frame it belongs to) and ``AudioSegmentEnd`` (after the last
  audio of the segment), which is what ``AvatarRunner`` turns into ``lk.playback_started`` / ``playback_finished``.
* In-process, :class:`EngineAvatar`: the agent's audio output becomes a ``QueueAudioOutput`` read by an
  ``AvatarRunner`` that publishes the avatar's tracks from the agent's own participant.
* As a separate avatar worker: the agent side (:class:`RemoteEngineAvatar`) mints a token for the worker with
  ``lk.publish_on_behalf`` set to the agent's identity (:func:`avatar_token`), has it launched, and streams its
  audio to it with ``DataStreamAudioOutput``; the worker (:func:`serve_avatar_worker`) joins the room with that
  token, receives the audio with ``DataStreamAudioReceiver`` (which answers ``lk.clear_buffer`` and sends the
  playback notifications) and publishes the avatar on the agent's behalf.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from livekit import api, rtc
from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF
from livekit.agents.utils import wait_for_participant
from livekit.agents.voice.avatar import (
    AudioSegmentEnd,
    AvatarOptions,
    AvatarRunner,
    AvatarSession,
    DataStreamAudioOutput,
    DataStreamAudioReceiver,
    QueueAudioOutput,
    VideoGenerator,
)

from engine.audio.pcm import StreamingResampler
from engine.avatar.record import Avatar
from streaming.api import LiveSession
from streaming.runtime import Runtime
from streaming.session import Session
from streaming.transports.speech import Picture, Speech, SpeechSync, as_int16

logger = logging.getLogger(__name__)

AUDIO_SAMPLE_RATE = 24_000  # the runner's audio track (most TTS voices speak at 24 kHz; others are resampled)
QUEUE_PICTURES = 1  # a frame waiting for the runner (whose synchronizer queues two more): newer ones replace it
AVATAR_IDENTITY = "avatar-engine"


class _SegmentEnd:
    """The marker an ``AudioSegmentEnd`` leaves in the speech ledger."""


class EngineVideoGenerator(VideoGenerator):
    """LiveKit's ``VideoGenerator`` over one engine session (see the module docstring). The session belongs to
    the caller; :meth:`aclose` only stops reading it."""

    def __init__(
        self, session: LiveSession, *, audio_sample_rate: int = AUDIO_SAMPLE_RATE, audio_channels: int = 1
    ) -> None:
        if audio_channels not in (1, 2):
            raise ValueError(f"audio_channels must be 1 or 2, got {audio_channels}")
        self.session = session
        self.audio_sample_rate = int(audio_sample_rate)
        self.audio_channels = int(audio_channels)
        self.speech = SpeechSync(session, max_pictures=QUEUE_PICTURES)
        # the runner's synchronizer: its audio queue (~100 ms) is emptied on clear_buffer too, when known
        self.av_sync: rtc.AVSynchronizer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._resampler: StreamingResampler | None = None
        self._resampling_from: int | None = None

    @property
    def options(self) -> AvatarOptions:
        """What the ``AvatarRunner`` must publish: the session's frame size and fps, this generator's audio."""
        return AvatarOptions(
            video_width=self.session.size,
            video_height=self.session.size,
            video_fps=float(self.session.fps),
            audio_sample_rate=self.audio_sample_rate,
            audio_channels=self.audio_channels,
        )

    async def push_audio(self, frame: rtc.AudioFrame | AudioSegmentEnd) -> None:
        if isinstance(frame, AudioSegmentEnd):
            self._push(self._flush_resampler())
            self.speech.mark(_SegmentEnd())
            return
        pcm = as_int16(np.frombuffer(frame.data, dtype=np.int16), frame.num_channels)
        if frame.sample_rate == self.audio_sample_rate and frame.num_channels == self.audio_channels:
            self._push(pcm)
        else:
            self._push(self._convert(pcm, frame.sample_rate))

    def clear_buffer(self) -> None:
        self.speech.interrupt()  # the runner reports the interrupted playback itself
        self._resampler = None
        self._resampling_from = None
        if self.av_sync is not None:
            task = asyncio.get_running_loop().create_task(self.av_sync.clear_queue())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def __aiter__(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        return self._frames()

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.speech.aclose()

    # --- internals ---------------------------------------------------------------------------------------------

    async def _frames(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        async for event in self.speech:
            if isinstance(event, Picture):
                rgb = np.ascontiguousarray(event.frame.rgb)
                yield rtc.VideoFrame(rgb.shape[1], rgb.shape[0], rtc.VideoBufferType.RGB24, rgb.tobytes())
            elif isinstance(event, Speech):
                pcm = np.ascontiguousarray(event.pcm)
                yield rtc.AudioFrame(pcm.tobytes(), event.sample_rate, pcm.shape[1], pcm.shape[0])
            elif isinstance(event.item, _SegmentEnd):
                yield AudioSegmentEnd()

    def _push(self, pcm: np.ndarray) -> None:
        if pcm.shape[0]:
            self.speech.push(pcm, self.audio_sample_rate)

    def _convert(self, pcm: np.ndarray, rate: int) -> np.ndarray:
        """Speech at another rate or channel count -> the runner's (streamed, so chunking changes nothing)."""
        if self._resampler is None or self._resampling_from != rate:
            head = self._flush_resampler()
            self._resampler = StreamingResampler(out_rate=self.audio_sample_rate)
            self._resampling_from = rate
            self._push(head)
        mono = self._resampler.push(pcm, rate)
        return self._to_output(mono)

    def _flush_resampler(self) -> np.ndarray:
        if self._resampler is None:
            return np.zeros((0, self.audio_channels), np.int16)
        tail = self._resampler.flush()
        self._resampler = None
        self._resampling_from = None
        return self._to_output(tail)

    def _to_output(self, mono: np.ndarray) -> np.ndarray:
        pcm = (np.clip(mono, -1.0, 1.0) * 32767.0).astype(np.int16)[:, None]  # [n, 1]
        return np.repeat(pcm, self.audio_channels, axis=1)


class EngineAvatar:
    """The avatar in the agent's own process: ``AvatarRunner`` + ``QueueAudioOutput``, tracks published by the
    agent's participant. ``runtime`` is shared by every job of the process (one render worker batches them)."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        avatar: str | Avatar | None = None,
        controls: Mapping[str, Any] | None = None,
        audio_sample_rate: int = AUDIO_SAMPLE_RATE,
    ) -> None:
        self.runtime = runtime
        self.avatar = avatar
        self.controls = dict(controls or {})
        self.audio_sample_rate = audio_sample_rate
        self.session: Session | None = None
        self.generator: EngineVideoGenerator | None = None
        self.audio_output: QueueAudioOutput | None = None
        self.runner: AvatarRunner | None = None

    async def start(self, agent_session: Any, room: rtc.Room) -> None:
        """Open the engine session, start the runner in ``room`` and route ``agent_session``'s audio to it."""
        self.session = await self.runtime.open_session(self.avatar, controls=self.controls or None)
        self.generator = EngineVideoGenerator(self.session, audio_sample_rate=self.audio_sample_rate)
        self.audio_output = QueueAudioOutput(sample_rate=self.audio_sample_rate)
        self.runner = AvatarRunner(
            room, audio_recv=self.audio_output, video_gen=self.generator, options=self.generator.options
        )
        self.generator.av_sync = self.runner.av_sync
        try:
            await self.runner.start()
        except BaseException:
            await self.aclose()
            raise
        agent_session.output.audio = self.audio_output

    def control(self, message: Mapping[str, Any]) -> dict[str, Any]:
        """Change emotion, intensity, ... (the engine's control schema); raises ``ControlError`` with the reason."""
        if self.session is None:
            raise RuntimeError("start() the avatar first")
        return self.session.control(message)

    async def aclose(self) -> None:
        runner, generator, session = self.runner, self.generator, self.session
        self.runner = self.generator = self.session = None
        if runner is not None:
            await runner.aclose()
        if generator is not None:
            await generator.aclose()
        if session is not None:
            await self.runtime.close_session(session)


def avatar_token(
    *,
    room: str,
    agent_identity: str,
    avatar_identity: str = AVATAR_IDENTITY,
    api_key: str | None = None,
    api_secret: str | None = None,
) -> str:
    """A token for the avatar worker: joins ``room`` as an agent participant that publishes on behalf of
    ``agent_identity`` (``lk.publish_on_behalf``), so clients show its tracks as the agent's. Key and secret
    default to ``LIVEKIT_API_KEY`` / ``LIVEKIT_API_SECRET``."""
    return (
        api.AccessToken(api_key, api_secret)
        .with_identity(avatar_identity)
        .with_name("Avatar")
        .with_kind("agent")
        .with_grants(api.VideoGrants(room_join=True, room=room))
        .with_attributes({ATTRIBUTE_PUBLISH_ON_BEHALF: agent_identity})
        .to_jwt()
    )


@dataclass(frozen=True)
class WorkerLaunch:
    """What an avatar worker needs to join: the server, a token from :func:`avatar_token`, the room."""

    url: str
    token: str
    room: str


class RemoteEngineAvatar(AvatarSession):
    """Agent side of a separate avatar worker: mints the worker's token, calls ``launch`` (start
    examples/livekit_avatar_worker.py, post to a dispatcher, ...), and streams the agent's audio to the worker
    with ``DataStreamAudioOutput``. The worker answers with ``lk.playback_started`` / ``lk.playback_finished``."""

    def __init__(
        self,
        *,
        launch: Callable[[WorkerLaunch], Awaitable[None]],
        avatar_identity: str = AVATAR_IDENTITY,
        url: str | None = None,
        api_key: str | None = None,
        api_secret: str | None = None,
    ) -> None:
        super().__init__()
        self._launch = launch
        self._identity = avatar_identity
        self._url = url
        self._api_key = api_key
        self._api_secret = api_secret

    @property
    def avatar_identity(self) -> str:
        return self._identity

    @property
    def provider(self) -> str:
        return "avatar-engine"

    async def start(self, agent_session: Any, room: rtc.Room) -> None:
        await super().start(agent_session, room)
        url = self._url or os.environ.get("LIVEKIT_URL")
        if not url:
            raise ValueError("the LiveKit server URL is unknown: pass url= or set LIVEKIT_URL")
        token = avatar_token(
            room=room.name,
            agent_identity=room.local_participant.identity,
            avatar_identity=self._identity,
            api_key=self._api_key,
            api_secret=self._api_secret,
        )
        await self._launch(WorkerLaunch(url, token, room.name))
        agent_session.output.audio = DataStreamAudioOutput(
            room,
            destination_identity=self._identity,
            wait_remote_track=rtc.TrackKind.KIND_VIDEO,  # speak once the avatar's video is published
            wait_playback_start=True,  # the runner sends lk.playback_started when the first audio plays
        )


async def serve_avatar_worker(
    room: rtc.Room,
    runtime: Runtime,
    *,
    agent_identity: str | None = None,
    avatar: str | Avatar | None = None,
    controls: Mapping[str, Any] | None = None,
    audio_sample_rate: int = AUDIO_SAMPLE_RATE,
    stop: asyncio.Event | None = None,
) -> None:
    """The avatar worker in a connected ``room``: receive the agent's audio over data streams, publish the
    avatar's tracks, until the agent leaves, the room disconnects or ``stop`` is set. ``agent_identity`` None:
    the first agent participant (what ``DataStreamAudioReceiver`` picks)."""
    stop = stop or asyncio.Event()
    kind = None if agent_identity else rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
    joined = asyncio.ensure_future(wait_for_participant(room=room, identity=agent_identity, kind=kind))
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({joined, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not joined.done():
            joined.cancel()
    if joined.cancelled():
        return  # stopped before the agent came
    agent = joined.result()
    session = await runtime.open_session(avatar, controls=dict(controls) if controls else None)
    generator = EngineVideoGenerator(session, audio_sample_rate=audio_sample_rate)
    receiver = DataStreamAudioReceiver(room, sender_identity=agent.identity)
    runner = AvatarRunner(room, audio_recv=receiver, video_gen=generator, options=generator.options)
    generator.av_sync = runner.av_sync

    def on_left(participant: rtc.RemoteParticipant) -> None:
        if participant.identity == agent.identity:
            logger.info("agent %s left: stopping the avatar worker", participant.identity)
            stop.set()

    def on_disconnected(*_: Any) -> None:
        stop.set()

    room.on("participant_disconnected", on_left)
    room.on("disconnected", on_disconnected)
    try:
        await runner.start()
        await stop.wait()
    finally:
        room.off("participant_disconnected", on_left)
        room.off("disconnected", on_disconnected)
        with contextlib.suppress(Exception):
            await runner.aclose()
        await generator.aclose()
        await runtime.close_session(session)


__all__ = [
    "AVATAR_IDENTITY",
    "EngineAvatar",
    "EngineVideoGenerator",
    "RemoteEngineAvatar",
    "WorkerLaunch",
    "avatar_token",
    "serve_avatar_worker",
]
