"""The front door: one HTTP address that speaks the single server's API over many replicas.

Each replica is a whole single-process server (``streaming.transports.webrtc.create_app`` over its own runtime)
on its own node and port. The front door places a new session (``POST /offer``, ``/whip``, ``/whep``) on the
replica the placement policy picks and forwards the request there; the SDP answer is the replica's own, so ICE
connects the client straight to that replica and media never passes through the front door. It remembers which
replica owns every id it handed out, and forwards later requests for that id (``DELETE``/``PATCH`` of a WHIP/WHEP
resource, ``POST /whep/{session}``, the ``/ws`` ingest) to the owner. ``/health``, ``/sessions`` and ``/metrics``
are gathered from every replica.

Replicas come from ``discover`` (a static list in tests, Ray's registry in ``ray_app``); each is polled on
``/health``. A replica that stops answering is dropped with every id it owned (its clients' connections die with
its process); a draining one keeps its sessions and gets no new one. When no replica has room the answer is
``503`` + ``Retry-After``, exactly as one server answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict

from engine.config import ConfigError
from streaming.cluster.metrics import merge_metrics
from streaming.cluster.placement import Placement, ReplicaStatus, render_load
from streaming.transports.webrtc.app import CORS_HEADERS, WEB_DIR

logger = logging.getLogger(__name__)

# what a replica needs of the client's request, and what the client needs of the replica's answer
REQUEST_HEADERS = ("Authorization", "Content-Type", "If-Match")
RESPONSE_HEADERS = frozenset(
    h.lower()
    for h in (
        "Content-Type",
        "Location",
        "ETag",
        "Link",
        "Accept-Patch",
        "Accept-Post",
        "Allow",
        "Retry-After",
        "WWW-Authenticate",
        "Cache-Control",
    )
)


@dataclass(frozen=True)
class ReplicaRef:
    """A replica as the directory knows it: a name, its HTTP root, and whether it is draining."""

    name: str
    url: str
    draining: bool = False
    pid: int | None = None  # its process (for operators and the fault tests)
    node: str | None = None


Discover = Callable[[], Awaitable[list[ReplicaRef]]]


@dataclass(frozen=True)
class FrontDoorConfig:
    token: str | None = None  # bearer token of the cluster: checked here for /sessions and /metrics, and by replicas
    placement: str = "most-headroom"
    max_render_load: float | None = None  # skip replicas whose renderer is this busy (see placement.render_load)
    retry_after_s: int = 5
    poll_interval_s: float = 1.0  # how often replicas are asked for their live numbers
    replica_timeout_s: float = 3.0  # a replica that does not answer /health within this is dropped
    request_timeout_s: float = 30.0  # a forwarded request (an offer: the replica gathers ICE candidates)
    client_max_size: int = 256 * 1024
    ws_max_message: int = 1 << 20  # largest relayed websocket message (the replica's own limit, by default)
    prune_after_s: float = 10.0  # an id whose session no replica lists any more is forgotten after this age

    def __post_init__(self) -> None:
        Placement(self.placement, self.max_render_load)  # validates both
        if self.token is not None and not self.token:
            raise ConfigError("token must be a non-empty string (or None for no authentication)")
        if self.retry_after_s < 1:
            raise ConfigError(f"retry_after_s must be >= 1, got {self.retry_after_s}")
        for name in ("poll_interval_s", "replica_timeout_s", "request_timeout_s", "prune_after_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")


class FrontDoor:
    def __init__(self, discover: Discover, config: FrontDoorConfig | None = None) -> None:
        self.discover = discover
        self.config = config or FrontDoorConfig()
        self.placement = Placement(self.config.placement, self.config.max_render_load)
        self.replicas: dict[str, ReplicaStatus] = {}  # live replicas by name
        self.info: dict[str, Any] = {}  # what the replicas serve (mode, motion, banner...): one replica's /health
        self.owners: dict[str, str] = {}  # every id handed out (session, WHIP/WHEP resource) -> its replica's name
        self._session_of: dict[str, str] = {}  # that id -> the id of the session it belongs to (itself or watched)
        self._recorded: dict[str, float] = {}  # when it was handed out (young ids are never pruned)
        self.pending: Counter[str] = Counter()  # sessions being opened on a replica, not yet in its report
        self.counters: dict[str, float] = {
            "sessions_placed_total": 0,
            "sessions_rejected_total": 0,
            "replicas_lost_total": 0,
            "forward_errors_total": 0,
        }
        self._http: aiohttp.ClientSession | None = None
        self._poller: asyncio.Task[None] | None = None
        self._refreshing = asyncio.Lock()

    # --- replica state ----------------------------------------------------------------------------------

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.config.request_timeout_s))
        return self._http

    async def start(self) -> None:
        await self.refresh()
        self._poller = asyncio.create_task(self._poll(), name="frontdoor-poll")

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self._http is not None:
            await self._http.close()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_interval_s)
            try:
                await self.refresh()
            except Exception:  # a directory hiccup must not end polling
                logger.exception("refreshing the replica list failed")

    async def _status(self, ref: ReplicaRef) -> tuple[ReplicaRef, dict[str, Any] | None]:
        try:
            timeout = aiohttp.ClientTimeout(total=self.config.replica_timeout_s)
            async with self.http.get(f"{ref.url}/health", timeout=timeout) as resp:
                if resp.status != 200:
                    return ref, None
                return ref, await resp.json()
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return ref, None

    async def refresh(self) -> None:
        """Ask the directory for the replicas and each replica for its numbers; drop the ones that are gone."""
        async with self._refreshing:
            refs = {r.name: r for r in await self.discover()}
            answers = await asyncio.gather(*(self._status(r) for r in refs.values()))
            seen: dict[str, ReplicaStatus] = {}
            for ref, health in answers:
                if health is None:
                    continue
                sessions = int(health.get("sessions", 0))
                render = health.get("render") or {}
                seen[ref.name] = ReplicaStatus(
                    name=ref.name,
                    url=ref.url,
                    sessions=sessions,
                    max_sessions=int(health.get("max_sessions", 0)),
                    draining=ref.draining or bool(health.get("draining", False)),
                    render_load=render_load(
                        sessions,
                        float(health.get("fps") or 0.0),
                        float(render.get("render_batch_mean", 0.0)),
                        float(render.get("render_call_ms", 0.0)),
                    ),
                )
                if not self.info:
                    skip = ("sessions", "max_sessions", "viewers", "render")
                    self.info = {k: v for k, v in health.items() if k not in skip}
            for name in set(self.replicas) - set(seen):
                self._lost(name)
            self.replicas = seen
            await self._prune()

    def _record(self, sid: str, replica: str, session: str) -> None:
        self.owners[sid] = replica
        self._session_of[sid] = session
        self._recorded[sid] = time.monotonic()

    def _forget(self, sid: str) -> None:
        self.owners.pop(sid, None)
        self._session_of.pop(sid, None)
        self._recorded.pop(sid, None)

    async def _prune(self) -> None:
        """Forget the ids of sessions that ended without a DELETE through here (a page closed, a peer timed out),
        so the routing table holds live sessions only."""
        listed = await self.gather("/sessions")
        live: dict[str, set[str]] = {}
        for name, answer in listed.items():
            if isinstance(answer, dict):
                live[name] = {str(entry.get("id")) for entry in answer.get("sessions", [])}
        old = time.monotonic() - self.config.prune_after_s
        for sid, owner in list(self.owners.items()):
            if owner in live and self._recorded.get(sid, 0.0) < old and self._session_of.get(sid) not in live[owner]:
                self._forget(sid)

    def _lost(self, name: str) -> None:
        """A replica stopped answering: its sessions died with it, so their ids route nowhere now."""
        self.counters["replicas_lost_total"] += 1
        gone = [sid for sid, owner in self.owners.items() if owner == name]
        for sid in gone:
            self._forget(sid)
        self.replicas.pop(name, None)
        logger.warning("replica %s is gone; %d session id(s) it owned are dropped", name, len(gone))

    def placement_view(self) -> list[ReplicaStatus]:
        return list(self.replicas.values())

    # --- forwarding ---------------------------------------------------------------------------------------

    async def forward(self, request: web.Request, replica: ReplicaStatus, body: bytes) -> web.Response:
        headers = {k: request.headers[k] for k in REQUEST_HEADERS if k in request.headers}
        url = f"{replica.url}{request.path_qs}"
        async with self.http.request(request.method, url, data=body, headers=headers) as resp:
            payload = await resp.read()
            out: CIMultiDict[str] = CIMultiDict()
            for key, value in resp.headers.items():
                if key.lower() in RESPONSE_HEADERS:
                    out.add(key, value)
            return web.Response(status=resp.status, body=payload, headers=out)

    async def open_session(self, request: web.Request) -> web.Response:
        """Place a new session: the chosen replica answers; one that is full (another front door got there
        first) or unreachable passes the request to the next one; none left -> 503 + Retry-After."""
        body = await request.read()
        if len(body) > self.config.client_max_size:
            raise web.HTTPRequestEntityTooLarge(max_size=self.config.client_max_size, actual_size=len(body))
        if not self.replicas:
            await self.refresh()
        tried: set[str] = set()
        silent: list[str] = []  # replicas that did not answer
        while True:
            candidates = [r for r in self.placement_view() if r.name not in tried]
            replica = self.placement.choose(candidates, self.pending)
            if replica is None:
                break
            tried.add(replica.name)
            self.pending[replica.name] += 1
            try:
                response = await self.forward(request, replica, body)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                self.counters["forward_errors_total"] += 1
                logger.warning("replica %s did not answer %s (%s); trying another", replica.name, request.path, exc)
                silent.append(replica.name)
                continue
            finally:
                self.pending[replica.name] -= 1
            if response.status == 503:
                self._note(replica, full=True)
                continue
            if response.status < 300:
                sid = _opened_id(response)
                if sid is not None:
                    self._record(sid, replica.name, sid)
                self._note(replica, full=False)
                self.counters["sessions_placed_total"] += 1
            return response
        self.counters["sessions_rejected_total"] += 1
        total = sum(r.max_sessions for r in self.replicas.values())
        text = f"all {total} session slots of {len(self.replicas)} replica(s) are in use; retry later"
        if silent:
            text = f"no replica could take the session ({', '.join(silent)} did not answer); retry later"
        return web.Response(
            status=503,
            text=text,
            headers={"Retry-After": str(self.config.retry_after_s)},
        )

    def _note(self, replica: ReplicaStatus, full: bool) -> None:
        """Count what this front door just did into the replica's numbers until its next report."""
        current = self.replicas.get(replica.name)
        if current is None:
            return
        sessions = current.max_sessions if full else min(current.max_sessions, current.sessions + 1)
        self.replicas[replica.name] = ReplicaStatus(
            current.name, current.url, sessions, current.max_sessions, current.draining, current.render_load
        )

    def owner_of(self, sid: str) -> ReplicaStatus:
        name = self.owners.get(sid)
        replica = self.replicas.get(name) if name is not None else None
        if replica is None:
            raise web.HTTPNotFound(text=f"no live session {sid!r} on any replica")
        return replica

    async def to_owner(self, request: web.Request, sid: str, records_new: bool = False) -> web.Response:
        replica = self.owner_of(sid)
        body = await request.read()
        try:
            response = await self.forward(request, replica, body)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self.counters["forward_errors_total"] += 1
            raise web.HTTPBadGateway(text=f"the replica that owns session {sid!r} did not answer ({exc})") from exc
        if records_new and response.status < 300:
            new = _opened_id(response)
            if new is not None:
                self._record(new, replica.name, self._session_of.get(sid, sid))
        if request.method == "DELETE" and response.status < 300:
            self._forget(sid)
        return response

    def authorized(self, request: web.Request, allow_query: bool = False) -> bool:
        """The single server's rule (a bearer header; ``?token=`` only on the websocket), checked here too so a
        client without the token gets 401 even when every replica is full, as from one server."""
        token = self.config.token
        if token is None:
            return True
        header = request.headers.get("Authorization", "")
        given = header[7:].strip() if header[:7].lower() == "bearer " else ""
        if not given and allow_query:
            given = request.query.get("token", "")
        return hmac.compare_digest(given.encode(), token.encode())

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.config.token}"} if self.config.token else {}

    async def gather(self, path: str) -> dict[str, Any]:
        """``path`` from every live replica (JSON or text by its content type); None where one failed."""

        async def one(replica: ReplicaStatus) -> tuple[str, Any]:
            try:
                async with self.http.get(f"{replica.url}{path}", headers=self.auth_headers()) as resp:
                    if resp.status != 200:
                        return replica.name, None
                    if resp.content_type == "application/json":
                        return replica.name, await resp.json()
                    return replica.name, await resp.text()
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                return replica.name, None

        return dict(await asyncio.gather(*(one(r) for r in list(self.replicas.values()))))

    def own_metrics(self) -> dict[str, float]:
        values = dict(self.counters)
        values["replicas"] = len(self.replicas)
        values["replicas_draining"] = sum(r.draining for r in self.replicas.values())
        values["sessions_active"] = sum(r.sessions for r in self.replicas.values())
        values["sessions_max"] = sum(r.max_sessions for r in self.replicas.values())
        return values


def _opened_id(response: web.Response) -> str | None:
    """The id a replica handed out: the last segment of a WHIP/WHEP ``Location``, or an /offer answer's session."""
    location = response.headers.get("Location")
    if location:
        return location.rstrip("/").rsplit("/", 1)[-1]
    if response.content_type == "application/json" and isinstance(response.body, bytes):
        with contextlib.suppress(ValueError):
            answer = json.loads(response.body)
            sid = answer.get("session") if isinstance(answer, dict) else None
            return sid if isinstance(sid, str) else None
    return None


# --- the application ----------------------------------------------------------------------------------------

FRONT_DOOR_KEY: web.AppKey[FrontDoor] = web.AppKey("front_door")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Client errors stay 4xx, a replica that fails mid-request is 502, anything else is logged once and 500."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if request.path.startswith(("/whip", "/whep")):
            exc.headers.update(CORS_HEADERS)
        raise
    except ConnectionError as exc:
        logger.debug("%s %s: the client went away (%s)", request.method, request.path, exc)
        response = web.Response(status=400, text="connection lost")
    except asyncio.CancelledError:
        raise
    except Exception:
        logger.exception("%s %s failed", request.method, request.path)
        response = web.Response(status=500, text="internal front door error (see its log)")
    if request.path.startswith(("/whip", "/whep")) and not response.prepared:
        for key, value in CORS_HEADERS.items():
            response.headers.setdefault(key, value)
    return response


def _door(request: web.Request) -> FrontDoor:
    return request.app[FRONT_DOOR_KEY]


def _require_token(request: web.Request, allow_query: bool = False) -> None:
    if not _door(request).authorized(request, allow_query):
        raise web.HTTPUnauthorized(text="missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


async def index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def watch_page(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(WEB_DIR / "watch.html", headers={"Cache-Control": "no-cache"})


async def health(request: web.Request) -> web.Response:
    door = _door(request)
    replicas = list(door.replicas.values())
    return web.json_response(
        {
            **door.info,
            "status": "ok" if replicas else "no replicas",
            "sessions": sum(r.sessions for r in replicas),
            "max_sessions": sum(r.max_sessions for r in replicas),
            "replicas": [
                {
                    "name": r.name,
                    "sessions": r.sessions,
                    "max_sessions": r.max_sessions,
                    "draining": r.draining,
                    "render_load": round(r.render_load, 3),
                }
                for r in replicas
            ],
        },
        status=200 if replicas else 503,
    )


async def sessions(request: web.Request) -> web.Response:
    _require_token(request)
    door = _door(request)
    listed = []
    for name, answer in (await door.gather("/sessions")).items():
        for entry in (answer or {}).get("sessions", []) if isinstance(answer, dict) else []:
            listed.append({**entry, "replica": name})
    return web.json_response({"sessions": listed, "max_sessions": sum(r.max_sessions for r in door.replicas.values())})


async def metrics(request: web.Request) -> web.Response:
    _require_token(request)
    door = _door(request)
    texts = {name: text for name, text in (await door.gather("/metrics")).items() if isinstance(text, str)}
    body = merge_metrics(texts, door.own_metrics())
    return web.Response(text=body, content_type="text/plain", charset="utf-8", headers={"Cache-Control": "no-cache"})


async def open_session(request: web.Request) -> web.Response:
    _require_token(request)
    return await _door(request).open_session(request)


async def whip_resource(request: web.Request) -> web.Response:
    _require_token(request)
    return await _door(request).to_owner(request, request.match_info["id"])


async def whep_viewer(request: web.Request) -> web.Response:
    _require_token(request)
    return await _door(request).to_owner(request, request.match_info["session"], records_new=True)


async def any_replica(request: web.Request) -> web.Response:
    """OPTIONS on the endpoints: every replica answers alike (the cluster shares one ICE configuration)."""
    door = _door(request)
    replica = next(iter(door.replicas.values()), None)
    if replica is None:
        retry = {"Retry-After": str(door.config.retry_after_s)}
        raise web.HTTPServiceUnavailable(text="no replica is up", headers=retry)
    return await door.forward(request, replica, b"")


async def ws_proxy(request: web.Request) -> web.StreamResponse:
    """``/ws?session=ID`` relayed to the replica that owns the session (audio and control are small; media
    itself never comes here). The replica checks the token and answers every message as it would directly."""
    _require_token(request, allow_query=True)
    door = _door(request)
    sid = request.query.get("session", "")
    replica = door.owner_of(sid)
    headers = {k: request.headers[k] for k in ("Authorization",) if k in request.headers}
    try:
        upstream = await door.http.ws_connect(f"{replica.url}{request.path_qs}", headers=headers, heartbeat=10.0)
    except aiohttp.WSServerHandshakeError as exc:  # the replica's own 401 / 404 reaches the client as it is
        status = exc.status if 400 <= exc.status < 500 else 502
        return web.Response(status=status, text=f"the replica refused the websocket: {exc.message}")
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise web.HTTPBadGateway(text=f"the replica that owns session {sid!r} did not answer ({exc})") from exc
    ws = web.WebSocketResponse(max_msg_size=door.config.ws_max_message, heartbeat=10.0)
    await ws.prepare(request)

    async def pump(source: Any, sink: Any) -> None:
        async for msg in source:
            if msg.type == WSMsgType.TEXT:
                await sink.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await sink.send_bytes(msg.data)
            else:
                break

    tasks = [asyncio.create_task(pump(ws, upstream)), asyncio.create_task(pump(upstream, ws))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await upstream.close()
        await ws.close()
    return ws


def create_front_door_app(door: FrontDoor) -> web.Application:
    """The front door as an aiohttp application: started (first poll) on startup, closed on cleanup."""
    app = web.Application(client_max_size=door.config.client_max_size, middlewares=[guard])
    app[FRONT_DOOR_KEY] = door
    app.router.add_get("/", index)
    app.router.add_get("/watch", watch_page)
    app.router.add_get("/health", health)
    app.router.add_get("/sessions", sessions)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/ws", ws_proxy)
    app.router.add_post("/offer", open_session)
    app.router.add_post("/whip", open_session)
    app.router.add_post("/whep", open_session)
    app.router.add_post("/whep/{session}", whep_viewer)
    for path in ("/whip/{id}", "/whep/resource/{id}"):
        app.router.add_delete(path, whip_resource)
        app.router.add_route("PATCH", path, whip_resource)
    for path in ("/whip", "/whep", "/whip/{id}", "/whep/resource/{id}", "/whep/{session}"):
        app.router.add_route("OPTIONS", path, any_replica)
    app.router.add_static("/static/", WEB_DIR, follow_symlinks=False)

    async def on_startup(app: web.Application) -> None:
        await app[FRONT_DOOR_KEY].start()

    async def on_cleanup(app: web.Application) -> None:
        await app[FRONT_DOOR_KEY].close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


def static_directory(replicas: list[ReplicaRef]) -> Discover:
    """A fixed list of replicas (tests; a deployment whose replicas have fixed addresses)."""

    async def discover() -> list[ReplicaRef]:
        return list(replicas)

    return discover
