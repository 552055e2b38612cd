"""The avatar as a separate LiveKit avatar worker: joins the agent's room with a token from
``streaming.transports.livekit.avatar_token`` (which sets ``lk.publish_on_behalf`` to the agent), receives the
agent's speech over LiveKit data streams and publishes the avatar's video and audio on the agent's behalf.

    pip install "avatar-engine[livekit]"
    python examples/livekit_avatar_worker.py --url wss://your.livekit.host --token <worker token>

It answers the agent's ``lk.clear_buffer`` (barge-in) and sends ``lk.playback_started`` / ``lk.playback_finished``,
so the agent's turn-taking sees when the avatar really spoke. It leaves when the agent leaves. Start it from the
agent with ``RemoteEngineAvatar(launch=...)`` (see examples/livekit_agent.py) or from your own dispatcher.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging

from livekit import rtc

from streaming.pipelines import RuntimeConfig
from streaming.runtime import Runtime
from streaming.transports.livekit import serve_avatar_worker

logger = logging.getLogger("avatar-worker")


async def run(args: argparse.Namespace) -> None:
    runtime = Runtime.create(RuntimeConfig(mode=args.mode))
    if runtime.pipeline.banner:
        logger.warning("%s", runtime.pipeline.banner)
    room = rtc.Room()
    try:
        await room.connect(args.url, args.token)
        logger.info("joined room %s as %s", room.name, room.local_participant.identity)
        await serve_avatar_worker(room, runtime, agent_identity=args.agent_identity, avatar=args.avatar)
    finally:
        await room.disconnect()
        await runtime.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the LiveKit server (wss://...)")
    parser.add_argument("--token", required=True, help="a token from avatar_token(room=..., agent_identity=...)")
    parser.add_argument("--agent-identity", default=None, help="the agent to serve (default: the first agent)")
    parser.add_argument("--mode", default="classic", help="auto, classic or neural (neural needs imported weights)")
    parser.add_argument("--avatar", default=None, help="a stored avatar's name (default: the default avatar)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
