"""``engine avatar``: prepare a portrait once (crop, landmarks, F/M features) and manage the avatar store."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import click

from engine.avatar.image import AvatarError

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
@click.option(
    "--preset",
    type=click.Choice(["tiny", "liveportrait"]),
    default="tiny",
    show_default=True,
    help="Renderer preset built with untrained weights when no store is imported.",
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
    preset: str,
    crop_text: str | None,
    landmarks_file: Path | None,
    replace: bool,
) -> None:
    """Prepare IMAGE (face crop, landmarks, appearance/motion features) and store it as NAME."""
    from engine.avatar.face import parse_crop
    from engine.avatar.prepare import MissingLandmarksError, compute_features, prepare_avatar
    from engine.avatar.store import DEFAULT_NAME, AvatarStore, validate_name
    from engine.models import liveportrait
    from engine.paths import default_weights_dir
    from engine.weights import warn_untrained
    from engine.weights.checkpoint import RECORD_NAME, CheckpointError

    try:
        validate_name(name)
        if name == DEFAULT_NAME:
            raise AvatarError(f"the name {DEFAULT_NAME!r} is reserved for the engine's built-in portrait")
        crop = parse_crop(crop_text) if crop_text is not None else None
        # an explicit --weights must hold a store (a typo should not silently fall back to random weights)
        nets = liveportrait.load(weights_dir) if weights_dir is not None else None
        detectors = (weights_dir or default_weights_dir()) / "detectors"
        # without imported weights rendering runs in classic mode, which needs 68 landmarks: check them before
        # building (and warning about) untrained networks, so a refused photo gets one error line
        classic = nets is None and not (default_weights_dir() / RECORD_NAME).is_file()
        prepared = prepare_avatar(
            image, name, crop=crop, landmarks_file=landmarks_file, detectors_dir=detectors, require_classic=classic
        )
        if nets is None:
            nets = liveportrait.load_or_build(None, preset)
        if nets.untrained:
            message = warn_untrained(logger, "avatar features")
            click.secho(f"WARNING: {message}", fg="red", bold=True, err=True)
        prepared = dataclasses.replace(prepared, features={nets.weights_id: compute_features(nets, prepared.crop)})
        stored = AvatarStore().add(prepared, overwrite=replace)
    except MissingLandmarksError as exc:
        raise click.ClickException(
            f"{exc}; classic mode (the mode while no LivePortrait weights are imported) needs 68 of them: pass "
            "--landmarks FILE (68 [x, y] photo pixels, iBUG order), or --weights DIR with imported weights"
        ) from exc
    except (AvatarError, CheckpointError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"added avatar {stored.name!r} ({stored.content_hash[:12]}); features for {nets.weights_id}")
    if stored.landmarks is None:
        click.echo("no landmarks (no landmark model imported and no --landmarks file)")
    else:
        method = stored.landmark_method or "unknown"
        click.echo(f"landmarks: {len(stored.landmarks)} points, {stored.landmark_scheme} ({method})")


@avatar.command("list")
def list_cmd() -> None:
    """List stored avatars."""
    from engine.avatar.store import AvatarStore

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
    from engine.avatar.store import AvatarStore

    try:
        AvatarStore().remove(name)
    except AvatarError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"removed avatar {name!r}")


@avatar.command("show")
@click.argument("name")
def show(name: str) -> None:
    """Print the stored metadata of NAME as JSON ('default' is created on first use)."""
    from engine.avatar.store import DEFAULT_NAME, AvatarStore

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
