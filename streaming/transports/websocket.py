"""Websocket ingest: ``/ws?session=ID`` feeds PCM16 mono 16 kHz audio and control JSON into a WebRTC session.

The avatar still goes out on that session's WebRTC tracks (or to its WHEP viewers); the websocket only replaces
(or adds to) the microphone, e.g. for a telephony bridge or a TTS engine that produces raw PCM. Every text message
is answered (an ack or an error naming the problem, see ``streaming.control``); a message larger than the
server's ``ws_max_message`` closes the socket with code 1009 (the session itself goes on). A client that hangs up
mid-stream is logged at debug level.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
from aiohttp import WSMsgType, web

from engine.audio.pcm import SAMPLE_RATE
from streaming.control import handle_control_text

if TYPE_CHECKING:
    from streaming.transports.webrtc.peer import Peer

logger = logging.getLogger(__name__)


async def websocket_ingest(request: web.Request, peers: Mapping[str, Peer]) -> web.StreamResponse:
    session_id = request.query.get("session", "")
    peer = peers.get(session_id)
    if peer is None or peer.closing:
        raise web.HTTPNotFound(text=f"no live session {session_id!r}: open one with POST /offer or /whip first")
    ws = web.WebSocketResponse(max_msg_size=peer.config.ws_max_message, heartbeat=10.0)
    await ws.prepare(request)
    peer.sockets.add(ws)
    try:
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                error = _push_pcm(peer, msg.data)
                if error is not None:
                    await ws.send_str(json.dumps({"type": "error", "message": error}))
            elif msg.type == WSMsgType.TEXT:
                peer.touch()
                await ws.send_str(json.dumps(handle_control_text(peer.session, msg.data)))
            elif msg.type == WSMsgType.ERROR:
                logger.info("session %s: websocket error %s", peer.name, ws.exception())
                break
    except ConnectionError as exc:  # the client hung up while we answered it: expected
        logger.debug("session %s: websocket closed by the client (%s)", peer.name, exc)
    finally:
        peer.sockets.discard(ws)
    return ws


def _push_pcm(peer: Peer, data: bytes) -> str | None:
    if not data:
        return "empty audio message"
    if len(data) % 2:
        return f"binary messages are PCM16 (2 bytes per sample); got {len(data)} bytes"
    pcm = np.frombuffer(data, dtype="<i2")
    try:
        peer.session.push_audio(pcm, SAMPLE_RATE)
    except ValueError as exc:
        return f"audio rejected: {exc}"
    peer.touch()
    return None
