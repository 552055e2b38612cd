"""A pipecat bot with the self-hosted avatar, in the browser over pipecat's SmallWebRTC transport.

    pip install "avatar-engine[pipecat]"
    python examples/pipecat_avatar.py            # then open http://127.0.0.1:7860

Type a sentence on the page and the avatar says it (Debian's espeak-ng stands in for a TTS service, so this runs
with no API key); "Interrupt" sends pipecat's interruption, as a voice agent does when the user barges in.
For a real voice agent put your STT, LLM and TTS services where ``PageCommands`` and ``EspeakTTS`` are:

    Pipeline([transport.input(), stt, user_aggregator, llm, tts, avatar, transport.output(), assistant_aggregator])

The engine runs in this process: one ``Runtime`` for every visitor (classic mode by default; ``--mode neural``
with imported weights), one ``AvatarVideoService`` per pipeline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import logging
import shutil
import subprocess
import wave
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web
from pipecat.frames.frames import (
    Frame,
    InputTransportMessageFrame,
    TextFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.transports.base_transport import TransportParams
from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection
from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport
from pipecat.workers.runner import WorkerRunner

from streaming.pipelines import RuntimeConfig
from streaming.runtime import Runtime
from streaming.transports.pipecat import AvatarControlFrame, AvatarVideoService, avatar_video_params

PAGE = Path(__file__).with_name("pipecat_avatar.html")
MAX_SAY = 500  # characters per sentence
logger = logging.getLogger("pipecat-avatar")


class PageCommands(FrameProcessor):
    """The page's data-channel messages (``"type": "avatar"``): ``"say": text``, ``"interrupt": true``,
    ``"controls": {...}``."""

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if (
            isinstance(frame, InputTransportMessageFrame)
            and isinstance(frame.message, dict)
            and (frame.message.get("type") == "avatar")
        ):
            message: dict[str, Any] = frame.message
            if message.get("interrupt"):
                await self.broadcast_interruption()
            if isinstance(message.get("controls"), dict):
                await self.push_frame(AvatarControlFrame(message["controls"]))
            if isinstance(message.get("say"), str) and message["say"].strip():
                await self.push_frame(TextFrame(message["say"][:MAX_SAY]))
            return
        await self.push_frame(frame, direction)


class EspeakTTS(FrameProcessor):
    """A stand-in TTS: ``TextFrame`` -> espeak-ng speech as 20 ms ``TTSAudioRawFrame``, pushed as fast as it is
    made (like a TTS service), between ``TTSStartedFrame`` and ``TTSStoppedFrame``."""

    def __init__(self) -> None:
        super().__init__()
        self._count = 0
        if shutil.which("espeak-ng") is None:
            raise SystemExit("espeak-ng is missing (Debian: apt-get install espeak-ng)")

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if not isinstance(frame, TextFrame):
            await self.push_frame(frame, direction)
            return
        pcm, rate = await asyncio.to_thread(self.speak, frame.text)
        self._count += 1
        context = f"say-{self._count}"
        await self.push_frame(TTSStartedFrame(context_id=context))
        step = rate // 50
        for i in range(0, pcm.size, step):
            await self.push_frame(TTSAudioRawFrame(pcm[i : i + step].tobytes(), rate, 1, context_id=context))
        await self.push_frame(TTSStoppedFrame(context_id=context))

    @staticmethod
    def speak(text: str) -> tuple[np.ndarray, int]:
        wav = subprocess.run(["espeak-ng", "--stdout", text], check=True, capture_output=True, timeout=30).stdout
        with wave.open(io.BytesIO(wav)) as w:
            return np.frombuffer(w.readframes(w.getnframes()), np.int16).copy(), w.getframerate()


async def run_bot(connection: SmallWebRTCConnection, runtime: Runtime, avatar: str | None) -> None:
    """One visitor's pipeline, until the page goes away."""
    transport = SmallWebRTCTransport(
        webrtc_connection=connection,
        params=TransportParams(audio_out_enabled=True, **avatar_video_params(runtime)),
    )
    service = AvatarVideoService(runtime=runtime, avatar=avatar)
    pipeline = Pipeline([transport.input(), PageCommands(), EspeakTTS(), service, transport.output()])
    worker = PipelineWorker(pipeline)

    @transport.event_handler("on_client_disconnected")
    async def on_disconnected(_transport: Any, _client: Any) -> None:
        await worker.cancel()

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await runner.run()


def create_app(runtime: Runtime, avatar: str | None = None) -> web.Application:
    """The page and its WebRTC offer endpoint; every offer starts a pipeline on the shared ``runtime``."""
    bots: set[asyncio.Task[None]] = set()

    async def page(_: web.Request) -> web.StreamResponse:
        return web.FileResponse(PAGE)

    async def offer(request: web.Request) -> web.Response:
        body = await request.json()
        if not isinstance(body, dict) or body.get("type") != "offer" or not isinstance(body.get("sdp"), str):
            raise web.HTTPBadRequest(text='expected {"type": "offer", "sdp": ...}')
        connection = SmallWebRTCConnection()
        await connection.initialize(sdp=body["sdp"], type="offer")
        bot = asyncio.create_task(run_bot(connection, runtime, avatar), name=f"bot-{connection.pc_id}")
        bots.add(bot)
        bot.add_done_callback(bots.discard)
        return web.json_response(connection.get_answer())

    async def info(_: web.Request) -> web.Response:
        return web.json_response({**runtime.describe(), "banner": runtime.pipeline.banner})

    async def shutdown(_: web.Application) -> None:
        for bot in list(bots):
            bot.cancel()
        for bot in list(bots):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await bot

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_get("/info", info)
    app.router.add_post("/api/offer", offer)
    app.on_shutdown.append(shutdown)
    return app


async def serve(args: argparse.Namespace) -> None:
    runtime = Runtime.create(RuntimeConfig(mode=args.mode))
    if runtime.pipeline.banner:
        print(runtime.pipeline.banner)
    runner = web.AppRunner(create_app(runtime, args.avatar))
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    print(f"open http://{args.host}:{args.port} (Ctrl-C to stop)")
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        await runtime.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--mode", default="classic", help="auto, classic or neural (neural needs imported weights)")
    parser.add_argument("--avatar", default=None, help="a stored avatar's name (default: the default avatar)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
