"""``engine weights``: import a user's checkpoints into the engine's store, and describe a store."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from engine.importers.ditto import describe as describe_ditto
from engine.importers.ditto import import_ditto
from engine.importers.liveportrait import describe as describe_liveportrait
from engine.importers.liveportrait import import_liveportrait
from engine.paths import default_ditto_dir, default_weights_dir
from engine.weights.checkpoint import CheckpointError, read_record


@click.group()
def weights() -> None:
    """Import and inspect checkpoints. Nothing is downloaded: bring the files you already have."""


@weights.group("import")
def import_group() -> None:
    """Import checkpoints (safe loading only; nothing is half-written on failure)."""


def _out_option(store: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "--out",
        "dst",
        type=click.Path(path_type=Path),
        default=None,
        help=f"Destination store (default: the engine home's weights/{store}).",
    )


def _import_into_store(
    import_fn: Callable[[Path, Path], object], describe: Callable[[Path], str], src: Path, dst: Path, what: str
) -> None:
    """Runs one importer, turning its checkpoint errors into CLI errors, then describes the new store."""
    try:
        import_fn(src, dst)
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"imported {what} into {dst}")
    click.echo(describe(dst))


@import_group.command("liveportrait")
@click.argument("src", type=click.Path(path_type=Path))
@_out_option("liveportrait")
def import_liveportrait_cmd(src: Path, dst: Path | None) -> None:
    """Import LivePortrait's pretrained_weights (folder holding base_models/ and retargeting_models/)."""

    _import_into_store(
        import_liveportrait, describe_liveportrait, src, dst or default_weights_dir(), "LivePortrait weights"
    )


@import_group.command("ditto")
@click.argument("src", type=click.Path(path_type=Path))
@_out_option("ditto")
def import_ditto_cmd(src: Path, dst: Path | None) -> None:
    """Import Ditto's motion diffusion checkpoint (lmdm_v0.4_hubert.pth, or the folder holding it)."""

    _import_into_store(import_ditto, describe_ditto, src, dst or default_ditto_dir(), "Ditto motion weights")


@weights.command("info")
@click.argument("dst", type=click.Path(path_type=Path), required=False)
def info(dst: Path | None) -> None:
    """Describe an engine weight store (default: the LivePortrait store in the engine home)."""

    dst = dst or default_weights_dir()
    try:
        kind = read_record(dst).get("kind")
        click.echo(describe_ditto(dst) if kind == "ditto" else describe_liveportrait(dst))
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from exc
