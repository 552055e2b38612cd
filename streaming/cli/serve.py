"""``engine serve --webrtc``: the browser page, WebRTC (``/offer``), WHIP, WHEP and the websocket ingest."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
from typing import Any

import click

from engine.config import ConfigError
from streaming.cli.options import RUNTIME_OPTION_NAMES, runtime_config, runtime_options
from streaming.factory import EngineFactoryError, open_engine_factory
from streaming.session import SessionConfig
from streaming.transports.webrtc import ServerConfig, create_app
from streaming.transports.webrtc.app import serve_app
from streaming.transports.webrtc.config import IceServer

logger = logging.getLogger(__name__)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command()
@click.option("--webrtc", is_flag=True, help="Serve over WebRTC (page, /offer, WHIP, WHEP, websocket ingest).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--avatar", default=None, help="Avatar name (default: the built-in default avatar).")
@runtime_options
@click.option("--token", envvar="AVATAR_ENGINE_TOKEN", default=None, help="Require this bearer token.")
@click.option("--max-sessions", type=click.IntRange(min=1), default=4, show_default=True)
@click.option(
    "--max-viewers",
    type=click.IntRange(min=0),
    default=4,
    show_default=True,
    help="WHEP viewers per session beside the peer that opened it (each viewer encodes its own stream).",
)
@click.option(
    "--ice-server",
    "ice_servers",
    multiple=True,
    metavar="URL",
    help="STUN/TURN server for the server's peer connections (repeatable): stun:HOST[:PORT] or "
    "turn:USER:PASSWORD@HOST[:PORT][?transport=udp|tcp]. None by default (host candidates only); handed to WHIP/WHEP "
    "clients in Link headers.",
)
@click.option(
    "--jitter-ms",
    type=click.FloatRange(0, 500),
    default=20.0,
    show_default=True,
    help="Latency budget: how late microphone audio may arrive before its frame is committed (else silence).",
)
@click.option(
    "--compute-frames",
    type=click.IntRange(0, 25),
    default=2,
    show_default=True,
    help="Latency budget: frame periods allowed for motion and rendering (slower frames repeat the last picture).",
)
def serve(
    webrtc: bool,
    host: str,
    port: int,
    avatar: str | None,
    token: str | None,
    max_sessions: int,
    max_viewers: int,
    ice_servers: tuple[str, ...],
    jitter_ms: float,
    compute_frames: int,
    **options: Any,
) -> None:
    """Serve live avatar sessions. Open http://HOST:PORT/ in a browser, or use `engine client`.

    Mic-to-frame latency = jitter + (lookahead + compute frames) / fps: 20 ms + (1 + 2) x 40 ms = 140 ms in
    classic mode by default (the diffusion motion needs a longer lookahead). WHIP publishers (OBS, GStreamer)
    POST to /whip and WHEP players to /whep: see docs/whip-whep.md."""
    if not webrtc:
        raise click.UsageError("choose a transport: --webrtc (the only one so far)")
    if token is None and not _is_loopback(host):
        logger.warning("listening on %s without --token: anyone who can reach it can open sessions", host)
    try:
        ice = tuple(IceServer.parse(url) for url in ice_servers)
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--ice-server") from exc
    for kind in ("STUN", "TURN"):
        if sum(s.is_turn == (kind == "TURN") for s in ice) > 1:
            # aiortc's ICE agent takes one of each; clients still get every one in the Link headers
            logger.warning("the server's peer connections use the first %s server only", kind)
    try:
        server_config = ServerConfig(token=token, max_sessions=max_sessions, max_viewers=max_viewers, ice_servers=ice)
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from exc
    session = SessionConfig(jitter_s=jitter_ms / 1000.0, compute_frames=compute_frames)
    config = runtime_config({k: options[k] for k in RUNTIME_OPTION_NAMES}, session=session)

    async def main() -> None:
        factory = await open_engine_factory(config, avatar)
        info = factory.describe()
        backend = info["backend"]
        click.echo(
            f"renderer {info['mode']}, motion {info['motion']}, avatar {info['avatar']}, {info['fps']} fps, "
            f"{backend['name']} on {backend['device']} ({backend['dtype']}), latency budget "
            f"{info['latency_budget_ms']:.0f} ms",
            err=True,
        )
        if info.get("banner"):  # the page shows it too; a first run must say why the face is not neural
            click.secho(info["banner"], fg="yellow", err=True)
        app = create_app(factory, server_config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await serve_app(app, host, port, stop, on_started=lambda url: click.echo(f"serving on {url}", err=True))

    try:
        asyncio.run(main())
    except EngineFactoryError as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:  # address in use, permission denied
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc}") from exc
