"""``engine client``: stream a microphone or an audio file to ``engine serve --webrtc`` and receive the avatar."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path
from typing import Any

import click

from engine.motion.control_schema import ControlValueError, validate_control
from streaming.cli.options import parse_controls
from streaming.transports.webrtc.client import ClientError, ClientOptions, list_devices, run_client


def _device(value: str | None) -> str | int | None:
    """sounddevice takes a device index or (part of) its name."""
    if value is None:
        return None
    return int(value) if value.isdigit() else value


@click.command()
@click.option("--url", default=None, help="Server root, e.g. http://127.0.0.1:8080")
@click.option("--token", envvar="AVATAR_ENGINE_TOKEN", default=None, help="Bearer token (or $AVATAR_ENGINE_TOKEN).")
@click.option("--mic", is_flag=True, help="Stream the microphone (needs sounddevice + PortAudio).")
@click.option("--mic-device", default=None, help="Input device index or (part of its) name (default: the system's).")
@click.option(
    "--list-devices", "list_devices_", is_flag=True, help="List the audio devices (--mic-device, --audio-out) and exit."
)
@click.option(
    "--audio",
    "--wav",
    "audio_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Stream an audio file (WAV, mp3, flac, ogg, m4a, ...) as if spoken live.",
)
@click.option("--show", is_flag=True, help="Show the avatar in a window (q quit, space interrupt, e emotion).")
@click.option("--virtual-camera", is_flag=True, help="Send the avatar to a virtual camera (docs/virtual-camera.md).")
@click.option("--camera-device", default=None, help="Virtual camera device, e.g. /dev/video4 (default: the first).")
@click.option("--audio-out", default=None, help="Play the avatar's audio on this output device (index or name).")
@click.option(
    "--audio-delay-ms",
    type=click.FloatRange(0, 2000),
    default=None,
    help="Play the sound this much after its picture is shown (default: 0 for the window, one frame for the "
    "virtual camera, which shows a frame one period after it gets it).",
)
@click.option("--duration", type=click.FloatRange(min=0.1), default=None, help="Seconds to run (default: file + 1 s).")
@click.option(
    "--video-timeout",
    type=click.FloatRange(min=0.1),
    default=5.0,
    show_default=True,
    help="Fail when no video frame arrives within this many seconds.",
)
@click.option(
    "--record",
    "record_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write session.mp4 (video + audio) and report.json here.",
)
@click.option(
    "--ice-server",
    "ice_servers",
    multiple=True,
    help="STUN/TURN server (stun:HOST:PORT, turn:HOST:PORT); repeatable. Default: none, nothing else is contacted.",
)
@click.option("--ice-username", default=None, help="Username for the TURN servers.")
@click.option("--ice-credential", envvar="AVATAR_ENGINE_ICE_CREDENTIAL", default=None, help="TURN credential.")
@click.option(
    "--control",
    "control_items",
    multiple=True,
    metavar="KEY=VALUE",
    help="A control sent over the data channel once connected, repeatable, in order (e.g. --control emotion=happy "
    "--control lip_scale=1.4); the server's refusals are printed with its reason. See docs/controls.md.",
)
@click.option(
    "--timeline",
    "timeline_out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write when each frame arrived and was shown (JSON, monotonic seconds) to this file.",
)
def client(
    url: str | None,
    token: str | None,
    mic: bool,
    mic_device: str | None,
    list_devices_: bool,
    audio_file: Path | None,
    show: bool,
    virtual_camera: bool,
    camera_device: str | None,
    audio_out: str | None,
    audio_delay_ms: float | None,
    duration: float | None,
    video_timeout: float,
    record_dir: Path | None,
    ice_servers: tuple[str, ...],
    ice_username: str | None,
    ice_credential: str | None,
    timeline_out: Path | None,
    control_items: tuple[str, ...],
) -> None:
    """Stream a microphone (--mic) or an audio file (--audio FILE) to a server; prints what was received as JSON."""

    try:
        if list_devices_:
            click.echo(list_devices())
            return
        if url is None:
            raise click.UsageError("--url is required (the server root, e.g. http://127.0.0.1:8080)")
        if mic == (audio_file is not None):
            raise click.UsageError("choose exactly one audio source: --mic or --audio FILE (--wav FILE)")
        controls = []
        for item in control_items:  # checked against the schema here: a typo fails before connecting
            message = parse_controls([item])
            try:
                validate_control(message)
            except ControlValueError as exc:
                raise click.BadParameter(str(exc), param_hint="--control") from exc
            controls.append(message)
        options = ClientOptions(
            url=url,
            token=token,
            audio_file=audio_file,
            mic_device=_device(mic_device),
            show=show,
            virtual_camera=virtual_camera,
            camera_device=camera_device,
            audio_out=_device(audio_out),
            audio_delay_ms=audio_delay_ms,
            duration_s=duration,
            record_dir=record_dir,
            video_timeout_s=video_timeout,
            ice_servers=ice_servers,
            ice_username=ice_username,
            ice_credential=ice_credential,
            timeline_out=timeline_out,
            controls=tuple(controls),
            on_control_reply=_print_reply,
        )

        async def main() -> str:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError):  # Windows
                    loop.add_signal_handler(sig, stop.set)
            report = await run_client(options, stop)
            return report.to_json()

        click.echo(asyncio.run(main()))
    except ClientError as exc:
        raise click.ClickException(str(exc)) from exc


def _print_reply(sent: dict[str, Any], reply: dict[str, Any]) -> None:
    """A control's answer, as it comes: refusals with the server's reason (stderr, so stdout stays the report)."""
    text = ", ".join(f"{k}={v}" for k, v in sent.items())
    if reply.get("type") == "ack":
        click.echo(f"control {text}: applied", err=True)
    else:
        click.echo(f"control {text} refused: {reply.get('message') or reply}", err=True)
