"""WebRTC / WHIP / websocket serving of live sessions (aiohttp + aiortc)."""

from streaming.transports.webrtc.app import SessionFactory, create_app
from streaming.transports.webrtc.config import ServerConfig

__all__ = ["ServerConfig", "SessionFactory", "create_app"]
