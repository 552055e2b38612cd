"""Settings of the WebRTC / WHIP / WHEP / websocket server (frozen; validated when built)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from engine.config import ConfigError

KNOWN_VIDEO_CODECS = ("VP8", "H264")
# RFC 7064 / 7065 URIs that aiortc can use: stun:host[:port], turn:host[:port][?transport=udp|tcp], turns: (TLS)
_ICE_URL = re.compile(
    r"(?P<scheme>stun|turns?):(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(?::(?P<port>\d{1,5}))?"
    r"(?:\?transport=(?P<transport>udp|tcp))?"
)


@dataclass(frozen=True)
class IceServer:
    """A STUN or TURN server the server's peer connections use (none by default: host candidates only)."""

    url: str  # stun:host[:port] | turn:host[:port][?transport=udp|tcp] | turns:...
    username: str | None = None  # TURN only
    credential: str | None = None  # TURN only (password)

    def __post_init__(self) -> None:
        match = _ICE_URL.fullmatch(self.url)
        if match is None:
            raise ConfigError(
                f"ICE server {self.url!r} is not a stun:/turn:/turns: URL "
                "(stun:host[:port], turn:host[:port][?transport=udp|tcp])"
            )
        if match["port"] is not None and not 0 < int(match["port"]) < 65536:
            raise ConfigError(f"ICE server {self.url!r}: port out of range")
        turn = self.is_turn
        if match["scheme"] == "turns" and match["transport"] == "udp":
            raise ConfigError(f"ICE server {self.url!r}: turns: runs over TLS (TCP); transport=udp does not apply")
        if match["transport"] is not None and not turn:
            raise ConfigError(f"ICE server {self.url!r}: only TURN URLs take ?transport=")
        if turn and not (self.username and self.credential):
            raise ConfigError(f"TURN server {self.url!r} needs a username and a credential (turn:USER:PASS@host:port)")
        if not turn and (self.username or self.credential):
            raise ConfigError(f"STUN server {self.url!r} takes no credentials")

    @property
    def is_turn(self) -> bool:
        return self.url.startswith("turn")

    @classmethod
    def parse(cls, text: str) -> IceServer:
        """``stun:host:port`` or ``turn:USER:PASSWORD@host:port?transport=udp`` (credentials before the last @)."""
        scheme, sep, rest = text.partition(":")
        if not sep:
            raise ConfigError(f"ICE server {text!r} is not a stun:/turn:/turns: URL")
        userinfo, at, address = rest.rpartition("@")
        if not at:
            return cls(text)
        username, colon, credential = userinfo.partition(":")
        if not colon:
            raise ConfigError(f"ICE server {text!r}: credentials must be USER:PASSWORD@")
        return cls(f"{scheme}:{address}", username, credential)

    def link_header(self) -> str:
        """The RFC 9725 section 4.6 ``Link`` value that hands this server to a WHIP/WHEP client."""
        value = f'<{self.url}>; rel="ice-server"'
        if self.is_turn:
            value += f'; username="{_quoted(self.username)}"; credential="{_quoted(self.credential)}"'
            value += '; credential-type="password"'
        return value


def _quoted(text: str | None) -> str:
    return (text or "").replace("\\", "\\\\").replace('"', '\\"')


@dataclass(frozen=True)
class ServerConfig:
    token: str | None = None  # bearer token required on /offer, /whip, /ws and /metrics when set
    max_sessions: int = 4
    retry_after_s: int = 5  # Retry-After sent with 503 when every session slot is taken
    client_max_size: int = 256 * 1024  # largest accepted request body (an SDP offer is a few KiB)
    ws_max_message: int = 1 << 20  # largest websocket message (about 32 s of PCM16 at 16 kHz)
    liveness_timeout_s: float = 3.0  # no RTCP / mic / channel activity for this long -> session freed
    connect_timeout_s: float = 15.0  # ICE + DTLS must complete within this after the answer
    max_video_lag_s: float = 0.5  # frames later than this behind the clock are dropped to stay live
    stats_interval_s: float = 1.0  # stats pushed to the page over the control channel
    video_codecs: tuple[str, ...] = KNOWN_VIDEO_CODECS  # in order of preference
    # STUN/TURN servers of every peer connection; none by default, so aiortc never falls back to a public STUN
    # server (a server with a public address needs none; behind NAT, configure them: see docs/whip-whep.md)
    ice_servers: tuple[IceServer, ...] = ()
    max_viewers: int = 4  # WHEP viewers of one session beside its own peer (each encodes its own stream)

    def __post_init__(self) -> None:
        if self.token is not None and not self.token:
            raise ConfigError("token must be a non-empty string (or None for no authentication)")
        if self.max_sessions < 1:
            raise ConfigError(f"max_sessions must be >= 1, got {self.max_sessions}")
        if self.max_viewers < 0:
            raise ConfigError(f"max_viewers must be >= 0, got {self.max_viewers}")
        if not all(isinstance(s, IceServer) for s in self.ice_servers):
            raise ConfigError("ice_servers must be IceServer entries (IceServer.parse('stun:host:port'))")
        if self.retry_after_s < 1:
            raise ConfigError(f"retry_after_s must be >= 1, got {self.retry_after_s}")
        if self.client_max_size < 4096 or self.ws_max_message < 4096:
            raise ConfigError("client_max_size and ws_max_message must be at least 4096 bytes")
        for name in ("liveness_timeout_s", "connect_timeout_s", "max_video_lag_s", "stats_interval_s"):
            value = getattr(self, name)
            if not value > 0:
                raise ConfigError(f"{name} must be > 0, got {value}")
        if not self.video_codecs:
            raise ConfigError("video_codecs must name at least one codec")
        unknown = [c for c in self.video_codecs if c not in KNOWN_VIDEO_CODECS]
        if unknown:
            raise ConfigError(f"unknown video codec(s) {unknown}; known: {list(KNOWN_VIDEO_CODECS)}")
