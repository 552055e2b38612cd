"""``engine export onnx`` and ``engine export tensorrt``."""

from __future__ import annotations

from pathlib import Path

import click

from export import tensorrt
from export.pipeline import ExportRequest, parse_batch, run_export


@click.group("export")
def export() -> None:
    """Export the runtime modules to ONNX and build TensorRT engines."""


@export.command("onnx")
@click.option(
    "--weights",
    "weights",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="LivePortrait store ('engine weights import liveportrait'); without it: untrained weights of --preset.",
)
@click.option(
    "--ditto",
    "ditto",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Ditto store for the motion denoiser; without it: untrained weights of the preset's denoiser.",
)
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output directory.")
@click.option("--preset", default=None, help="Renderer preset (default: the store's, else 'tiny').")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--batch", default="1", show_default=True, help="Batch size baked into the files, or 'dynamic'.")
@click.option("--flavour", type=click.Choice(["standard", "tensorrt"]), default="standard", show_default=True)
@click.option(
    "--module",
    "modules",
    multiple=True,
    help="Export only these modules (repeatable): appearance, motion, warping, decoder, warping_decoder, "
    "stitching, eye, lip, lmdm, lip_head, emotion_head, pose_head.",
)
def export_onnx(
    weights: Path | None,
    ditto: Path | None,
    out: Path,
    preset: str | None,
    dtype: str,
    batch: str,
    flavour: str,
    modules: tuple[str, ...],
) -> None:
    """One ONNX file per module plus index.json (inputs, outputs, shapes, opset, weights hashes)."""

    try:
        request = ExportRequest(
            weights=weights,
            ditto=ditto,
            preset=preset,
            dtype=dtype,  # type: ignore[arg-type]
            batch=parse_batch(batch),
            flavour=flavour,  # type: ignore[arg-type]
            modules=modules or None,
        )
        index = run_export(request, out, progress=True)
    except (ValueError, RuntimeError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"wrote {len(index['modules'])} ONNX files ({flavour}, {dtype}) and index.json to {out}")
    untrained = index["source"]["untrained"]
    if untrained:
        click.echo(f"warning: UNTRAINED weights (outputs are noise) for: {', '.join(untrained)}", err=True)


@export.command("tensorrt")
@click.option("--onnx", "onnx_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Engine directory.")
@click.option("--fp16", "precision", flag_value="fp16", help="Reduced-precision engine (grid sampling stays fp32).")
@click.option("--bf16", "precision", flag_value="bf16", help="bfloat16 engine (grid sampling stays fp32).")
@click.option(
    "--plugins",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="libavatar_engine_trt_plugins.so (default: $AVATAR_ENGINE_TRT_PLUGINS, else build/).",
)
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1))
@click.option("--module", "modules", multiple=True, help="Build only these modules (repeatable).")
def export_tensorrt(
    onnx_dir: Path, out: Path, precision: str | None, plugins: Path | None, max_batch: int, modules: tuple[str, ...]
) -> None:
    """TensorRT engines for an ONNX export (cached by GPU, TensorRT version and ONNX hash)."""

    try:
        config = tensorrt.BuildConfig(precision or "fp32", max_batch=max_batch)  # type: ignore[arg-type]
        manifest = tensorrt.build_engines(
            onnx_dir, out, config, plugin_library=plugins, modules=modules or None, progress=True
        )
    except (tensorrt.TensorRTUnavailable, tensorrt.EngineBuildError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    built = sum(not e["cached"] for e in manifest["engines"].values())
    click.echo(f"{len(manifest['engines'])} engines in {out} ({built} built, the rest cached) for {manifest['gpu']}")
