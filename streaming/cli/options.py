"""The runtime options ``engine render`` and ``engine serve`` share, with choices read from the registries."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import click

from export.backends import BACKEND_NAMES, BackendConfig
from export.backends.config import DTYPE_CHOICES
from streaming.batching import BatchConfig
from streaming.pipelines import MOTION_BATCHING, MOTIONS, RENDERERS, RuntimeConfig
from streaming.session import SessionConfig


def runtime_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--mode --motion --weights --motion-weights --preset --backend --backend-dir --device --dtype
    --motion-batching``."""
    options = [
        click.option(
            "--mode",
            type=click.Choice(["auto", *RENDERERS]),
            default="auto",
            show_default=True,
            help="Renderer: "
            + "; ".join(f"{n}: {e.summary}" for n, e in RENDERERS.items())
            + ". auto: neural when LivePortrait and Ditto weights are imported, else classic.",
        ),
        click.option(
            "--motion",
            type=click.Choice(["auto", *MOTIONS]),
            default="auto",
            show_default=True,
            help="Motion generator: "
            + "; ".join(f"{n}: {e.summary}" for n, e in MOTIONS.items())
            + ". auto: the one that drives the chosen renderer.",
        ),
        click.option(
            "--weights",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="LivePortrait weight store (default: the engine home's).",
        ),
        click.option(
            "--motion-weights",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Ditto weight store (default: the engine home's).",
        ),
        click.option(
            "--preset",
            type=click.Choice(["tiny", "liveportrait"]),
            default="tiny",
            show_default=True,
            help="Renderer preset built with untrained weights when no LivePortrait store is imported.",
        ),
        click.option(
            "--backend",
            type=click.Choice(list(BACKEND_NAMES)),
            default="eager",
            show_default=True,
            help="What runs the neural networks (the classic renderer runs none: eager only).",
        ),
        click.option(
            "--backend-dir",
            type=click.Path(exists=True, file_okay=False, path_type=Path),
            default=None,
            help="Serve exported files: an 'engine export onnx' directory (onnxruntime) or an 'engine export "
            "tensorrt' one (tensorrt).",
        ),
        click.option(
            "--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda or cuda:N."
        ),
        click.option(
            "--dtype",
            type=click.Choice(list(DTYPE_CHOICES)),
            default="auto",
            show_default=True,
            help="Network precision (auto: bf16 on GPUs that support it, fp32 on CPU).",
        ),
        click.option(
            "--motion-batching",
            type=click.Choice(list(MOTION_BATCHING)),
            default="auto",
            show_default=True,
            help="Run the diffusion steps of sessions that are due together as one denoiser call (ditto motion). "
            "auto: on a GPU, where a small call is mostly launch overhead; off on a CPU, where it only adds waiting.",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def runtime_config(
    options: dict[str, Any], session: SessionConfig | None = None, batch: BatchConfig | None = None
) -> RuntimeConfig:
    """The :class:`RuntimeConfig` of :func:`runtime_options`' values (``click.BadParameter`` when invalid)."""
    backend_options = {"dir": str(options["backend_dir"])} if options.get("backend_dir") is not None else {}
    if backend_options and options["backend"] not in ("onnxruntime", "tensorrt"):
        raise click.BadParameter(
            "exported files are served by the onnxruntime or tensorrt backend", param_hint="--backend-dir"
        )
    try:
        return RuntimeConfig(
            mode=options["mode"],
            motion=options["motion"],
            weights=str(options["weights"]) if options.get("weights") is not None else None,
            motion_weights=str(options["motion_weights"]) if options.get("motion_weights") is not None else None,
            preset=options["preset"],
            backend=BackendConfig(options["backend"], options["device"], options["dtype"], backend_options),
            session=session or SessionConfig(),
            batch=batch or BatchConfig(),
            motion_batching=options.get("motion_batching", "auto"),
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


RUNTIME_OPTION_NAMES = (
    "mode",
    "motion",
    "weights",
    "motion_weights",
    "preset",
    "backend",
    "backend_dir",
    "device",
    "dtype",
    "motion_batching",
)


def parse_controls(items: Iterable[str]) -> dict[str, Any]:
    """``["lip_scale=1.4", "blink=false", "emotion=happy"]`` -> ``{"lip_scale": 1.4, "blink": False, ...}``: each
    value is read as JSON when it is JSON (numbers, true/false, null), else as a string."""
    controls: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--control")
        try:
            value: Any = json.loads(text)
        except ValueError:
            value = text
        controls[key.strip()] = value
    return controls
