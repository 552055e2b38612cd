"""The aiohttp application: the page, ``/offer`` (aiortc JSON), WHIP, the websocket ingest, health and metrics.

Routes (``*`` = bearer token required when the server has one):

- ``GET /``, ``GET /static/*``: the browser page (plain HTML/JS/CSS).
- ``GET /health``: status, mode, banner, session count (public: the page reads its banner here).
- ``POST /offer`` *: ``{"sdp", "type": "offer"}`` -> ``{"sdp", "type": "answer", "session", "mode", ...}``.
- ``POST /whip`` * (RFC 9725): ``application/sdp`` offer -> ``201`` + ``Location`` + answer SDP;
  ``DELETE /whip/{id}`` * ends the session; ``PATCH`` (trickle ICE) -> 405: candidates are all in the answer.
- ``GET /ws?session=ID`` *: websocket ingest (binary PCM16 mono 16 kHz, text control JSON).
- ``GET /metrics`` *: Prometheus text.
- ``POST /emotions`` *: store an emotion from an uploaded example; ``GET /emotions``: the stored ones
  (:mod:`streaming.transports.webrtc.emotions`).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from streaming.api import SessionFactory
from streaming.prometheus import render_metrics, session_totals
from streaming.transports.webrtc.config import ServerConfig
from streaming.transports.webrtc.emotions import emotion_handlers
from streaming.transports.webrtc.peer import OfferError, Peer
from streaming.transports.websocket import websocket_ingest

logger = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent / "web"

SERVER_KEY: web.AppKey[AvatarServer] = web.AppKey("avatar_server")


class AvatarServer:
    def __init__(self, factory: SessionFactory, config: ServerConfig) -> None:
        self.factory = factory
        self.config = config
        self.peers: dict[str, Peer] = {}
        self._reserved = 0  # slots taken by sessions still being negotiated
        self.closed_totals: dict[str, float] = {}
        self.counters: dict[str, float] = {
            "sessions_opened_total": 0,
            "sessions_closed_total": 0,
            "sessions_rejected_total": 0,
            "auth_failures_total": 0,
            "bad_requests_total": 0,
        }

    # --- registry -----------------------------------------------------------------------------------------

    @property
    def active(self) -> int:
        return len(self.peers) + self._reserved

    def _forget(self, peer: Peer) -> None:
        if self.peers.get(peer.id) is peer:
            del self.peers[peer.id]
            self.counters["sessions_closed_total"] += 1
            # the session's counters stay in the server's totals after it ends (counters never go back)
            for key, value in session_totals(peer.snapshot()).items():
                self.closed_totals[key] = self.closed_totals.get(key, 0.0) + value

    async def open_peer(self, offer_sdp: str) -> tuple[Peer, str]:
        """Reserve a slot, open a session and answer ``offer_sdp``; raises web.HTTPException on failure."""
        if self.active >= self.config.max_sessions:
            self.counters["sessions_rejected_total"] += 1
            raise web.HTTPServiceUnavailable(
                text=f"all {self.config.max_sessions} session slots are in use; retry later",
                headers={"Retry-After": str(self.config.retry_after_s)},
            )
        self._reserved += 1
        peer: Peer | None = None
        try:
            try:
                session = await self.factory.open_session()
            except Exception as exc:
                logger.exception("cannot open a session")
                raise web.HTTPInternalServerError(
                    text="the engine could not open a session (see the server log)"
                ) from exc
            peer = Peer(session, self.config, self._forget)
            self.peers[peer.id] = peer
            answer = await peer.answer(offer_sdp)
        except OfferError as exc:
            self.counters["bad_requests_total"] += 1
            if peer is not None:
                await peer.close("bad offer")
            raise web.HTTPBadRequest(text=str(exc)) from exc
        except BaseException:
            if peer is not None:
                await peer.close("failed to open")
            raise
        finally:
            self._reserved -= 1
        self.counters["sessions_opened_total"] += 1
        return peer, answer

    async def shutdown(self) -> None:
        await asyncio.gather(*(p.close("server shutdown") for p in list(self.peers.values())))
        await self.factory.close()

    def info(self) -> dict[str, Any]:
        info = dict(self.factory.describe())
        info.setdefault("banner", None)
        return info

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


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _protected(handler: Handler, allow_query: bool = False) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        server = request.app[SERVER_KEY]
        if not server.authorized(request, allow_query=allow_query):
            server.counters["auth_failures_total"] += 1
            raise web.HTTPUnauthorized(text="missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return wrapped


# --- handlers -----------------------------------------------------------------------------------------------


async def index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def health(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    info = server.info()
    return web.json_response(
        {"status": "ok", "sessions": len(server.peers), "max_sessions": server.config.max_sessions, **info}
    )


async def offer(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    try:
        body = await request.json()
    except ValueError as exc:
        server.counters["bad_requests_total"] += 1
        raise web.HTTPBadRequest(text=f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict) or not isinstance(body.get("sdp"), str) or body.get("type") != "offer":
        server.counters["bad_requests_total"] += 1
        raise web.HTTPBadRequest(text='expected a JSON object {"sdp": "<offer SDP>", "type": "offer"}')
    peer, answer = await server.open_peer(body["sdp"])
    info = server.info()
    info["untrained"] = bool(info.get("untrained")) or bool(peer.session.untrained)
    return web.json_response({"sdp": answer, "type": "answer", "session": peer.id, **info})


async def whip_post(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    if request.content_type != "application/sdp":
        server.counters["bad_requests_total"] += 1
        raise web.HTTPUnsupportedMediaType(text="WHIP offers must be sent as Content-Type: application/sdp")
    sdp = await request.text()
    peer, answer = await server.open_peer(sdp)
    etag = f'"{secrets.token_hex(8)}"'
    return web.Response(
        status=201,
        text=answer,
        content_type="application/sdp",
        headers={"Location": f"/whip/{peer.id}", "ETag": etag},
    )


async def whip_delete(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    peer = server.peers.get(request.match_info["session"])
    if peer is None:
        raise web.HTTPNotFound(text="no such session")
    await peer.close("ended by the client (WHIP DELETE)")
    return web.Response(status=200)


async def whip_patch(request: web.Request) -> web.Response:
    raise web.HTTPMethodNotAllowed("PATCH", ["DELETE"], text="trickle ICE is not supported: the answer has all")


async def whip_options(request: web.Request) -> web.Response:
    return web.Response(status=204, headers={"Accept-Post": "application/sdp"})


async def metrics(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    values = dict(server.counters)
    values["sessions_active"] = len(server.peers)
    values["sessions_max"] = server.config.max_sessions
    text = render_metrics(
        values, [p.snapshot() for p in server.peers.values()], server.closed_totals, server.factory.metrics()
    )
    return web.Response(text=text, content_type="text/plain", charset="utf-8", headers={"Cache-Control": "no-cache"})


async def ws_handler(request: web.Request) -> web.StreamResponse:
    return await websocket_ingest(request, request.app[SERVER_KEY].peers)


def create_app(factory: SessionFactory, config: ServerConfig | None = None) -> web.Application:
    """The server as an aiohttp application; its sessions and the factory are closed on app cleanup."""
    config = config or ServerConfig()
    app = web.Application(client_max_size=config.client_max_size)
    server = AvatarServer(factory, config)
    app[SERVER_KEY] = server
    app.router.add_get("/", index)
    app.router.add_get("/health", health)
    app.router.add_post("/offer", _protected(offer))
    app.router.add_post("/whip", _protected(whip_post))
    app.router.add_route("OPTIONS", "/whip", whip_options)
    app.router.add_delete("/whip/{session}", _protected(whip_delete))
    app.router.add_route("PATCH", "/whip/{session}", _protected(whip_patch))
    app.router.add_get("/ws", _protected(ws_handler, allow_query=True))
    app.router.add_get("/metrics", _protected(metrics))
    upload_emotion, list_emotions = emotion_handlers(factory)
    app.router.add_post("/emotions", _protected(upload_emotion))
    app.router.add_get("/emotions", list_emotions)
    app.router.add_static("/static/", WEB_DIR, follow_symlinks=False)

    async def on_cleanup(app: web.Application) -> None:
        await app[SERVER_KEY].shutdown()

    app.on_cleanup.append(on_cleanup)
    return app


async def serve_app(
    app: web.Application, host: str, port: int, stop: asyncio.Event, on_started: Callable[[str], None] | None = None
) -> None:
    """Serve ``app`` on ``host:port`` until ``stop`` is set, then close every session."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        if on_started is not None:
            sockets = [s.getsockname() for s in getattr(site._server, "sockets", None) or []]
            bound = sockets[0][1] if sockets else port
            on_started(f"http://{host if ':' not in host else f'[{host}]'}:{bound}/")
        await stop.wait()
    finally:
        await runner.cleanup()
