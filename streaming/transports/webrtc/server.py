"""The server's registry: the sessions it hosts (each with one fan-out, the peer that opened it and its viewers),
every peer by its unguessable id, capacity, auth and the counters behind ``/metrics``.

A session is opened by a ``/offer`` page, a WHIP publisher or a WHEP player (``POST /whep``); it takes one of the
``max_sessions`` slots and renders once. WHEP viewers of an existing session (``POST /whep/{session}``) take one of
that session's ``max_viewers`` slots instead and receive the same frames. When the peer that opened a session goes,
the session ends and so do its viewers; a viewer that goes leaves the session running.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from streaming.api import LiveSession, SessionFactory
from streaming.prometheus import session_totals
from streaming.transports.webrtc.admission import Slot, Slots
from streaming.transports.webrtc.config import ServerConfig
from streaming.transports.webrtc.fanout import Fanout
from streaming.transports.webrtc.peer import Peer
from streaming.transports.webrtc.sdp import Offer, OfferError, Role

logger = logging.getLogger(__name__)

# transport counters of a peer snapshot that add up over the peers that showed a session
PEER_COUNTERS = (
    "video_sent",
    "video_repeated",
    "video_dropped",
    "audio_frames_sent",
    "audio_late_samples",
    "mic_frames",
    "clock_resyncs",
)


class Hosted:
    """One session the server runs: its fan-out, its slot, the peer that opened it and the viewers watching it."""

    def __init__(self, session: LiveSession, slot: Slot, max_viewers: int) -> None:
        self.session = session
        self.slot = slot
        self.fanout = Fanout(session)
        self.owner: Peer | None = None
        self.viewers: dict[str, Peer] = {}
        self.viewer_slots = Slots(max_viewers)
        self.viewer_leases: dict[str, Slot] = {}
        self.closed_peers: Counter[str] = Counter()  # counters of its peers that left (counters never go back)
        self.opened = False  # answered: counted in sessions_opened_total (a failed open is not a session)

    @property
    def peers(self) -> list[Peer]:
        return [p for p in (self.owner, *self.viewers.values()) if p is not None]

    def snapshot(self) -> dict[str, Any]:
        """The session's numbers (once) with its peers' transport numbers: counters summed over every peer that
        showed it, the send rate and delay of the busiest / slowest peer now."""
        peers = self.peers
        snaps = [p.snapshot() for p in peers]
        base = next((s for s in snaps), None)
        out: dict[str, Any] = dict(base) if base is not None else {"session": self.session.id, "session_metrics": {}}
        for key in PEER_COUNTERS:
            out[key] = int(sum(s.get(key, 0) for s in snaps) + self.closed_peers[key])
        senders = [s for s in snaps if s.get("role") != "whip"]
        out["fps"] = max((s["fps"] for s in senders), default=0.0)
        out["send_latency_ms"] = max((s["send_latency_ms"] for s in senders), default=0.0)
        out["viewers"] = len(self.viewers)
        return out


class AvatarServer:
    def __init__(self, factory: SessionFactory, config: ServerConfig) -> None:
        self.factory = factory
        self.config = config
        self.slots = Slots(config.max_sessions)
        self.hosted: dict[str, Hosted] = {}  # by the id of the peer that opened the session
        self.peers: dict[str, Peer] = {}  # every peer (openers and viewers) by id
        self._host_of: dict[str, Hosted] = {}  # peer id -> its session
        self.closed_totals: dict[str, float] = {}
        self.counters: dict[str, float] = {
            "sessions_opened_total": 0,
            "sessions_closed_total": 0,
            "sessions_rejected_total": 0,
            "viewers_opened_total": 0,
            "auth_failures_total": 0,
            "bad_requests_total": 0,
        }

    # --- registry -----------------------------------------------------------------------------------------

    @property
    def active(self) -> int:
        """Session slots held (sessions running and sessions being opened)."""
        return self.slots.held

    def host_of(self, peer_id: str) -> Hosted | None:
        hosted = self._host_of.get(peer_id)
        if hosted is None or hosted.owner is None or hosted.owner.closing:
            return None
        return hosted

    def _register(self, peer: Peer, hosted: Hosted) -> None:
        self.peers[peer.id] = peer
        self._host_of[peer.id] = hosted

    def _forget(self, peer: Peer) -> None:
        """A peer is closing: out of the registry, its slot back; the opener takes its session and viewers along."""
        if self.peers.get(peer.id) is not peer:
            return
        del self.peers[peer.id]
        hosted = self._host_of.pop(peer.id)
        snap = peer.snapshot()
        for key in PEER_COUNTERS:
            hosted.closed_peers[key] += snap.get(key, 0)
        if peer is not hosted.owner:
            hosted.viewers.pop(peer.id, None)
            lease = hosted.viewer_leases.pop(peer.id, None)
            if lease is not None:
                lease.release()
            return
        owner_id = peer.id
        if self.hosted.pop(owner_id, None) is hosted and hosted.opened:
            self.counters["sessions_closed_total"] += 1
            # the session's counters stay in the server's totals after it ends (counters never go back)
            for key, value in session_totals(snap).items():
                self.closed_totals[key] = self.closed_totals.get(key, 0.0) + value
        hosted.fanout.stop()
        hosted.slot.release()
        for viewer in list(hosted.viewers.values()):
            viewer.request_close("the session it showed ended")

    async def _open_session(self) -> LiveSession:
        try:
            return await self.factory.open_session()
        except Exception as exc:
            logger.exception("cannot open a session")
            raise web.HTTPInternalServerError(text="the engine could not open a session (see the server log)") from exc

    def _refuse(self, text: str) -> web.HTTPServiceUnavailable:
        self.counters["sessions_rejected_total"] += 1
        return web.HTTPServiceUnavailable(text=text, headers={"Retry-After": str(self.config.retry_after_s)})

    async def open_session_peer(self, offer: Offer, role: Role) -> tuple[Peer, str]:
        """A new session for a checked ``offer`` and the peer that opened it; raises web.HTTPException on
        failure (503 when every slot is held), having given back whatever it took."""
        slot = self.slots.take()
        if slot is None:
            raise self._refuse(f"all {self.config.max_sessions} session slots are in use; retry later")
        peer: Peer | None = None
        try:
            session = await self._open_session()
            hosted = Hosted(session, slot, self.config.max_viewers)
            hosted.fanout.start()
            source = hosted.fanout.subscribe() if role != "whip" else None
            peer = Peer(session, self.config, self._forget, role, source=source, owns_session=True)
            hosted.owner = peer
            self.hosted[peer.id] = hosted
            self._register(peer, hosted)
            answer = await peer.answer(offer)
        except BaseException as exc:
            if peer is not None:
                await peer.close("bad offer" if isinstance(exc, OfferError) else "failed to open")
            else:
                slot.release()
            raise
        hosted.opened = True
        self.counters["sessions_opened_total"] += 1
        logger.info(
            "session %s opened (%s): watch it with POST /whep/%s or /watch?session=%s",
            peer.name,
            role,
            peer.id,
            peer.id,
        )
        return peer, answer

    async def open_viewer(self, session_ref: str, offer: Offer) -> tuple[Peer, str]:
        """A WHEP viewer of the running session that ``session_ref`` (any of its peers' ids) names."""
        hosted = self.host_of(session_ref)
        if hosted is None:
            raise web.HTTPNotFound(text=f"no live session {session_ref!r}")
        lease = hosted.viewer_slots.take()
        if lease is None:
            raise self._refuse(f"the session already has its {self.config.max_viewers} viewers; retry later")
        peer = Peer(
            hosted.session, self.config, self._forget, "whep", source=hosted.fanout.subscribe(), owns_session=False
        )
        hosted.viewers[peer.id] = peer
        hosted.viewer_leases[peer.id] = lease
        self._register(peer, hosted)
        try:
            answer = await peer.answer(offer)
        except BaseException as exc:
            await peer.close("bad offer" if isinstance(exc, OfferError) else "failed to open")
            raise
        self.counters["viewers_opened_total"] += 1
        return peer, answer

    async def shutdown(self) -> None:
        await asyncio.gather(*(p.close("server shutdown") for p in list(self.peers.values())))
        await self.factory.close()

    def info(self) -> dict[str, Any]:
        info = dict(self.factory.describe())
        info.setdefault("banner", None)
        return info

    def listing(self) -> list[dict[str, Any]]:
        """The running sessions: the id that names them in URLs, who opened them, and their viewers."""
        now = time.monotonic()
        out = []
        for sid, hosted in self.hosted.items():
            owner = hosted.owner
            assert owner is not None
            out.append(
                {
                    "id": sid,
                    "name": hosted.session.id,
                    "opened_by": owner.role,
                    "age_s": round(now - owner.created, 1),
                    "viewers": len(hosted.viewers),
                    "whep": f"/whep/{sid}",
                    "watch": f"/watch?session={sid}",
                }
            )
        return out

    def metric_values(self) -> dict[str, float]:
        values = dict(self.counters)
        values["sessions_active"] = len(self.hosted)
        values["sessions_max"] = self.config.max_sessions
        values["viewers_active"] = sum(len(h.viewers) for h in self.hosted.values())
        return values

    def session_snapshots(self) -> list[dict[str, Any]]:
        return [h.snapshot() for h in self.hosted.values()]

    # --- auth ---------------------------------------------------------------------------------------------

    def authorized(self, request: web.Request, allow_query: bool = False) -> bool:
        token = self.config.token
        if token is None:
            return True
        given = ""
        header = request.headers.get("Authorization", "")
        if header[:7].lower() == "bearer ":
            given = header[7:].strip()
        elif allow_query:
            # browsers cannot set headers on a websocket handshake
            given = request.query.get("token", "")
        return hmac.compare_digest(given.encode(), token.encode())


SERVER_KEY: web.AppKey[AvatarServer] = web.AppKey("avatar_server")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def protected(handler: Handler, allow_query: bool = False) -> Handler:
    """``handler`` behind the bearer token (401 + ``WWW-Authenticate: Bearer`` without it)."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        server = request.app[SERVER_KEY]
        if not server.authorized(request, allow_query=allow_query):
            server.counters["auth_failures_total"] += 1
            raise web.HTTPUnauthorized(text="missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return wrapped
