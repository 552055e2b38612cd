"""One WebRTC peer: its session, tracks, control channel, websockets and the watchdog that frees it all.

A peer has a role (``streaming.transports.webrtc.sdp``): ``page`` (``/offer``: sends the avatar, takes a
microphone), ``whip`` (takes a publisher's voice, sends nothing) or ``whep`` (sends the avatar, takes nothing). The
avatar it sends comes from a subscriber of the session's fan-out, so a session shown by several peers renders once;
the peer that opened the session owns it and closes it when it goes.
"""

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
from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpSender,
    RTCRtpTransceiver,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamTrack

from streaming.api import LiveSession
from streaming.control import handle_control_text
from streaming.metrics import VIDEO_STATES
from streaming.pacing import SessionClock
from streaming.transports.webrtc.config import ServerConfig
from streaming.transports.webrtc.fanout import Subscriber
from streaming.transports.webrtc.sdp import RECEIVES, SENDS, Offer, OfferError, Role, TrickleFragment
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


def rtc_configuration(config: ServerConfig) -> RTCConfiguration:
    """Only the configured STUN/TURN servers: with ``iceServers=None`` aiortc would fall back to a public STUN
    server and look it up for every session; an empty list means host candidates only."""
    servers = [RTCIceServer(urls=s.url, username=s.username, credential=s.credential) for s in config.ice_servers]
    return RTCConfiguration(iceServers=servers)


def as_dtls_server(answer_sdp: str) -> str:
    """Take the DTLS server role (``a=setup:passive``) in our answer. aiortc's DTLS client offers ECDSA cipher
    suites only, so as the client it cannot connect to a peer whose certificate is RSA (GStreamer's webrtcbin:
    "no shared cipher"); as the server it presents its own ECDSA certificate, which every WebRTC stack accepts.
    RFC 5763 lets the answerer pick either role when the offer says ``actpass``."""
    return answer_sdp.replace("a=setup:active", "a=setup:passive")


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
    def __init__(
        self,
        session: LiveSession,
        config: ServerConfig,
        on_closed: Callable[[Peer], None],
        role: Role = "page",
        source: Subscriber | None = None,
        owns_session: bool = True,
    ) -> None:
        self.session = session
        # the id in URLs (WHIP/WHEP resource, websocket) must not be guessable: session ids are sequential names
        self.id = secrets.token_urlsafe(16)
        self.etag = f'"{secrets.token_hex(8)}"'  # the ICE session's entity tag (RFC 9725 section 4.3.1)
        self.name = session.id
        self.role = role
        self.owns_session = owns_session
        self.config = config
        self.source = source
        self.pc = RTCPeerConnection(rtc_configuration(config))
        self.clock = SessionClock()
        self.stats = TrackStats()
        # what this peer shows: the fan-out's copy of the session's output (or the session itself, when no
        # fan-out is given: a peer on its own)
        media = source if source is not None else session
        self.video = SessionVideoTrack(media, self.clock, self.stats, config.max_video_lag_s)
        self.audio = SessionAudioTrack(media, self.clock, self.stats)
        self.offer: Offer | None = None
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

    async def answer(self, offer: Offer) -> str:
        """Answer the client's (already checked) offer with every local candidate, and start the watchdog."""
        self.offer = offer
        audio_line = next(iter(offer.lines("audio")), None)
        video_line = next(iter(offer.lines("video")), None)
        # aiortc negotiates codecs inside setRemoteDescription, so the transceivers (with their codec
        # preferences) must exist before it; they are matched to the offer's m-lines by kind.
        if self.role == "whip":
            # a publisher sends; we answer recvonly and send nothing (the avatar is watched through WHEP)
            audio = self.pc.addTransceiver("audio", direction="recvonly")
            self._prefer(audio, _codec_preferences("audio", ("opus",)))
            if video_line is not None:
                self.pc.addTransceiver("video", direction="recvonly")
        else:
            video = self.pc.addTransceiver(self.video, direction="sendonly")
            self._prefer(video, _codec_preferences("video", self.config.video_codecs))
            if audio_line is not None:
                # the page may send its microphone on the same m-line; a WHEP player only receives
                wants_mic = self.role == "page" and audio_line.direction in SENDS
                audio = self.pc.addTransceiver(self.audio, direction="sendrecv" if wants_mic else "sendonly")
                self._prefer(audio, _codec_preferences("audio", ("opus",)))
                if audio_line.direction in RECEIVES:
                    same_stream(video.sender, audio.sender)
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer.sdp, type="offer"))
            answer = await self.pc.createAnswer()
            await self.pc.setLocalDescription(RTCSessionDescription(sdp=as_dtls_server(answer.sdp), type="answer"))
        except Exception as exc:  # aiortc signals unusable offers with assorted exception types
            raise OfferError(f"cannot answer the SDP offer: {exc or type(exc).__name__}") from exc
        self._spawn(self._watchdog(), "watchdog")
        if self._sends_media:
            self._spawn(self._push_stats(), "stats")
        return self.pc.localDescription.sdp

    @property
    def _sends_media(self) -> bool:
        return self.role != "whip"

    async def trickle(self, fragment: TrickleFragment) -> None:
        """Add the client's trickled ICE candidates (WHIP/WHEP PATCH); OfferError on one aiortc refuses."""
        for candidate in fragment.candidates:
            try:
                await self.pc.addIceCandidate(candidate)
            except Exception as exc:  # aioice: a candidate after end-of-candidates, or an unusable address
                raise OfferError(f"cannot add the ICE candidate: {exc or type(exc).__name__}") from None
        if fragment.end:
            with contextlib.suppress(ValueError):  # a repeated end-of-candidates changes nothing
                await self.pc.addIceCandidate(None)

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
        if track.kind == "audio" and self.role != "whep":
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
            try:
                self.send_json(handle_control_text(self.session, message))
            except Exception:  # never let one message stop the channel's event handling
                logger.exception("session %s: control message failed", self.name)

    def send_json(self, message: dict[str, Any]) -> None:
        channel = self._channel
        if channel is not None and channel.readyState == "open":
            try:
                channel.send(json.dumps(message))
            except (ConnectionError, ValueError) as exc:  # the channel closed under us: the client is gone
                logger.debug("session %s: cannot send on the control channel: %s", self.name, exc)

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
        """RTCP from the client proves it is there: receiver reports about our streams (it still receives them),
        sender reports about its own (a publisher whose microphone is muted still sends them)."""
        newest = self._last_rtcp
        endpoints: list[Any] = [*self.pc.getSenders(), *self.pc.getReceivers()]
        for endpoint in endpoints:
            with contextlib.suppress(Exception):
                report = await endpoint.getStats()
                for stat in report.values():
                    if stat.type in ("remote-inbound-rtp", "remote-outbound-rtp") and (
                        newest is None or stat.timestamp > newest
                    ):
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
        fanout_dropped = self.source.video_dropped if self.source is not None else 0
        return {
            "session": self.name,
            "role": self.role,
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
            "video_dropped": self.stats.video_dropped + fanout_dropped,
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
        if self.source is not None:
            self.source.close()  # its end unblocks the senders waiting on frames
        for ws in list(self.sockets):
            with contextlib.suppress(Exception):
                await ws.close(message=b"session closed")
        # the session first: its buffers are freed now, and its end unblocks the senders waiting on its frames
        if self.owns_session:
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
