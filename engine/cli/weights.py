"""``engine weights``: import a user's checkpoints into the engine's store, and describe a store."""

from __future__ import annotations

from pathlib import Path

import click

from engine.paths import default_ditto_dir, default_weights_dir
from engine.weights.checkpoint import CheckpointError


@click.group()
def weights() -> None:
    """Import and inspect checkpoints. Nothing is downloaded: bring the files you already have."""


@weights.group("import")
def import_group() -> None:
    """Import checkpoints (safe loading only; nothing is half-written on failure)."""


@import_group.command("liveportrait")
@click.argument("src", type=click.Path(path_type=Path))
@click.option(
    "--out",
    "dst",
    type=click.Path(path_type=Path),
    default=None,
    help="Destination store (default: the engine home's weights/liveportrait).",
)
def import_liveportrait_cmd(src: Path, dst: Path | None) -> None:
    """Import LivePortrait's pretrained_weights (folder holding base_models/ and retargeting_models/)."""
    from engine.weights.liveportrait import describe, import_liveportrait

    dst = dst or default_weights_dir()
    try:
        import_liveportrait(src, dst)
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"imported LivePortrait weights into {dst}")
    click.echo(describe(dst))


@import_group.command("ditto")
@click.argument("src", type=click.Path(path_type=Path))
@click.option(
    "--out",
    "dst",
    type=click.Path(path_type=Path),
    default=None,
    help="Destination store (default: the engine home's weights/ditto).",
)
def import_ditto_cmd(src: Path, dst: Path | None) -> None:
    """Import Ditto's motion diffusion checkpoint (lmdm_v0.4_hubert.pth, or the folder holding it)."""
    from engine.weights.ditto import describe, import_ditto

    dst = dst or default_ditto_dir()
    try:
        import_ditto(src, dst)
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"imported Ditto motion weights into {dst}")
    click.echo(describe(dst))


@weights.command("info")
@click.argument("dst", type=click.Path(path_type=Path), required=False)
def info(dst: Path | None) -> None:
    """Describe an engine weight store (default: the LivePortrait store in the engine home)."""
    from engine.weights.checkpoint import read_record

    dst = dst or default_weights_dir()
    try:
        kind = read_record(dst).get("kind")
        if kind == "ditto":
            from engine.weights.ditto import describe
        else:
            from engine.weights.liveportrait import describe
        click.echo(describe(dst))
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from exc
