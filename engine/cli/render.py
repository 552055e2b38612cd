"""``engine render``: an audio file and an avatar -> a talking-head mp4 (H.264 + AAC), offline.

It runs the live pipeline (``streaming.session``) without real-time pacing, so what you render is what a live
session would show, only faster. Nothing is left under ``--out`` when rendering fails.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from engine.weights import UNTRAINED_MESSAGE

if TYPE_CHECKING:
    from streaming.offline import RenderResult
    from streaming.runtime import RuntimeConfig

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
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="Output mp4 file.")
@click.option("--emotion", default=None, help="Emotion (neutral, happy, angry, sad, surprise, ...).")
@click.option("--intensity", type=float, default=None, help="Emotion intensity.")
@click.option(
    "--mode",
    type=click.Choice(["auto", "classic", "neural"]),
    default="auto",
    show_default=True,
    help="auto: neural when LivePortrait weights are imported, else classic (weight-free).",
)
@click.option(
    "--weights",
    type=click.Path(path_type=Path),
    default=None,
    help="LivePortrait weight store (default: the engine home's).",
)
@click.option("--preset", default="tiny", show_default=True, help="Renderer preset when no weights are imported.")
@click.option(
    "--backend",
    default="eager",
    show_default=True,
    help="Backend the neural networks run on (eager, compile, onnxruntime, tensorrt; neural mode only).",
)
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
    mode: str,
    weights: Path | None,
    preset: str,
    backend: str,
    fps: int,
    paste_back: bool,
    no_progress: bool,
) -> None:
    """Render a talking video from an audio file, as fast as the machine allows."""
    from engine.config import ConfigError
    from engine.weights.checkpoint import CheckpointError
    from streaming.runtime import RuntimeBuildError, RuntimeConfig, check_backend_name
    from streaming.session import SessionConfig
    from streaming.video_io import MediaError, check_writable, read_audio

    if avatar_name is not None and image is not None:
        raise click.UsageError("give either --avatar or --image, not both")
    controls: dict[str, Any] = {}
    if emotion is not None:
        controls["emotion"] = emotion
    if intensity is not None:
        controls["intensity"] = intensity
    try:
        check_backend_name(backend)
    except ValueError as exc:  # the message lists the available backends
        raise click.BadParameter(str(exc), param_hint="--backend") from exc
    try:
        config = RuntimeConfig(
            mode=mode,
            weights=str(weights) if weights is not None else None,
            preset=preset,
            session=SessionConfig(fps=fps, realtime=False),
            backend=backend,
        )
        check_writable(out)  # before any work: a bad --out must not cost a render
        audio = read_audio(audio_path)
        result = asyncio.run(_render(config, audio, out, avatar_name, image, controls, paste_back, no_progress))
    except (MediaError, ConfigError, CheckpointError, FileNotFoundError, RuntimeBuildError) as exc:
        raise click.ClickException(str(exc)) from exc
    except ValueError as exc:  # bad image, unknown avatar, invalid control
        raise click.ClickException(str(exc)) from exc
    except RuntimeError as exc:  # a stage or the renderer failed mid-way (nothing was written)
        raise click.ClickException(f"rendering failed: {exc}") from exc
    if result.untrained:
        click.secho(f"WARNING: {UNTRAINED_MESSAGE}", fg="red", err=True)
    width, height = result.size
    click.echo(
        f"wrote {result.out}: {result.frames} frames of {width}x{height} at {result.fps} fps, "
        f"{result.duration_s:.2f} s{' (pasted into the photo)' if result.pasted else ''}"
    )


async def _render(
    config: RuntimeConfig,
    audio: Any,
    out: Path,
    avatar_name: str | None,
    image: Path | None,
    controls: dict[str, Any],
    paste_back: bool,
    no_progress: bool,
) -> RenderResult:
    from tqdm import tqdm

    from streaming.clock import frame_count
    from streaming.offline import render_to_file
    from streaming.runtime import Runtime

    fps = config.session.fps
    runtime = Runtime.create(config)
    try:
        if runtime.untrained:
            click.secho(f"WARNING: {UNTRAINED_MESSAGE}", fg="red", err=True)
        if runtime.mode == "classic":
            from streaming.server.app import CLASSIC_BANNER

            # a first run without imported weights must say why the face is drawn, not neural
            logger.info("%s", CLASSIC_BANNER)
            click.secho(CLASSIC_BANNER, fg="yellow", err=True)
        avatar = runtime.load_avatar(avatar_name, image) if image is not None else avatar_name
        total = frame_count(len(audio), fps)
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
    finally:
        await runtime.aclose()
    return result
