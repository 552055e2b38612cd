"""The aiohttp application: the page, ``/offer`` (aiortc JSON), WHIP and WHEP, the websocket ingest, health and
metrics.

Routes (``*`` = bearer token required when the server has one):

- ``GET /``, ``GET /static/*``: the browser page (plain HTML/JS/CSS).
- ``GET /health``: status, mode, banner, session count (public: the page reads its banner here).
- ``GET /avatar.png`` * (token also as ``?token=``): the avatar at rest, the page's picture before Start.
- ``GET /favicon.ico``: the page's icon.
- ``POST /offer`` *: ``{"sdp", "type": "offer"}`` -> ``{"sdp", "type": "answer", "session", "mode", ...}``.
- ``POST /whip`` *, ``POST /whep`` *, ``POST /whep/{session}`` * and their resources: see ``whip.py``.
- ``GET /sessions`` *: the running sessions (id, who opened them, viewers) and where to watch each.
- ``GET /watch?session=ID&token=T``: a page that watches a session over WHEP.
- ``GET /ws?session=ID`` *: websocket ingest (binary PCM16 mono 16 kHz, text control JSON).
- ``GET /metrics`` *: Prometheus text.
- ``POST /emotions`` *: store an emotion from an uploaded example; ``GET /emotions``: the stored ones
  (:mod:`streaming.transports.webrtc.emotions`).

Every request passes one middleware: client errors (``WireError``, ``OfferError``) become 4xx responses naming the
problem, a client that went away is logged at debug level, and anything else is logged once and answered 500, so
nothing reaches aiohttp's default error handler. WHIP/WHEP answers carry CORS headers (players on other origins).
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from aiohttp import web
from PIL import Image

from streaming.api import SessionFactory
from streaming.prometheus import render_metrics
from streaming.transports.webrtc.config import ServerConfig
from streaming.transports.webrtc.emotions import emotion_handlers
from streaming.transports.webrtc.sdp import OfferError, check_offer, parse_offer
from streaming.transports.webrtc.server import SERVER_KEY, AvatarServer, Handler, protected
from streaming.transports.webrtc.whip import add_routes
from streaming.transports.websocket import websocket_ingest
from streaming.wire import WireError, parse_json_object, require_fields

logger = logging.getLogger(__name__)

PREVIEW_KEY = web.AppKey("preview", bytes)  # the avatar at rest as PNG ("": the factory has no picture)
WEB_DIR = Path(__file__).resolve().parent / "web"
CORS_PREFIXES = ("/whip", "/whep")
CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",  # bearer tokens, no cookies: any origin may call with the token
    "Access-Control-Allow-Methods": "OPTIONS, POST, PATCH, DELETE",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, If-Match",
    "Access-Control-Expose-Headers": "Location, ETag, Link, Accept-Patch, Accept-Post, Retry-After, WWW-Authenticate",
    "Access-Control-Max-Age": "600",
}

__all__ = ["SERVER_KEY", "AvatarServer", "SessionFactory", "create_app", "serve_app"]


def _cors(request: web.Request) -> bool:
    return request.path.startswith(CORS_PREFIXES)


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place a request's failure is turned into a response (see the module doc)."""
    server = request.app[SERVER_KEY]
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status == 400 or exc.status == 413:
            server.counters["bad_requests_total"] += 1
        if _cors(request):
            exc.headers.update(CORS_HEADERS)
        raise
    except (WireError, OfferError) as exc:
        server.counters["bad_requests_total"] += 1
        status = exc.status if isinstance(exc, WireError) else 400
        response = web.Response(status=status, text=str(exc))
    except ConnectionError as exc:  # the client closed its connection mid-request: expected, nothing to answer
        logger.debug("%s %s: the client went away (%s)", request.method, request.path, exc)
        response = web.Response(status=400, text="connection lost")
    except asyncio.CancelledError:
        raise
    except Exception:
        logger.exception("%s %s failed", request.method, request.path)
        response = web.Response(status=500, text="internal server error (see the server log)")
    if _cors(request) and not response.prepared:
        response.headers.update(CORS_HEADERS)
    return response


# --- handlers -----------------------------------------------------------------------------------------------


async def index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def watch_page(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(WEB_DIR / "watch.html", headers={"Cache-Control": "no-cache"})


async def favicon(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(WEB_DIR / "favicon.svg", headers={"Content-Type": "image/svg+xml"})


async def avatar_preview(request: web.Request) -> web.Response:
    png = request.app[PREVIEW_KEY]
    if not png:
        raise web.HTTPNotFound(text="this server has no avatar picture to show")
    return web.Response(body=png, content_type="image/png", headers={"Cache-Control": "no-cache"})


def png_bytes(rgb: np.ndarray | None) -> bytes:
    """``[H, W, 3]`` uint8 RGB -> PNG bytes (b"" for None)."""
    if rgb is None:
        return b""
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, np.uint8)).save(out, format="PNG")
    return out.getvalue()


async def sessions(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    return web.json_response({"sessions": server.listing(), "max_sessions": server.config.max_sessions})


async def health(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    info = server.info()
    viewers = server.metric_values()["viewers_active"]
    return web.json_response(
        {
            "status": "ok",
            "sessions": len(server.hosted),
            "max_sessions": server.config.max_sessions,
            "viewers": viewers,
            **info,
            "render": server.factory.metrics(),  # the render worker's recent call time and batch: its headroom
        }
    )


async def offer(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    body = parse_json_object(await request.read(), "the /offer body", server.config.client_max_size)
    require_fields(body, "the /offer body", {"sdp": str, "type": str})
    if body["type"] != "offer":
        raise WireError(f'the /offer body: "type" must be "offer", got {body["type"]!r}')
    sdp = parse_offer(body["sdp"])
    check_offer(sdp, "page", server.config.video_codecs)
    peer, answer = await server.open_session_peer(sdp, "page")
    info = server.info()
    info["untrained"] = bool(info.get("untrained")) or bool(peer.session.untrained)
    return web.json_response({"sdp": answer, "type": "answer", "session": peer.id, **info})


async def metrics(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    text = render_metrics(
        server.metric_values(), server.session_snapshots(), server.closed_totals, server.factory.metrics()
    )
    return web.Response(text=text, content_type="text/plain", charset="utf-8", headers={"Cache-Control": "no-cache"})


async def ws_handler(request: web.Request) -> web.StreamResponse:
    return await websocket_ingest(request, request.app[SERVER_KEY].peers)


def create_app(factory: SessionFactory, config: ServerConfig | None = None) -> web.Application:
    """The server as an aiohttp application; its sessions and the factory are closed on app cleanup."""
    config = config or ServerConfig()
    app = web.Application(client_max_size=config.client_max_size, middlewares=[guard])
    server = AvatarServer(factory, config)
    app[SERVER_KEY] = server
    app[PREVIEW_KEY] = png_bytes(factory.preview())  # once: the avatar does not change while the server runs
    app.router.add_get("/", index)
    app.router.add_get("/health", health)
    app.router.add_get("/favicon.ico", favicon)
    app.router.add_get("/avatar.png", protected(avatar_preview, allow_query=True))
    app.router.add_get("/watch", watch_page)
    app.router.add_get("/sessions", protected(sessions))
    app.router.add_post("/offer", protected(offer))
    add_routes(app)
    app.router.add_get("/ws", protected(ws_handler, allow_query=True))
    app.router.add_get("/metrics", protected(metrics))
    upload_emotion, list_emotions = emotion_handlers(factory)
    app.router.add_post("/emotions", protected(upload_emotion))
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
