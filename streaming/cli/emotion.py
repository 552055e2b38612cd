"""``engine emotion``: emotions from example photos or clips (EP-Talk, PC-Talk), stored in the motion library.

``engine emotion add happy --from smile.mp4 --neutral rest.jpg --avatar anna`` runs the motion extractor over the
example and the neutral example and stores their expressions (a clip: the median over its frames); sessions then
show ``emotion: happy`` (and interpolation, intensity, region mixing) with the example's expression. Without
LivePortrait weights the example's 68-point landmarks are stored for classic mode (``docs/controls.md``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from engine.avatar.face import FaceLocator
from engine.avatar.image import AvatarError
from engine.avatar.store import AvatarStore
from engine.config import ConfigError
from engine.motion.emotion import EMOTIONS
from engine.motion.examples import EMOTION_FRAMES, ExampleError, describe, emotion_example
from engine.motion.library import LibraryError, MotionLibrary
from engine.paths import default_weights_dir
from engine.render.neural import NeuralRenderer
from engine.weights.checkpoint import RECORD_NAME, CheckpointError
from streaming.pipelines import PipelineError, neural_renderer

MODES = ("auto", "classic", "neural")


def example_renderer(mode: str, weights: Path | None, preset: str) -> NeuralRenderer | None:
    """The LivePortrait networks whose keypoint space an example is stored in: ``auto`` uses imported weights when
    there are some (else only the classic space is made), ``neural`` also untrained ``preset`` weights (a keypoint
    space of noise, which the output says), ``classic`` none."""
    if mode == "classic":
        return None
    store = weights or default_weights_dir()
    imported = (store / RECORD_NAME).is_file()
    if weights is not None and not imported:
        raise click.ClickException(f"{weights} holds no imported LivePortrait weights (no {RECORD_NAME})")
    if not imported and mode == "auto":
        return None
    renderer = neural_renderer(str(store) if imported else None, preset=preset)
    if renderer.untrained:
        click.secho(
            f"untrained renderer weights (preset {preset}): the keypoint space stored is noise, good for tests only; "
            "import LivePortrait weights for real emotions",
            fg="red",
            err=True,
        )
    return renderer


def detectors_for(weights: Path | None) -> Path:
    return (weights or default_weights_dir()) / "detectors"


def weights_options(fn: Any) -> Any:
    for option in reversed(
        [
            click.option(
                "--mode",
                type=click.Choice(MODES),
                default="auto",
                show_default=True,
                help="Which spaces to store: auto: LivePortrait keypoints when weights are imported, and classic "
                "mode's landmark mesh when the example has 68-point landmarks; neural: keypoints always (untrained "
                "--preset weights without an import: noise, for tests) and the mesh; classic: the landmark mesh only.",
            ),
            click.option(
                "--weights",
                type=click.Path(file_okay=False, path_type=Path),
                default=None,
                help="LivePortrait weight store (default: the engine home's); its detectors/ are used too.",
            ),
            click.option(
                "--preset",
                type=click.Choice(["tiny", "liveportrait"]),
                default="tiny",
                show_default=True,
                help="Untrained renderer preset for --mode neural without imported weights.",
            ),
        ]
    ):
        fn = option(fn)
    return fn


@click.group()
def emotion() -> None:
    """Emotions from example photos or clips (stored per avatar or for every avatar)."""


@emotion.command("add")
@click.argument("name", type=click.Choice(EMOTIONS, case_sensitive=False))
@click.option(
    "--from",
    "example",
    type=click.Path(path_type=Path),
    required=True,
    help="A photo or a video clip of a face showing the emotion.",
)
@click.option(
    "--neutral",
    type=click.Path(path_type=Path),
    default=None,
    help="The same person's neutral face (photo or clip): the emotion stored is the difference (pure emotion). "
    "Default: the --avatar's own photo; without --avatar: the stored neutral emotion, else each portrait.",
)
@click.option("--avatar", "avatar_name", default=None, help="Store it for this avatar only (default: every avatar).")
@click.option(
    "--max-frames",
    type=click.IntRange(1, 500),
    default=EMOTION_FRAMES,
    show_default=True,
    help="Frames of a clip to read (spread over it); the emotion is their median.",
)
@weights_options
def add(
    name: str,
    example: Path,
    neutral: Path | None,
    avatar_name: str | None,
    max_frames: int,
    mode: str,
    weights: Path | None,
    preset: str,
) -> None:
    """Store emotion NAME from an example photo or clip (--from)."""
    try:
        avatar = AvatarStore().get(avatar_name) if avatar_name is not None else None
        renderer = example_renderer(mode, weights, preset)
        record = emotion_example(
            name.lower(),
            example,
            neutral=neutral,
            avatar=avatar,
            scope=avatar_name,
            renderer=renderer,
            locator=FaceLocator(detectors_for(weights)),
            mesh=True,  # classic mode's space whenever the example has 68-point landmarks (cheap)
            max_frames=max_frames,
        )
        path = MotionLibrary().put_emotion(record)
    except (ExampleError, LibraryError, AvatarError, PipelineError, CheckpointError, ConfigError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"stored {describe(record)}")
    click.echo(f"  {path}")


@emotion.command("list")
@click.option("--avatar", "avatar_name", default=None, help="What this avatar sees (its own over the global ones).")
def list_cmd(avatar_name: str | None) -> None:
    """List stored emotion examples."""
    try:
        library = MotionLibrary()
        found = library.emotions(avatar_name) if avatar_name else library.emotions(every_scope=True)
    except LibraryError as exc:
        raise click.ClickException(str(exc)) from exc
    if not found:
        click.echo("no emotions stored ('engine emotion add NAME --from IMAGE_OR_CLIP')")
    for record in found:
        click.echo(describe(record))


@emotion.command("remove")
@click.argument("name", type=click.Choice(EMOTIONS, case_sensitive=False))
@click.option("--avatar", "avatar_name", default=None, help="Remove this avatar's own example (default: the global).")
def remove(name: str, avatar_name: str | None) -> None:
    """Remove a stored emotion example."""
    try:
        removed = MotionLibrary().remove_emotion(name.lower(), avatar_name)
    except LibraryError as exc:
        raise click.ClickException(str(exc)) from exc
    scope = f"avatar {avatar_name}" if avatar_name else "every avatar"
    if not removed:
        raise click.ClickException(f"no stored example of {name.lower()!r} for {scope}")
    click.echo(f"removed emotion {name.lower()!r} for {scope}")
