"""WebRTC / WHIP / websocket serving of live sessions (aiohttp + aiortc)."""

from streaming.server.app import SessionFactory, create_app
from streaming.server.config import ServerConfig

__all__ = ["ServerConfig", "SessionFactory", "create_app"]
