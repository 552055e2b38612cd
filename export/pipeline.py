"""What ``engine export onnx`` does: resolve weights and preset, build the graphs, export, write the index."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.models import liveportrait
from engine.motion import lmdm
from engine.weights.checkpoint import CheckpointError, read_record
from export.graphs import (
    ALL_GRAPHS,
    DENOISER_GRAPHS,
    HEAD_GRAPHS,
    RENDERER_GRAPHS,
    Flavour,
    Graph,
    HeadDims,
    build_heads,
    denoiser_graph,
    head_graphs,
    renderer_graphs,
)
from export.onnx_export import ExportDtype, export_graphs

logger = logging.getLogger(__name__)

# the denoiser preset that goes with a renderer preset when no Ditto store is given
LMDM_PRESET = {"tiny": "tiny", "liveportrait": "ditto"}


def parse_batch(text: str) -> int | None:
    """``"dynamic"`` -> None, else a positive int."""
    if text.strip().lower() == "dynamic":
        return None
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"--batch must be a positive integer or 'dynamic', got {text!r}") from None
    if value < 1:
        raise ValueError(f"--batch must be >= 1, got {value}")
    return value


@dataclass(frozen=True)
class ExportRequest:
    weights: Path | None = None  # LivePortrait store
    ditto: Path | None = None  # Ditto store
    preset: str | None = None
    dtype: ExportDtype = "fp32"
    batch: int | None = 1
    flavour: Flavour = "standard"
    modules: Sequence[str] | None = None
    heads: HeadDims = field(default_factory=HeadDims)


def resolve_preset(weights: Path | None, preset: str | None) -> str:
    if weights is None:
        return preset or "tiny"
    stored = str(read_record(weights).get("preset", "liveportrait"))
    if preset is not None and preset != stored:
        raise ValueError(f"--preset {preset!r} contradicts the store {weights}, which holds preset {stored!r}")
    return stored


def build_graphs(request: ExportRequest) -> tuple[dict[str, Graph], dict[str, Any]]:
    """The requested graphs and the index's ``source`` section (what weights they hold)."""
    names = list(request.modules) if request.modules else list(ALL_GRAPHS)
    unknown = [n for n in names if n not in ALL_GRAPHS]
    if unknown:
        raise ValueError(f"unknown module(s) {unknown}; choose from {list(ALL_GRAPHS)}")
    preset = resolve_preset(request.weights, request.preset)
    untrained: list[str] = []  # components running on deterministic random weights (noise)
    source: dict[str, Any] = {"preset": preset, "untrained": untrained}
    graphs: dict[str, Graph] = {}
    renderer = [n for n in names if n in RENDERER_GRAPHS]
    if renderer:
        nets = liveportrait.load(request.weights) if request.weights else liveportrait.build(preset)
        graphs.update(renderer_graphs(nets, request.flavour, names=renderer))
        source["liveportrait"] = {
            "store": str(request.weights) if request.weights else None,
            "id": nets.weights_id,
            "source_sha256": _store_hashes(request.weights),
        }
        if nets.untrained:
            untrained.append("liveportrait")
    if any(n in DENOISER_GRAPHS for n in names):
        den = lmdm.load(request.ditto) if request.ditto else lmdm.build(LMDM_PRESET.get(preset, "tiny"))
        graphs["lmdm"] = denoiser_graph(den)
        source["lmdm"] = {
            "store": str(request.ditto) if request.ditto else None,
            "config": vars(den.config),
            "source_sha256": _store_hashes(request.ditto),
        }
        if den.untrained:
            untrained.append("lmdm")
    heads = [n for n in names if n in HEAD_GRAPHS]
    if heads:
        # no trained weights exist for the displacement heads: always the deterministic init
        built = head_graphs({k: v for k, v in build_heads(request.heads).items() if k in heads}, request.heads.window)
        graphs.update(built)
        source["heads"] = {"dims": vars(request.heads)}
        untrained.append("heads")
    return {n: graphs[n] for n in names}, source


def _store_hashes(store: Path | None) -> dict[str, str] | None:
    """The checkpoint hashes an imported store recorded (``engine weights import``), if any."""
    if store is None:
        return None
    try:
        hashes = read_record(store).get("source_sha256")
    except (OSError, ValueError, CheckpointError):
        return None
    return dict(hashes) if isinstance(hashes, dict) else None


def run_export(request: ExportRequest, out_dir: Path, *, progress: bool = False) -> dict[str, Any]:
    graphs, source = build_graphs(request)
    if source["untrained"]:
        logger.warning("exporting untrained weights for %s: their outputs are noise", ", ".join(source["untrained"]))
    return export_graphs(
        graphs,
        Path(out_dir),
        flavour=request.flavour,
        dtype=request.dtype,
        batch=request.batch,
        source=source,
        progress=progress,
    )
