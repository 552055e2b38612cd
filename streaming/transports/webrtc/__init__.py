"""WebRTC (/offer), WHIP, WHEP and websocket serving of live sessions (aiohttp + aiortc); docs/whip-whep.md."""

from streaming.transports.webrtc.app import SessionFactory, create_app
from streaming.transports.webrtc.config import ServerConfig

__all__ = ["ServerConfig", "SessionFactory", "create_app"]
