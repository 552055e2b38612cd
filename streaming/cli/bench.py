"""``engine bench``: benchmarks written as JSON (+ PNG).

``engine bench --backend B --preset P`` (or ``engine bench backends ...``) times the runtime backends. Other
benchmarks are separate subcommands of this group: ``engine bench sync`` measures the lip-sync offset
(:mod:`streaming.measure.live`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from export.backends import BACKEND_NAMES, BackendError, available_backends
from streaming.measure.backends import DEFAULT_MODULES, BenchConfig, run_bench, write_report
from streaming.measure.info import write_result
from streaming.measure.syncbench import SYNC_MODES, run_sync_bench

DEFAULT_JSON = Path("benchmarks/results/backends_{device}.json")


def backend_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--backend",
            "backend_names",
            multiple=True,
            help=f"Backend(s) to time, repeatable (default: eager and onnxruntime on CPU, every usable one on "
            f"CUDA). One of {list(BACKEND_NAMES)}.",
        ),
        click.option("--preset", default="tiny", show_default=True, help="Renderer preset (random weights)."),
        click.option("--batch", default=1, show_default=True, type=click.IntRange(1)),
        click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N]."),
        click.option("--iters", default=20, show_default=True, type=click.IntRange(1)),
        click.option("--warmup", default=3, show_default=True, type=click.IntRange(0)),
        click.option("--threads", default=None, type=click.IntRange(1), help="CPU threads (default: torch's)."),
        click.option(
            "--module",
            "modules",
            multiple=True,
            help="Module(s) to time, repeatable (default: the renderer's, lmdm and lip_head).",
        ),
        click.option(
            "--out",
            "out",
            type=click.Path(dir_okay=False, path_type=Path),
            default=None,
            help="JSON path (default: benchmarks/results/backends_<cpu|cuda>.json).",
        ),
        click.option(
            "--plot",
            "plot",
            type=click.Path(dir_okay=False, path_type=Path),
            default=None,
            help="PNG path (default: the JSON path with .png).",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def run_backends_bench(
    backend_names: tuple[str, ...],
    preset: str,
    batch: int,
    device: str,
    iters: int,
    warmup: int,
    threads: int | None,
    modules: tuple[str, ...],
    out: Path | None,
    plot: Path | None,
) -> dict[str, Any]:
    import torch

    if not backend_names:
        usable = tuple(n for n, reason in available_backends(device).items() if reason is None)
        backend_names = ("eager", "onnxruntime") if device == "cpu" else usable
    try:
        config = BenchConfig(
            backends=backend_names,
            preset=preset,
            batch=batch,
            device=device,
            warmup=warmup,
            iters=iters,
            modules=modules or DEFAULT_MODULES,
            threads=threads or torch.get_num_threads(),
        )
        report = run_bench(config)
    except (BackendError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    json_path = out or Path(str(DEFAULT_JSON).format(device=device.split(":")[0]))
    plot_path = plot or json_path.with_suffix(".png")
    write_report(report, json_path, plot_path)
    for name, result in report["results"].items():
        fps = result["frames_per_s"]
        click.echo(f"{name}: " + (f"{fps:.1f} frames/s" if fps else "no warping_decoder timing"))
        for module, stats in result["modules"].items():
            if "error" in stats:
                click.echo(f"  {module:16s} error: {stats['error']}")
            else:
                click.echo(
                    f"  {module:16s} median {stats['median_ms']:8.2f} ms  p90 {stats['p90_ms']:8.2f}  "
                    f"p99 {stats['p99_ms']:8.2f}  peak {stats['peak_memory_mb']:.0f} MiB"
                )
    click.echo(f"wrote {json_path} and {plot_path}")
    return report


@click.group("bench", invoke_without_command=True)
@backend_options
@click.pass_context
def bench(ctx: click.Context, **options: Any) -> None:
    """Benchmarks. Without a subcommand: the backend benchmark (same options as 'engine bench backends')."""
    if ctx.invoked_subcommand is None:
        run_backends_bench(**options)


@bench.command("backends")
@backend_options
def backends(**options: Any) -> None:
    """Per-module latency (median, p90, p99), frames/s and peak memory per backend -> JSON + PNG."""
    run_backends_bench(**options)


# ---- further benchmarks (e.g. ``engine bench sync``) are added below as their own subcommands -----------------


@bench.command("sync")
@click.option(
    "--mode",
    type=click.Choice(["offline", "live", "browser", "all"]),
    default="all",
    show_default=True,
    help="offline: engine render -> mp4; live: engine serve --webrtc -> aiortc peer; browser: the page in "
    "headless Chromium.",
)
@click.option(
    "--seconds",
    type=click.FloatRange(4.0, 900.0),
    default=10.0,
    show_default=True,
    help="Signal length (browser: how long the page is recorded; from 60 s on, the first and last 20 s are also "
    "measured on their own: drift).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the burst signal.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Also write the JSON here.")
def sync(mode: str, seconds: float, seed: int, out: Path | None) -> None:
    """Lip-sync offset (ms, > 0: video late), jitter and correlation per mode, as JSON on stdout."""
    import json
    import tempfile

    modes = SYNC_MODES if mode == "all" else (mode,)
    with tempfile.TemporaryDirectory(prefix="engine-sync-") as tmp:
        report = run_sync_bench(modes, seconds, seed, Path(tmp))
    click.echo(json.dumps(report, indent=2))
    if out is not None:
        write_result(out, report)
        click.echo(f"wrote {out}", err=True)
