"""``engine avatar``: prepare a portrait once (crop, landmarks, F/M features) and manage the avatar store."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import click

from engine.avatar.face import FaceLocator, parse_crop
from engine.avatar.image import AvatarError
from engine.avatar.prepare import MissingLandmarksError, prepare_avatar
from engine.avatar.store import DEFAULT_NAME, AvatarStore, validate_name
from engine.config import ConfigError
from engine.motion.examples import REFERENCE_SECONDS, ExampleError, describe, reference_clip
from engine.motion.library import LibraryError, MotionLibrary
from engine.paths import default_ditto_dir, default_weights_dir
from engine.weights.checkpoint import RECORD_NAME, CheckpointError
from streaming.cli.emotion import detectors_for, example_renderer, weights_options
from streaming.pipelines import PipelineError, neural_renderer

logger = logging.getLogger(__name__)


@click.group()
def avatar() -> None:
    """Prepare, list and remove avatars (stored in the engine home, keyed by the photo's content hash)."""


@avatar.command("add")
@click.argument("image", type=click.Path(path_type=Path))
@click.option("--name", required=True, help="Name to refer to the avatar by (letters, digits, '.', '_', '-').")
@click.option(
    "--weights",
    "weights_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="LivePortrait weight store (default: the engine home's, if imported). Its detectors/ are used too.",
)
@click.option("--crop", "crop_text", default=None, help="Face region x,y,w,h in pixels instead of detection.")
@click.option(
    "--landmarks",
    "landmarks_file",
    type=click.Path(path_type=Path),
    default=None,
    help="Your landmarks for this photo (.npy or .json, [N, 2] photo pixels).",
)
@click.option("--replace", is_flag=True, help="Replace an existing avatar of the same name.")
def add(
    image: Path,
    name: str,
    weights_dir: Path | None,
    crop_text: str | None,
    landmarks_file: Path | None,
    replace: bool,
) -> None:
    """Prepare IMAGE (face crop, landmarks, appearance/motion features) and store it as NAME."""

    try:
        validate_name(name)
        if name == DEFAULT_NAME:
            raise AvatarError(f"the name {DEFAULT_NAME!r} is reserved for the engine's built-in portrait")
        crop = parse_crop(crop_text) if crop_text is not None else None
        store_dir = weights_dir or default_weights_dir()
        imported = (store_dir / RECORD_NAME).is_file()
        if weights_dir is not None and not imported:  # a typo must not silently fall back to no features
            raise AvatarError(f"{weights_dir} is not an engine weight store (no {RECORD_NAME}); import weights first")
        # without LivePortrait and Ditto weights the engine runs classic mode (auto), which needs 68 landmarks:
        # checked here, before anything else, so a photo that cannot drive it is refused with one line
        classic = not (imported and (default_ditto_dir() / RECORD_NAME).is_file())
        prepared = prepare_avatar(
            image,
            name,
            crop=crop,
            landmarks_file=landmarks_file,
            detectors_dir=store_dir / "detectors",
            require_classic=classic,
        )
        weights_id = None
        if imported:
            # the neural features are computed once here and cached; untrained weights are never cached
            renderer = neural_renderer(str(store_dir))
            weights_id = renderer.nets.weights_id
            prepared = dataclasses.replace(prepared, features={weights_id: renderer.compute_features(prepared)})
        stored = AvatarStore().add(prepared, overwrite=replace)
    except MissingLandmarksError as exc:
        raise click.ClickException(
            f"{exc}; classic mode (used while LivePortrait and Ditto weights are not both imported) needs 68 of "
            "them: pass --landmarks FILE (68 [x, y] photo pixels, iBUG order), or import weights first"
        ) from exc
    except (AvatarError, CheckpointError, PipelineError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    features = f"features for {weights_id}" if weights_id else "no neural features (no LivePortrait weights)"
    click.echo(f"added avatar {stored.name!r} ({stored.content_hash[:12]}); {features}")
    if stored.landmarks is None:
        click.echo("no landmarks (no landmark model imported and no --landmarks file)")
    else:
        method = stored.landmark_method or "unknown"
        click.echo(f"landmarks: {len(stored.landmarks)} points, {stored.landmark_scheme} ({method})")


@avatar.command("list")
def list_cmd() -> None:
    """List stored avatars."""

    try:
        infos = AvatarStore().list()
    except AvatarError as exc:
        raise click.ClickException(str(exc)) from exc
    if not infos:
        click.echo("no avatars stored ('engine avatar add IMAGE --name NAME'; 'default' is always available)")
        return
    for info in infos:
        w, h = info.meta.get("image_size", ["?", "?"])
        weights = ", ".join(info.weights_ids) or "none"
        scheme = info.meta.get("landmark_scheme") or "none"
        click.echo(f"{info.name}\t{info.content_hash[:12]}\t{w}x{h}\tlandmarks: {scheme}\tfeatures: {weights}")


@avatar.command("remove")
@click.argument("name")
def remove(name: str) -> None:
    """Remove the avatar NAME (the photo's entry goes when no other name refers to it)."""

    try:
        AvatarStore().remove(name)
    except AvatarError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"removed avatar {name!r}")


@avatar.command("show")
@click.argument("name")
def show(name: str) -> None:
    """Print the stored metadata of NAME as JSON ('default' is created on first use)."""

    store = AvatarStore()
    try:
        if name == DEFAULT_NAME:
            store.get(name)
        info = store.info(name)
    except AvatarError as exc:
        raise click.ClickException(str(exc)) from exc
    meta = {k: v for k, v in info.meta.items() if k != "landmarks"}
    landmarks = info.meta.get("landmarks")
    meta["landmark_count"] = 0 if landmarks is None else len(landmarks)
    meta["weights_ids"] = list(info.weights_ids)
    click.echo(json.dumps({"name": info.name, **meta}, indent=2, sort_keys=True))


@avatar.command("reference")
@click.argument("name")
@click.option("--clip", type=click.Path(path_type=Path), default=None, help="A video of a face moving and talking.")
@click.option("--fps", type=click.IntRange(1, 120), default=25, show_default=True, help="Trajectory rate.")
@click.option(
    "--max-seconds",
    type=click.FloatRange(0.2, 600.0),
    default=REFERENCE_SECONDS,
    show_default=True,
    help="Read at most this much of the clip (sessions loop the trajectory forth and back).",
)
@click.option("--remove", "remove_", is_flag=True, help="Remove NAME's stored reference clip instead.")
@weights_options
def reference(
    name: str,
    clip: Path | None,
    fps: int,
    max_seconds: float,
    remove_: bool,
    mode: str,
    weights: Path | None,
    preset: str,
) -> None:
    """Store a reference clip for avatar NAME: its head-pose trajectory and statistics (head_pose: reference) and
    its typical expression (emotion_source: reference)."""
    try:
        if remove_:
            if not MotionLibrary().remove_reference(name):
                raise click.ClickException(f"avatar {name!r} has no stored reference clip")
            click.echo(f"removed the reference clip of avatar {name!r}")
            return
        if clip is None:
            raise click.UsageError("give the clip: --clip VIDEO (or --remove)")
        record = reference_clip(
            AvatarStore().get(name),
            clip,
            renderer=example_renderer(mode, weights, preset),
            locator=FaceLocator(detectors_for(weights)),
            fps=float(fps),
            max_seconds=max_seconds,
        )
        path = MotionLibrary().put_reference(record)
    except (ExampleError, LibraryError, AvatarError, PipelineError, CheckpointError, ConfigError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"stored {describe(record)}")
    click.echo(f"  {path}")
