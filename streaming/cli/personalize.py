"""``engine personalize CLIP... --avatar NAME``: learn a person's lips, head motion and emotions from their clips.

EP-Talk's use case: one or a few short clips of the person (a minute of webcam video) -> their LADP, IMDP and (for
labelled clips) IEDP heads, in minutes on a CPU, stored with the avatar. ``engine render --motion personal`` and
``engine serve --motion personal`` then drive the avatar with them: classic mode from the landmark-mesh model,
neural mode from the LivePortrait-keypoint model (learned when LivePortrait weights are imported).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from engine.avatar.image import AvatarError
from engine.avatar.store import DEFAULT_NAME, AvatarStore
from engine.models import liveportrait
from engine.motion.personal_model import SPACES, PersonalModel, PersonalModelError
from engine.paths import default_weights_dir
from engine.train.extract import KeypointExtractor
from engine.train.personalize import (
    FitConfig,
    PersonalizeError,
    clips_for_space,
    extract_sources,
    fit_personal,
    with_space,
)
from engine.train.sources import ClipSource, SourceError, list_sources, normalise_emotion
from engine.weights.checkpoint import RECORD_NAME, CheckpointError


def _sources(clips: tuple[str, ...], emotion: str | None) -> list[ClipSource]:
    out: list[ClipSource] = []
    for spec in clips:
        out.extend(list_sources(spec))
    if emotion is not None:
        label = normalise_emotion(emotion)
        out = [dataclasses.replace(s, emotion=label, intensity=s.intensity or 1.0) for s in out]
    return out


@click.command()
@click.argument("clips", nargs=-1)
@click.option("--avatar", "avatar_name", required=True, help="The stored avatar to personalize (engine avatar add).")
@click.option(
    "--emotion",
    default=None,
    help="Label every clip with this emotion (else from MEAD/CREMA-D names "
    "or a CSV); unlabelled clips then count as neutral.",
)
@click.option(
    "--space",
    type=click.Choice(["auto", *SPACES]),
    default="auto",
    show_default=True,
    help="mesh: classic mode's landmark mesh (weight-free); keypoints: LivePortrait's (neural mode, needs its "
    "weights); auto: mesh, and keypoints too when LivePortrait weights are imported.",
)
@click.option(
    "--weights",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="LivePortrait weight store for the keypoints space (default: the engine home's).",
)
@click.option("--steps", type=click.IntRange(1, 100_000), default=800, show_default=True, help="Training steps.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--init",
    "init_run",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Start from heads trained on a dataset (an 'engine train heads' run folder).",
)
@click.option(
    "--from",
    "from_run",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="No clips: attach the heads of an 'engine train heads' run to the avatar as they are.",
)
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write a JSON report.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def personalize(
    clips: tuple[str, ...],
    avatar_name: str,
    emotion: str | None,
    space: str,
    weights: Path | None,
    steps: int,
    seed: int,
    init_run: Path | None,
    from_run: Path | None,
    report: Path | None,
    no_progress: bool,
) -> None:
    """Learn the person in CLIPS (videos, folders, globs or a CSV) and store it with the avatar NAME."""
    store = AvatarStore()
    try:
        if avatar_name == DEFAULT_NAME or avatar_name not in store:
            raise AvatarError(
                f"no stored avatar named {avatar_name!r}; add the person's photo with "
                f"'engine avatar add PHOTO --name {avatar_name}'"
            )
        if from_run is not None:
            if clips or init_run is not None:
                raise click.UsageError("--from attaches a trained model as it is: give no CLIP and no --init")
            _attach(store, avatar_name, from_run)
            return
        if not clips:
            raise click.UsageError("give at least one CLIP (or --from RUN)")
        sources = _sources(clips, emotion)
        spaces, keypoints = _spaces(space, weights)
        init = _init_models(init_run, spaces)
        with tqdm(total=len(sources), unit="clip", desc="extract", disable=no_progress) as bar:
            results = extract_sources(sources, spaces, keypoints, progress=bar.update)
        for r in results:
            if r.record is None:
                click.secho(f"skipped {r.source.path}: {r.reason}", fg="yellow", err=True)
        summary: dict[str, Any] = {
            "avatar": avatar_name,
            "skipped": [{"clip": str(r.source.path), "reason": r.reason} for r in results if r.record is None],
        }
        config = FitConfig(steps=steps, seed=seed)
        for sp in spaces:
            data = clips_for_space(results, sp, avatar_name)
            if not data:
                raise PersonalizeError("none of the clips could be used (see the reasons above)")
            with tqdm(total=steps, unit="step", desc=f"fit {sp}", disable=no_progress) as bar:
                model, fit = fit_personal(
                    data, with_space(config, sp), init.get(sp), progress=lambda step, loss: bar.update(50)
                )
            where = store.save_personal(avatar_name, sp, model.save)
            summary[sp] = {**fit.as_dict(), "stored": str(where)}
            gain = {k: round(fit.val_zero[k] / max(v, 1e-12), 1) for k, v in fit.val.items() if k in fit.val_zero}
            click.echo(
                f"{sp}: {fit.clips} clips, {fit.seconds:.1f} s, emotions {fit.emotions or 'none'}; held-out error "
                f"{', '.join(f'{k} {v:.4f} ({gain.get(k, 0)}x below no motion)' for k, v in fit.val.items())}"
            )
    except (AvatarError, SourceError, PersonalizeError, PersonalModelError, CheckpointError) as exc:
        raise click.ClickException(str(exc)) from exc
    if report is not None:
        report.write_text(json.dumps(summary, indent=1))
    click.echo(f"stored with avatar {avatar_name!r}: engine render --motion personal --avatar {avatar_name} ...")


def _spaces(space: str, weights: Path | None) -> tuple[list[str], KeypointExtractor | None]:
    store_dir = weights or default_weights_dir()
    imported = (store_dir / RECORD_NAME).is_file()
    if weights is not None and not imported:
        raise CheckpointError(f"{weights} is not an engine weight store (no {RECORD_NAME})")
    if space == "keypoints" and not imported:
        raise CheckpointError("the keypoints space needs LivePortrait weights: engine weights import liveportrait SRC")
    spaces = ["mesh"] if space == "mesh" else ["keypoints"] if space == "keypoints" else ["mesh"]
    if space == "auto" and imported:
        spaces.append("keypoints")
    keypoints = KeypointExtractor(liveportrait.load(store_dir)) if "keypoints" in spaces else None
    return spaces, keypoints


def _init_models(run: Path | None, spaces: list[str]) -> dict[str, PersonalModel]:
    if run is None:
        return {}
    models = {}
    for sp in spaces:
        for folder in (run / sp, run):
            if (folder / "personal.json").is_file():
                model = PersonalModel.load(folder)
                if model.config.space == sp:
                    models[sp] = model
                    break
    if not models:
        raise PersonalModelError(f"{run}: no trained heads for the {' or '.join(spaces)} space")
    return models


def _attach(store: AvatarStore, name: str, run: Path) -> None:
    attached = []
    for folder in sorted({run, *(p for p in run.iterdir() if p.is_dir())}):
        if not (folder / "personal.json").is_file():
            continue
        model = PersonalModel.load(folder)
        store.save_personal(name, model.config.space, model.save)
        attached.append(model.config.space)
    if not attached:
        raise PersonalModelError(f"{run}: no trained heads (personal.json) to attach")
    click.echo(f"attached the {', '.join(attached)} heads of {run} to avatar {name!r}")
