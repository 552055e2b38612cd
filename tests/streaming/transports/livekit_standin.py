"""An in-memory stand-in for LiveKit rooms (no server can be installed here): just what LiveKit Agents' avatar
classes touch — participants, track publication, RPC between participants, byte streams — so the real
``AvatarRunner``, ``QueueAudioOutput``, ``DataStreamAudioOutput`` and ``DataStreamAudioReceiver`` run against it.
Media does not travel: published tracks are recorded, and what reaches them is what ``AVSynchronizer.push`` gets.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from livekit import rtc

_ids = itertools.count(1)


class StandInPublication:
    def __init__(self, track: Any) -> None:
        self.sid = f"TR_{next(_ids)}"
        self.kind = track.kind
        self.name = track.name
        self.track = track
        self.subscribed = True

    async def wait_for_subscription(self) -> None:
        return None


class StandInParticipant:
    """Another room's local participant, as this room sees it."""

    def __init__(self, local: StandInLocalParticipant) -> None:
        self.identity = local.identity
        self.kind = local.kind
        self.attributes = dict(local.attributes)
        self.state = rtc.ParticipantState.PARTICIPANT_STATE_ACTIVE
        self.track_publications: dict[str, StandInPublication] = {}


class StandInWriter:
    def __init__(self, readers: list[StandInReader]) -> None:
        self._readers = readers
        self.bytes_written = 0

    async def write(self, data: bytes) -> None:
        self.bytes_written += len(data)
        for reader in self._readers:
            reader.queue.put_nowait(bytes(data))

    async def aclose(self) -> None:
        for reader in self._readers:
            reader.queue.put_nowait(None)


class StandInReader:
    def __init__(self, info: rtc.ByteStreamInfo) -> None:
        self.info = info
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self.queue.get()
        if chunk is None:
            self.queue.put_nowait(None)
            raise StopAsyncIteration
        return chunk


class StandInLocalParticipant:
    def __init__(self, room: StandInRoom, identity: str, kind: int, attributes: dict[str, str]) -> None:
        self.room = room
        self.identity = identity
        self.kind = kind
        self.attributes = attributes
        self._rpc_handlers: dict[str, Callable[..., Any]] = {}
        self.published: list[StandInPublication] = []
        self.rpc_calls: list[tuple[str, str, str]] = []  # (destination, method, payload) performed

    def register_rpc_method(self, method_name: str, handler: Callable[..., Any] | None = None) -> Any:
        if handler is None:

            def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
                self._rpc_handlers[method_name] = fn
                return fn

            return decorate
        self._rpc_handlers[method_name] = handler
        return None

    async def perform_rpc(
        self, *, destination_identity: str, method: str, payload: str, response_timeout: float = 15.0, **_: Any
    ) -> str:
        self.rpc_calls.append((destination_identity, method, payload))
        target = self.room.peer(destination_identity)
        handler = target.local_participant._rpc_handlers.get(method) if target else None
        if handler is None:
            raise rtc.RpcError(rtc.RpcError.ErrorCode.UNSUPPORTED_METHOD, f"{method} is not registered")
        data = rtc.RpcInvocationData(f"req-{next(_ids)}", self.identity, payload, response_timeout, method)
        result = handler(data)
        if inspect.isawaitable(result):
            result = await result
        return str(result)

    async def publish_track(self, track: Any, options: Any = None) -> StandInPublication:
        publication = StandInPublication(track)
        self.published.append(publication)
        for room in self.room.peers:
            seen = room.remote_participants[self.identity]
            seen.track_publications[publication.sid] = publication
            room.emit("track_published", publication, seen)
        return publication

    async def stream_bytes(
        self, *, name: str, topic: str, destination_identities: list[str], attributes: dict[str, str], **_: Any
    ) -> StandInWriter:
        readers = []
        for identity in destination_identities:
            target = self.room.peer(identity)
            handler = target.byte_handlers.get(topic) if target else None
            if target is None or handler is None:
                continue
            info = rtc.ByteStreamInfo(
                stream_id=f"ST_{next(_ids)}",
                mime_type="application/octet-stream",
                topic=topic,
                timestamp=int(time.time() * 1000),
                size=None,
                attributes=dict(attributes),
                name=name,
            )
            reader = StandInReader(info)
            readers.append(reader)
            handler(reader, self.identity)
        return StandInWriter(readers)


class StandInRoom(rtc.EventEmitter[str]):
    """One participant's view of a room; :func:`join` puts several of them in the same room."""

    def __init__(
        self,
        identity: str,
        *,
        name: str = "room",
        kind: int = rtc.ParticipantKind.PARTICIPANT_KIND_AGENT,
        attributes: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.local_participant = StandInLocalParticipant(self, identity, kind, dict(attributes or {}))
        self.remote_participants: dict[str, StandInParticipant] = {}
        self.byte_handlers: dict[str, Callable[..., None]] = {}
        self.peers: list[StandInRoom] = []
        self.connected = True

    def isconnected(self) -> bool:
        return self.connected

    def register_byte_stream_handler(self, topic: str, handler: Callable[..., None]) -> None:
        self.byte_handlers[topic] = handler

    def unregister_byte_stream_handler(self, topic: str) -> None:
        self.byte_handlers.pop(topic, None)

    def peer(self, identity: str) -> StandInRoom | None:
        return next((r for r in self.peers if r.local_participant.identity == identity), None)

    def leave(self) -> None:
        """This participant leaves: the others see it disconnect."""
        self.connected = False
        for room in self.peers:
            gone = room.remote_participants.pop(self.local_participant.identity, None)
            room.peers.remove(self)
            if gone is not None:
                room.emit("participant_disconnected", gone)
        self.peers.clear()
        self.emit("disconnected", None)


def join(*rooms: StandInRoom) -> None:
    """Every room sees the others' participants (already active, tracks as published so far)."""
    for room in rooms:
        for other in rooms:
            if other is not room and other not in room.peers:
                room.peers.append(other)
                seen = StandInParticipant(other.local_participant)
                for publication in other.local_participant.published:
                    seen.track_publications[publication.sid] = publication
                room.remote_participants[other.local_participant.identity] = seen
                room.emit("participant_connected", seen)
                room.emit("participant_active", seen)


class StandInAgentSession(rtc.EventEmitter[str]):
    """The little of ``AgentSession`` an avatar plugin touches: ``output.audio`` and events."""

    class _Output:
        audio: Any = None

    def __init__(self) -> None:
        super().__init__()
        self.output = self._Output()
