"""Live sessions: typed frames through small async stages on one clock, multi-session render batching,
offline rendering through the same pipeline, and the ways users reach it (WebRTC, WHIP, websocket, client)."""
