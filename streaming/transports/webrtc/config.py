"""Settings of the WebRTC / WHIP / websocket server (frozen; validated when built)."""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import ConfigError

KNOWN_VIDEO_CODECS = ("VP8", "H264")


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

    def __post_init__(self) -> None:
        if self.token is not None and not self.token:
            raise ConfigError("token must be a non-empty string (or None for no authentication)")
        if self.max_sessions < 1:
            raise ConfigError(f"max_sessions must be >= 1, got {self.max_sessions}")
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
