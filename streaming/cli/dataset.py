"""``engine dataset``: talking-face videos -> a resumable training dataset (per-frame motion + audio features)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import click
from tqdm import tqdm

from engine.paths import default_weights_dir
from engine.train.dataset import BuildConfig, build_dataset, default_workers
from engine.train.extract import SPACES, ExtractConfig
from engine.train.shards import Dataset, DatasetError
from engine.train.sources import SourceError, list_sources
from engine.weights.checkpoint import RECORD_NAME


@click.group()
def dataset() -> None:
    """Build and inspect datasets (nothing is downloaded: bring your videos, e.g. MEAD, CREMA-D, webcam clips)."""


@dataset.command("build")
@click.argument("videos")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Dataset folder.")
@click.option(
    "--space",
    type=click.Choice(["auto", "both", *SPACES]),
    default="auto",
    show_default=True,
    help="Per-frame motion to extract: mesh (classic mode's landmark mesh, weight-free), keypoints (LivePortrait's "
    "motion extractor), both; auto: both when LivePortrait weights are imported, else mesh.",
)
@click.option(
    "--weights",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="LivePortrait weight store for the keypoints space (default: the engine home's).",
)
@click.option(
    "--hubert",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Ditto's hubert_streaming_fix_kv.onnx: store HuBERT features next to the log-mel ones.",
)
@click.option("--workers", type=click.IntRange(1, 256), default=None, help="Worker processes (default: cores - 1).")
@click.option(
    "--val-fraction",
    type=click.FloatRange(0.0, 0.9),
    default=0.1,
    show_default=True,
    help="Share of the speakers (or of the clips, without speakers) held out for validation.",
)
@click.option("--shard-clips", type=click.IntRange(1, 100_000), default=64, show_default=True)
@click.option("--retry-skipped", is_flag=True, help="Try again the videos a previous build skipped.")
@click.option("--no-progress", is_flag=True)
def build(
    videos: str,
    out: Path,
    space: str,
    weights: Path | None,
    hubert: Path | None,
    workers: int | None,
    val_fraction: float,
    shard_clips: int,
    retry_skipped: bool,
    no_progress: bool,
) -> None:
    """Extract VIDEOS (a folder, a glob, a CSV with labels, or one file) into the dataset --out.

    Resumes when --out already holds a dataset built with the same settings. A video that cannot be used is
    skipped and listed in the report, never fatal."""
    store = weights or default_weights_dir()
    imported = (store / RECORD_NAME).is_file()
    if weights is not None and not imported:
        raise click.ClickException(f"{weights} is not an engine weight store (no {RECORD_NAME})")
    spaces = {"auto": ("mesh", "keypoints") if imported else ("mesh",), "both": ("mesh", "keypoints")}.get(
        space, (space,)
    )
    if "keypoints" in spaces and not imported:
        raise click.ClickException("the keypoints space needs LivePortrait weights: engine weights import liveportrait")
    if hubert is not None and not hubert.is_file():
        raise click.ClickException(f"{hubert}: HuBERT ONNX model not found")
    try:
        sources = list_sources(videos)
        config = BuildConfig(
            extract=ExtractConfig(spaces=tuple(spaces)),
            workers=workers or default_workers(),
            shard_clips=shard_clips,
            liveportrait=str(store) if "keypoints" in spaces else None,
            hubert=str(hubert) if hubert is not None else None,
            val_fraction=val_fraction,
            retry_skipped=retry_skipped,
        )
        with tqdm(total=len(sources), unit="video", desc="dataset", disable=no_progress) as bar:
            report = build_dataset(sources, out, config, progress=bar.update)
    except (SourceError, DatasetError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(
        f"{out}: {report.kept} clips ({report.new} new, {report.hours * 60:.1f} min), {len(report.skipped)} skipped; "
        f"emotions {report.emotions}"
    )
    for s in report.skipped:
        click.secho(f"  skipped {s['source']}: {s['reason']}", fg="yellow")
    click.echo(f"report: {out / 'report.json'}")


@dataset.command("info")
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def info(root: Path, as_json: bool) -> None:
    """Summarise a dataset: clips per split, emotion and space, hours, skipped videos."""
    try:
        ds = Dataset(root)
    except DatasetError as exc:
        raise click.ClickException(str(exc)) from exc
    summary = {
        "clips": len(ds),
        "splits": dict(Counter(c.split for c in ds.clips)),
        "emotions": dict(Counter(c.emotion or "unlabelled" for c in ds.clips)),
        "speakers": len({c.speaker for c in ds.clips if c.speaker}),
        "hours": round(sum(c.frames for c in ds.clips) / 25 / 3600, 4),
        "spaces": ds.settings.get("spaces"),
        "skipped": len(ds.index.get("skipped", [])),
    }
    click.echo(json.dumps(summary, indent=1) if as_json else "\n".join(f"{k}: {v}" for k, v in summary.items()))
