"""WHIP ingest (RFC 9725) and WHEP egress (draft-ietf-wish-whep) over the server's sessions.

- ``POST /whip`` (``application/sdp``, audio ``sendonly`` [+ video]): a publisher's voice drives a new session;
  answered ``recvonly``; ``201`` + ``Location: /whip/{id}`` + ``ETag`` + ``Link: </whep/{id}>; rel="whep"`` (where to
  watch it) + ``Link: <stun:...>; rel="ice-server"`` per configured ICE server.
- ``POST /whep``: a player watches a new session (fed later over ``/ws?session={id}``); ``POST /whep/{session}``:
  a player watches a running session (any session id: a WHIP ``Location`` id, an ``/offer`` ``session``); both
  answered ``sendonly``, ``201`` + ``Location: /whep/resource/{id}``. One session renders once for all its viewers.
- ``PATCH`` on a resource (``application/trickle-ice-sdpfrag``): trickled candidates, ``204``; an ICE restart
  (``If-Match: *`` or new credentials) is ``422`` (the server trickles but does not restart); a stale ``If-Match`` is
  ``412``. ``DELETE`` on a resource: ``200``, then ``404``. Other methods: ``405`` with ``Allow``.
- ``OPTIONS``: ``204`` with ``Accept-Post`` / ``Accept-Patch``; with a valid token it also lists the ICE servers.
"""

from __future__ import annotations

from aiohttp import web
from multidict import CIMultiDict

from streaming.transports.webrtc.peer import Peer
from streaming.transports.webrtc.sdp import Offer, Role, check_offer, parse_offer, parse_trickle
from streaming.transports.webrtc.server import SERVER_KEY, AvatarServer, protected
from streaming.wire import WireError, as_text

SDP = "application/sdp"
TRICKLE = "application/trickle-ice-sdpfrag"
WHEP_REL = "whep"  # the Link relation from a WHIP session to the URL that watches it


async def read_offer(request: web.Request, role: Role) -> Offer:
    """The request's SDP offer, checked for ``role`` (before any slot is taken): WireError / OfferError -> 4xx."""
    server = request.app[SERVER_KEY]
    if request.content_type != SDP:
        raise WireError(f"the offer must be sent as Content-Type: {SDP} (got {request.content_type})", status=415)
    text = as_text(await request.read(), "the SDP offer", server.config.client_max_size)
    offer = parse_offer(text)
    check_offer(offer, role, server.config.video_codecs)
    return offer


def ice_links(server: AvatarServer) -> list[str]:
    return [ice.link_header() for ice in server.config.ice_servers]


def _created(server: AvatarServer, peer: Peer, answer: str, location: str, links: list[str]) -> web.Response:
    headers: CIMultiDict[str] = CIMultiDict(
        {"Location": location, "ETag": peer.etag, "Accept-Patch": TRICKLE, "Cache-Control": "no-store"}
    )
    for link in [*links, *ice_links(server)]:
        headers.add("Link", link)
    return web.Response(status=201, body=answer.encode(), content_type=SDP, headers=headers)


async def whip_post(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    offer = await read_offer(request, "whip")
    peer, answer = await server.open_session_peer(offer, "whip")
    return _created(server, peer, answer, f"/whip/{peer.id}", [f'</whep/{peer.id}>; rel="{WHEP_REL}"'])


async def whep_post(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    offer = await read_offer(request, "whep")
    session = request.match_info.get("session")
    if session is None:
        peer, answer = await server.open_session_peer(offer, "whep")
    else:
        peer, answer = await server.open_viewer(session, offer)
    return _created(server, peer, answer, f"/whep/resource/{peer.id}", [])


def _resource(request: web.Request, role: Role) -> Peer:
    peer = request.app[SERVER_KEY].peers.get(request.match_info["id"])
    if peer is None or peer.role != role or peer.closing:
        raise web.HTTPNotFound(text=f"no {role.upper()} session {request.match_info['id']!r}")
    return peer


async def _delete(request: web.Request, role: Role) -> web.Response:
    peer = _resource(request, role)
    await peer.close(f"ended by the client ({role.upper()} DELETE)")
    return web.Response(status=200)


async def _patch(request: web.Request, role: Role) -> web.Response:
    server = request.app[SERVER_KEY]
    peer = _resource(request, role)
    if_match = request.headers.get("If-Match")
    if if_match is not None and if_match.strip() == "*":
        raise web.HTTPUnprocessableEntity(text="ICE restarts are not supported (trickle ICE is)")
    if if_match is not None and if_match.strip() != peer.etag:
        raise web.HTTPPreconditionFailed(text=f"If-Match {if_match} does not match the session's ETag {peer.etag}")
    if request.content_type != TRICKLE:
        raise WireError(f"PATCH bodies must be Content-Type: {TRICKLE} (got {request.content_type})", status=415)
    text = as_text(await request.read(), "the trickle-ICE fragment", server.config.client_max_size)
    assert peer.offer is not None  # a registered peer has answered its offer
    fragment = parse_trickle(text, peer.offer.bundle)
    if fragment.ufrag is not None and fragment.ufrag != peer.offer.ice_ufrag:
        raise web.HTTPUnprocessableEntity(text="new ICE credentials ask for an ICE restart, which is not supported")
    await peer.trickle(fragment)
    return web.Response(status=204)


async def whip_delete(request: web.Request) -> web.Response:
    return await _delete(request, "whip")


async def whep_delete(request: web.Request) -> web.Response:
    return await _delete(request, "whep")


async def whip_patch(request: web.Request) -> web.Response:
    return await _patch(request, "whip")


async def whep_patch(request: web.Request) -> web.Response:
    return await _patch(request, "whep")


async def endpoint_options(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    headers: CIMultiDict[str] = CIMultiDict({"Accept-Post": SDP, "Allow": "OPTIONS, POST"})
    # ICE servers (TURN credentials among them) only to a client that shows the token; a CORS preflight has none
    if server.authorized(request):
        for link in ice_links(server):
            headers.add("Link", link)
    return web.Response(status=204, headers=headers)


async def resource_options(request: web.Request) -> web.Response:
    return web.Response(status=204, headers={"Accept-Patch": TRICKLE, "Allow": "OPTIONS, PATCH, DELETE"})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/whip", protected(whip_post))
    app.router.add_route("OPTIONS", "/whip", endpoint_options)
    app.router.add_delete("/whip/{id}", protected(whip_delete))
    app.router.add_route("PATCH", "/whip/{id}", protected(whip_patch))
    app.router.add_route("OPTIONS", "/whip/{id}", resource_options)
    app.router.add_post("/whep", protected(whep_post))
    app.router.add_route("OPTIONS", "/whep", endpoint_options)
    app.router.add_delete("/whep/resource/{id}", protected(whep_delete))
    app.router.add_route("PATCH", "/whep/resource/{id}", protected(whep_patch))
    app.router.add_route("OPTIONS", "/whep/resource/{id}", resource_options)
    app.router.add_post("/whep/{session}", protected(whep_post))
    app.router.add_route("OPTIONS", "/whep/{session}", endpoint_options)
