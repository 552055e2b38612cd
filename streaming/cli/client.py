"""``engine client``: stream a microphone or a WAV file to ``engine serve --webrtc`` and receive the avatar."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

import click

from streaming.transports.webrtc.client import ClientError, ClientOptions, run_client


def _device(value: str | None) -> str | int | None:
    """sounddevice takes a device index or (part of) its name."""
    if value is None:
        return None
    return int(value) if value.isdigit() else value


@click.command()
@click.option("--url", required=True, help="Server root, e.g. http://127.0.0.1:8080")
@click.option("--token", envvar="AVATAR_ENGINE_TOKEN", default=None, help="Bearer token (or $AVATAR_ENGINE_TOKEN).")
@click.option("--mic", is_flag=True, help="Stream the microphone (needs sounddevice + PortAudio).")
@click.option("--mic-device", default=None, help="Input device index or name (default: the system default).")
@click.option(
    "--wav", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None, help="Stream a WAV file."
)
@click.option("--show", is_flag=True, help="Show the avatar in a window (OpenCV with GUI).")
@click.option("--virtual-camera", is_flag=True, help="Send the avatar to a virtual camera (pyvirtualcam).")
@click.option("--audio-out", default=None, help="Play the returned audio on this output device (index or name).")
@click.option(
    "--audio-delay-ms",
    type=click.FloatRange(0, 2000),
    default=None,
    help="Hold the played audio back by this much (default: what the virtual camera adds beyond the 80 ms "
    "aiortc already holds audio, usually 0).",
)
@click.option("--duration", type=click.FloatRange(min=0.1), default=None, help="Seconds to run (default: WAV + 1 s).")
@click.option(
    "--record",
    "record_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write video.mp4, audio.wav and report.json here.",
)
def client(
    url: str,
    token: str | None,
    mic: bool,
    mic_device: str | None,
    wav: Path | None,
    show: bool,
    virtual_camera: bool,
    audio_out: str | None,
    audio_delay_ms: float | None,
    duration: float | None,
    record_dir: Path | None,
) -> None:
    """Stream a microphone (--mic) or a WAV file (--wav) to a server; prints what was received as JSON."""

    if mic == (wav is not None):
        raise click.UsageError("choose exactly one audio source: --mic or --wav FILE")
    options = ClientOptions(
        url=url,
        token=token,
        wav=wav,
        mic_device=_device(mic_device),
        show=show,
        virtual_camera=virtual_camera,
        audio_out=_device(audio_out),
        audio_delay_ms=audio_delay_ms,
        duration_s=duration,
        record_dir=record_dir,
    )

    async def main() -> str:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):  # Windows
                loop.add_signal_handler(sig, stop.set)
        report = await run_client(options, stop)
        return report.to_json()

    try:
        click.echo(asyncio.run(main()))
    except ClientError as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:  # connection refused, DNS failure
        raise click.ClickException(f"cannot reach {url}: {exc}") from exc
