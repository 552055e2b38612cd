"""A LiveKit voice agent with the self-hosted avatar, either way LiveKit runs avatars.

    pip install "avatar-engine[livekit]"
    export LIVEKIT_URL=wss://... LIVEKIT_API_KEY=... LIVEKIT_API_SECRET=...
    python examples/livekit_agent.py dev                        # the avatar in the agent's process
    AVATAR_WORKER=1 python examples/livekit_agent.py dev        # the avatar as a separate worker process

The STT, LLM and TTS below are LiveKit Inference models (they need LiveKit Cloud credentials); any LiveKit
plugin works in their place. In-process, ``EngineAvatar`` routes the agent's audio through a ``QueueAudioOutput``
into an ``AvatarRunner`` that publishes the avatar from the agent's participant. With ``AVATAR_WORKER=1``,
``RemoteEngineAvatar`` mints a worker token (``lk.publish_on_behalf`` = the agent), starts
examples/livekit_avatar_worker.py with it, and streams the agent's audio to the worker over data streams.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from livekit.agents import Agent, AgentServer, AgentSession, JobContext, cli, inference

from streaming.pipelines import RuntimeConfig
from streaming.runtime import Runtime
from streaming.transports.livekit import EngineAvatar, RemoteEngineAvatar, WorkerLaunch

WORKER = Path(__file__).with_name("livekit_avatar_worker.py")
server = AgentServer()


async def launch_worker(info: WorkerLaunch) -> None:
    """Start the avatar worker as a child process (a real deployment posts ``info`` to its avatar servers)."""
    await asyncio.create_subprocess_exec(sys.executable, str(WORKER), "--url", info.url, "--token", info.token)


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    await ctx.connect()
    session = AgentSession(
        stt=inference.STT("deepgram/nova-3"),
        llm=inference.LLM("openai/gpt-4.1-mini"),
        tts=inference.TTS("cartesia/sonic-3"),
        resume_false_interruption=False,  # the avatar cannot pause a reply, only stop it
    )
    if os.environ.get("AVATAR_WORKER"):
        avatar = RemoteEngineAvatar(launch=launch_worker)
        await avatar.start(session, ctx.room)
    else:
        # one runtime per job process (LiveKit runs each job in its own process); AVATAR_MODE=neural with weights
        runtime = Runtime.create(RuntimeConfig(mode=os.environ.get("AVATAR_MODE", "classic")))
        local = EngineAvatar(runtime, controls={"emotion": "happy", "intensity": 0.6})
        await local.start(session, ctx.room)

        async def close_avatar() -> None:
            await local.aclose()
            await runtime.aclose()

        ctx.add_shutdown_callback(close_avatar)
    await session.start(agent=Agent(instructions="You are a friendly assistant with a face."), room=ctx.room)
    await session.generate_reply(instructions="Greet the user.")


if __name__ == "__main__":
    cli.run_app(server)
