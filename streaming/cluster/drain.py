"""Scale-down without cutting calls short: a leaving replica stops admitting, lets its sessions end on their own
for up to ``timeout_s``, and only then closes the rest. Plain asyncio over the single server (no Ray), so the
Ray replica's shutdown hook runs it on the server's loop and tests run it in-process."""

from __future__ import annotations

import asyncio
import logging
import time

from streaming.transports.webrtc.server import AvatarServer

logger = logging.getLogger(__name__)


def stop_admitting(server: AvatarServer) -> None:
    """Every new session (and viewer-less offer) from now on is 503 + Retry-After, whoever sends it: the capacity
    is the one place admission is decided (``admission.Slots``), so setting its limit to zero is enough."""
    server.slots.limit = 0


async def drain(server: AvatarServer, timeout_s: float, poll_s: float = 0.2) -> int:
    """Stop admitting and wait until no session is left or ``timeout_s`` passed; returns how many are left (the
    caller then closes them with the server)."""
    stop_admitting(server)
    deadline = time.monotonic() + timeout_s
    while server.hosted and time.monotonic() < deadline:
        await asyncio.sleep(poll_s)
    left = len(server.hosted)
    if left:
        logger.warning("drain: %d session(s) still open after %.0f s; closing them", left, timeout_s)
    return left
