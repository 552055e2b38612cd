"""``engine render``: an audio file and an avatar -> a talking-head mp4 (H.264 + AAC), offline.

It runs the live pipeline (``streaming.session``) without real-time pacing, so what you render is what a live
session would show, only faster. Nothing is left under ``--out`` when rendering fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from engine.avatar.image import AvatarError
from engine.config import ConfigError
from engine.media import AudioFile, MediaError, check_writable
from engine.motion.emotion import EMOTIONS
from engine.weights.checkpoint import CheckpointError
from streaming.api import ControlError
from streaming.cli.options import RUNTIME_OPTION_NAMES, parse_controls, runtime_config, runtime_options
from streaming.pipelines import PipelineError, RuntimeConfig
from streaming.runtime import Runtime
from streaming.session import SessionConfig
from streaming.transports.offline import RenderResult, render_to_file

logger = logging.getLogger(__name__)


@click.command()
@click.option("--avatar", "avatar_name", default=None, help="A stored avatar (default: the built-in default avatar).")
@click.option(
    "--image",
    type=click.Path(path_type=Path),
    default=None,
    help="A portrait image to use instead of a stored avatar (prepared now, not stored).",
)
@click.option("--audio", "audio_path", type=click.Path(path_type=Path), required=True, help="Audio file (WAV, ...).")
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="Output video: .mp4, .mov or .mkv.")
@click.option("--emotion", default=None, help="Emotion: " + ", ".join(EMOTIONS) + " (a shortcut of --control).")
@click.option("--intensity", type=float, default=None, help="Emotion intensity, 0 to 1.5 (a shortcut of --control).")
@click.option(
    "--control",
    "control_items",
    multiple=True,
    metavar="KEY=VALUE",
    help="Any control, repeatable (e.g. --control lip_scale=1.4 --control blink=false); see docs/controls.md.",
)
@runtime_options
@click.option("--fps", type=click.IntRange(1, 120), default=25, show_default=True, help="Video frame rate.")
@click.option(
    "--paste-back/--no-paste-back",
    default=True,
    show_default=True,
    help="Blend the talking face back into the original photo (the video gets the photo's size, an odd side "
    "padded by one replicated pixel); --no-paste-back writes the square face crop.",
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def render(
    avatar_name: str | None,
    image: Path | None,
    audio_path: Path,
    out: Path,
    emotion: str | None,
    intensity: float | None,
    control_items: tuple[str, ...],
    fps: int,
    paste_back: bool,
    no_progress: bool,
    **options: Any,
) -> None:
    """Render a talking video from an audio file, as fast as the machine allows."""

    if avatar_name is not None and image is not None:
        raise click.UsageError("give either --avatar or --image, not both")
    controls = parse_controls(control_items)
    if emotion is not None:
        controls["emotion"] = emotion
    if intensity is not None:
        controls["intensity"] = intensity
    config = runtime_config(
        {k: options[k] for k in RUNTIME_OPTION_NAMES}, session=SessionConfig(fps=fps, realtime=False)
    )
    try:
        check_writable(out)  # before any work: a bad --out must not cost a render
        audio = AudioFile(audio_path)  # checked now, read a second at a time while rendering
        result = asyncio.run(_render(config, audio, out, avatar_name, image, controls, paste_back, no_progress))
    except Interrupted as exc:
        click.echo(f"render stopped by {exc}; nothing was written to {out}", err=True)
        raise SystemExit(128 + exc.signum) from None
    except AvatarError as exc:
        if image is None:
            raise click.ClickException(str(exc)) from exc
        raise click.ClickException(
            f"{exc}\n(--image prepares the photo with automatic settings; to give the face region or landmarks, "
            f"store it once with 'engine avatar add {image} --name NAME --crop x,y,w,h --landmarks FILE' and "
            "render with --avatar NAME)"
        ) from exc
    except (MediaError, ConfigError, CheckpointError, FileNotFoundError, PipelineError, ControlError) as exc:
        raise click.ClickException(str(exc)) from exc
    except ValueError as exc:  # bad image, unknown avatar, invalid control
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:  # e.g. the engine home cannot be written (full disk, permissions)
        raise click.ClickException(f"{exc.filename or 'a file'}: {exc.strerror or exc}") from exc
    except RuntimeError as exc:  # a stage or the renderer failed mid-way (nothing was written)
        raise click.ClickException(f"rendering failed: {exc}") from exc
    width, height = result.size
    click.echo(
        f"wrote {result.out}: {result.frames} frames of {width}x{height} at {result.fps} fps, "
        f"{result.duration_s:.2f} s{' (pasted into the photo)' if result.pasted else ''}"
    )


async def _render(
    config: RuntimeConfig,
    audio: AudioFile,
    out: Path,
    avatar_name: str | None,
    image: Path | None,
    controls: dict[str, Any],
    paste_back: bool,
    no_progress: bool,
) -> RenderResult:
    fps = config.session.fps
    runtime = Runtime.create(config)
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    stopped: list[int] = []

    def stop(signum: int) -> None:
        # SIGTERM / SIGINT: cancel the render; the writer removes its temporary file on the way out
        stopped.append(signum)
        if task is not None:
            task.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop, signum)
    try:
        banner = runtime.pipeline.banner
        if banner is not None:  # why the face is drawn, or noise: said once, before the work
            click.secho(banner, fg="red" if runtime.untrained else "yellow", err=True)
        avatar = runtime.load_avatar(avatar_name, image) if image is not None else avatar_name
        total = math.ceil(audio.duration_s * fps)
        with tqdm(total=total, unit="frame", disable=no_progress, desc="render") as bar:
            result = await render_to_file(
                runtime,
                audio,
                out,
                avatar=avatar,
                controls=controls or None,
                fps=fps,
                progress=bar.update,
                paste_back=paste_back,
            )
    except asyncio.CancelledError:
        if stopped:
            raise Interrupted(stopped[0]) from None
        raise
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signum)
        await runtime.aclose()
    return result


class Interrupted(Exception):
    """The render was stopped by a signal (its partial output is already removed)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
