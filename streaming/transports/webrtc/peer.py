"""One WebRTC peer: its session, tracks, control channel, websockets and the watchdog that frees it all."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from aiohttp import web
from aiortc import RTCDataChannel, RTCPeerConnection, RTCRtpSender, RTCRtpTransceiver, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack
from aiortc.sdp import SessionDescription

from streaming.api import LiveSession
from streaming.control import handle_control_text
from streaming.metrics import VIDEO_STATES
from streaming.pacing import SessionClock
from streaming.transports.webrtc.config import ServerConfig
from streaming.transports.webrtc.tracks import (
    SessionAudioTrack,
    SessionVideoTrack,
    TrackStats,
    consume_microphone,
    drain,
)

logger = logging.getLogger(__name__)

CONTROL_CHANNEL = "control"
WATCHDOG_PERIOD_S = 0.5


class OfferError(ValueError):
    """The client's SDP offer cannot be answered (malformed, or lacking what the avatar needs)."""


def offer_kinds(sdp: str) -> list[str]:
    """Media kinds of an offer, in m-line order; raises OfferError when it does not parse."""
    try:
        description = SessionDescription.parse(sdp)
    except Exception as exc:  # aiortc raises a mix of ValueError / IndexError / KeyError on junk
        raise OfferError(f"malformed SDP offer: {exc or type(exc).__name__}") from exc
    kinds = [m.kind for m in description.media]
    if "video" not in kinds:
        raise OfferError("the SDP offer has no video m-line: the avatar is sent as video")
    return kinds


def _codec_preferences(kind: str, names: tuple[str, ...]) -> list[Any]:
    capabilities = RTCRtpSender.getCapabilities(kind).codecs
    chosen = [c for name in names for c in capabilities if c.mimeType.lower() == f"{kind}/{name}".lower()]
    chosen += [c for c in capabilities if c.mimeType.lower() == f"{kind}/rtx"]
    return chosen


def same_stream(*senders: RTCRtpSender) -> None:
    """Announce the senders' tracks as one MediaStream (one ``msid`` stream id in the SDP): a browser lip-syncs
    the audio and video of one stream from their RTCP sender reports, and plays tracks of different streams
    independently (it then keeps audio longer in its jitter buffer than video). aiortc gives every sender its
    own random stream id and has no API to share one, so the id is set here."""
    stream_id = senders[0]._stream_id
    for sender in senders[1:]:
        sender._stream_id = stream_id


def _latency_ms(session_metrics: dict[str, float], fallback_ms: float) -> float:
    """Audio in -> frame out as the session measures it (median), else its budget, else render -> send."""
    for key in ("latency_p50_ms", "latency_ms", "latency_budget_ms"):
        value = session_metrics.get(key)
        if value is not None and math.isfinite(value):
            return value
    return fallback_ms


class Peer:
    def __init__(self, session: LiveSession, config: ServerConfig, on_closed: Callable[[Peer], None]) -> None:
        self.session = session
        # the id in URLs (WHIP resource, websocket) must not be guessable: session ids are sequential names
        self.id = secrets.token_urlsafe(16)
        self.name = session.id
        self.config = config
        self.pc = RTCPeerConnection()
        self.clock = SessionClock()
        self.stats = TrackStats()
        self.video = SessionVideoTrack(session, self.clock, self.stats, config.max_video_lag_s)
        self.audio = SessionAudioTrack(session, self.clock, self.stats)
        self.created = time.monotonic()
        self.connected_at: float | None = None
        self.closed_reason: str | None = None
        self.sockets: set[web.WebSocketResponse] = set()
        self._on_closed = on_closed
        self._channel: RTCDataChannel | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._last_activity = time.monotonic()
        self._last_rtcp: datetime | None = None
        self._close_task: asyncio.Task[None] | None = None
        self.pc.on("connectionstatechange", self._on_connection_state)
        self.pc.on("track", self._on_track)
        self.pc.on("datachannel", self._on_datachannel)

    # --- negotiation -------------------------------------------------------------------------------------

    async def answer(self, offer_sdp: str) -> str:
        """Answer the client's offer (full ICE gathering, no trickle) and start the watchdog."""
        kinds = offer_kinds(offer_sdp)
        # aiortc negotiates codecs inside setRemoteDescription, so the transceivers (with their codec
        # preferences) must exist before it; they are matched to the offer's m-lines by kind.
        video = self.pc.addTransceiver(self.video, direction="sendonly")
        self._prefer(video, _codec_preferences("video", self.config.video_codecs))
        if "audio" in kinds:
            audio = self.pc.addTransceiver(self.audio, direction="sendrecv")
            self._prefer(audio, _codec_preferences("audio", ("opus",)))
            same_stream(video.sender, audio.sender)
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
            await self.pc.setLocalDescription(await self.pc.createAnswer())
        except Exception as exc:  # aiortc signals unusable offers with assorted exception types
            raise OfferError(f"cannot answer the SDP offer: {exc or type(exc).__name__}") from exc
        self._spawn(self._watchdog(), "watchdog")
        self._spawn(self._push_stats(), "stats")
        return self.pc.localDescription.sdp

    @staticmethod
    def _prefer(transceiver: RTCRtpTransceiver, codecs: list[Any]) -> None:
        if codecs:
            transceiver.setCodecPreferences(codecs)

    # --- events --------------------------------------------------------------------------------------------

    def touch(self) -> None:
        """The client showed it is alive (RTCP, microphone audio, a control or websocket message)."""
        self._last_activity = time.monotonic()

    async def _on_connection_state(self) -> None:
        state = self.pc.connectionState
        logger.info("session %s: connection %s", self.name, state)
        if state == "connected" and self.connected_at is None:
            self.connected_at = time.monotonic()
            self.touch()
        elif state in ("failed", "closed"):
            self.request_close(f"connection {state}")

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio":
            # the watchdog counts the frames it consumes as signs of life
            self._spawn(consume_microphone(track, self.session, self.stats), "microphone")
        else:
            self._spawn(drain(track), "drain-video")

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if channel.label != CONTROL_CHANNEL:
            logger.info("session %s: ignoring data channel %r", self.name, channel.label)
            return
        self._channel = channel

        @channel.on("message")
        def on_message(message: str | bytes) -> None:
            self.touch()
            self.send_json(handle_control_text(self.session, message))

    def send_json(self, message: dict[str, Any]) -> None:
        channel = self._channel
        if channel is not None and channel.readyState == "open":
            channel.send(json.dumps(message))

    # --- background tasks -------------------------------------------------------------------------------

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=f"peer-{self.name}-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("session %s: task %s failed", self.name, task.get_name(), exc_info=task.exception())

    async def _watchdog(self) -> None:
        """Free the session when the client is gone: ICE never completes, or nothing arrives from it."""
        mic_frames = 0
        tick = time.monotonic()
        while True:
            await asyncio.sleep(WATCHDOG_PERIOD_S)
            now = time.monotonic()
            stalled = now - tick - WATCHDOG_PERIOD_S
            tick = now
            if stalled > WATCHDOG_PERIOD_S:
                # the event loop itself was blocked: packets could not be read meanwhile, so the silence
                # is ours, not the client's
                self._last_activity += stalled
            if self.connected_at is None:
                if now - self.created > self.config.connect_timeout_s:
                    self.request_close("connection not established in time")
                    return
                continue
            if self.stats.mic_frames != mic_frames:
                mic_frames = self.stats.mic_frames
                self.touch()
            await self._check_rtcp()
            if now - self._last_activity > self.config.liveness_timeout_s:
                self.request_close(f"no activity from the client for {self.config.liveness_timeout_s:g} s")
                return

    async def _check_rtcp(self) -> None:
        """Receiver reports (RTCP RR) about our streams prove the client still receives them."""
        newest = self._last_rtcp
        for sender in self.pc.getSenders():
            with contextlib.suppress(Exception):
                report = await sender.getStats()
                for stat in report.values():
                    if stat.type == "remote-inbound-rtp" and (newest is None or stat.timestamp > newest):
                        newest = stat.timestamp
        if newest is not None and newest != self._last_rtcp:
            self._last_rtcp = newest
            self.touch()

    async def _push_stats(self) -> None:
        while True:
            await asyncio.sleep(self.config.stats_interval_s)
            snap = self.snapshot()
            # JSON has no NaN (the page's JSON.parse would reject the message): unknown numbers become null
            snap["session_metrics"] = {k: (v if math.isfinite(v) else None) for k, v in snap["session_metrics"].items()}
            self.send_json({"type": "stats", **snap})

    def snapshot(self) -> dict[str, Any]:
        """Transport and session numbers of this peer (JSON-able)."""
        try:
            session_metrics = {k: float(v) for k, v in self.session.metrics().items()}
        except Exception:
            logger.exception("session %s: metrics() failed", self.name)
            session_metrics = {}
        send_latency_ms = self.stats.send_latency_s * 1000.0
        return {
            "session": self.name,
            "connection": self.pc.connectionState,
            "fps": round(self.stats.fps(), 2),
            # new pictures per second (what a viewer sees change) and the state of the video
            "video_fps": round(session_metrics.get("fps", 0.0), 2),
            "video_state": VIDEO_STATES[int(session_metrics.get("video_state", 0.0))],
            "video_repeated": self.stats.video_repeated,
            "picture_lag_ms": round(self.stats.picture_lag_ms(self.session.fps), 1),
            "latency_ms": round(_latency_ms(session_metrics, send_latency_ms), 1),
            "send_latency_ms": round(send_latency_ms, 1),
            "video_sent": self.stats.video_sent,
            "video_dropped": self.stats.video_dropped,
            "audio_frames_sent": self.stats.audio_frames_sent,
            "audio_late_samples": self.stats.audio_late_samples,
            "mic_frames": self.stats.mic_frames,
            "clock_resyncs": self.clock.resyncs,
            "untrained": bool(self.session.untrained),
            "session_metrics": session_metrics,
        }

    # --- teardown -----------------------------------------------------------------------------------------

    @property
    def closing(self) -> bool:
        return self._close_task is not None

    def request_close(self, reason: str) -> None:
        if self._close_task is None:
            self.closed_reason = reason
            logger.info("session %s: closing (%s)", self.name, reason)
            self._close_task = asyncio.create_task(self._close(), name=f"peer-{self.name}-close")

    async def close(self, reason: str = "closed by the server") -> None:
        self.request_close(reason)
        assert self._close_task is not None
        await asyncio.shield(self._close_task)

    async def _close(self) -> None:
        # out of the registry first: the slot is free and /metrics stops listing it right away
        self._on_closed(self)
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.video.stop()
        self.audio.stop()
        for ws in list(self.sockets):
            with contextlib.suppress(Exception):
                await ws.close(message=b"session closed")
        # the session first: its buffers are freed now, and its end unblocks the senders waiting on its frames
        try:
            await self.session.close()
        except Exception:
            logger.exception("session %s: close failed", self.name)
        # never cut pc.close() short: it stops the receivers' decoder threads, which would otherwise keep the
        # process alive at exit
        try:
            await self.pc.close()
        except Exception:
            logger.warning("session %s: peer connection did not close cleanly", self.name, exc_info=True)
