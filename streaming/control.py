"""Control messages from the page (data channel ``control``) or a websocket, applied to a session.

A message is a JSON object: any of the session's control keys (emotion, intensity, lip_scale, pose_mode, ...)
plus the transport keys ``id`` (echoed back) and ``interrupt`` (true = barge-in). Every message is answered
with ``{"type": "ack", ...}`` or ``{"type": "error", "message": ...}``; bad input never ends the session. The text
is checked by :mod:`streaming.wire` (size, UTF-8, nesting depth, strict JSON) before anything reads it.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from streaming.api import ControlError, LiveSession
from streaming.wire import WireError, parse_json_object

logger = logging.getLogger(__name__)

MAX_CONTROL_BYTES = 16 * 1024
MAX_CONTROL_DEPTH = 8  # controls are flat objects (head_pose may hold a small list); deeper is never valid


def handle_control_text(session: LiveSession, text: str | bytes) -> dict[str, Any]:
    """Parse and apply one control message; returns the reply to send (never raises on bad input)."""
    try:
        message = parse_json_object(text, "control message", MAX_CONTROL_BYTES, MAX_CONTROL_DEPTH)
    except WireError as exc:
        return _error(None, str(exc))
    return apply_control(session, message)


def apply_control(session: LiveSession, message: dict[str, Any]) -> dict[str, Any]:
    values = dict(message)
    msg_id = values.pop("id", None)
    if msg_id is not None and not isinstance(msg_id, (str, int)):
        return _error(None, "'id' must be a string or an integer")
    kind = values.pop("type", "control")
    if kind != "control":
        return _error(msg_id, f"unknown message type {kind!r} (expected 'control')")
    interrupt = values.pop("interrupt", False)
    if not isinstance(interrupt, bool):
        return _error(msg_id, f"'interrupt' must be true or false, got {interrupt!r}")
    if not values and not interrupt:
        return _error(msg_id, "empty control message")
    state: dict[str, Any] = {}
    try:
        if values:
            state = session.control(values)
    except ControlError as exc:
        return _error(msg_id, str(exc))
    except Exception:  # a session bug must not take the transport down with it
        logger.exception("session %s: control failed", session.id)
        return _error(msg_id, "internal error while applying the control message")
    if interrupt:
        session.interrupt()
    reply: dict[str, Any] = {"type": "ack", "state": _jsonable(state), "interrupted": interrupt}
    if msg_id is not None:
        reply["id"] = msg_id
    return reply


def _error(msg_id: str | int | None, message: str) -> dict[str, Any]:
    reply: dict[str, Any] = {"type": "error", "message": message}
    if msg_id is not None:
        reply["id"] = msg_id
    return reply


def _jsonable(state: dict[str, Any]) -> dict[str, Any]:
    try:
        json.dumps(state)
        return state
    except TypeError:
        return {str(k): (v if isinstance(v, (str, int, float, bool, type(None))) else str(v)) for k, v in state.items()}
