"""Import LivePortrait's official checkpoints into the engine's weight store, and describe a store.

Source layout (``pretrained_weights/`` or its ``liveportrait/`` subfolder)::

    base_models/{appearance_feature_extractor,motion_extractor,warping_module,spade_generator}.pth
    retargeting_models/stitching_retargeting_module.pth   # {retarget_shoulder, retarget_mouth, retarget_eye}

Every file is read with ``torch.load(weights_only=True)``, checked key by key against the shipped manifest,
spectral norm is folded into plain conv weights, and one safetensors file per network plus a JSON record are
written through :func:`atomic_directory` (nothing half-written on failure). Face detector / landmark ONNX
models found next to the checkpoints are copied into ``detectors/``.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from engine import __version__
from engine.models import liveportrait as lp
from engine.models.spade_decoder import fold_spectral_norm
from engine.weights.checkpoint import (
    CheckpointError,
    as_state_dict,
    atomic_directory,
    check_keys,
    read_record,
    safe_torch_load,
    save_tensors,
    sha256_file,
    write_record,
)

BASE_FILES: dict[str, tuple[str, str]] = {
    # engine network -> (file under the liveportrait folder, manifest entry)
    "appearance": ("base_models/appearance_feature_extractor.pth", "appearance_feature_extractor"),
    "motion": ("base_models/motion_extractor.pth", "motion_extractor"),
    "warping": ("base_models/warping_module.pth", "warping_module"),
    "decoder": ("base_models/spade_generator.pth", "spade_generator"),
}
RETARGET_FILE = "retargeting_models/stitching_retargeting_module.pth"
RETARGET_ENTRIES: dict[str, str] = {"stitching": "retarget_shoulder", "lip": "retarget_mouth", "eye": "retarget_eye"}
DETECTOR_FILES: tuple[str, ...] = ("det_10g.onnx", "2d106det.onnx", "landmark.onnx")


def _locate(src: Path) -> tuple[Path, Path]:
    """``(liveportrait folder holding base_models/, pretrained_weights root)`` for either accepted SRC."""
    src = src.expanduser().resolve()
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory (expected LivePortrait's pretrained_weights folder)")
    if (src / "base_models").is_dir():
        return src, (src.parent if src.name == "liveportrait" else src)
    if (src / "liveportrait" / "base_models").is_dir():
        return src / "liveportrait", src
    raise CheckpointError(
        f"{src}: no base_models/ folder here or under liveportrait/ (expected LivePortrait's pretrained_weights)"
    )


def _strip_module(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DDP wrappers leave 'module.' anywhere in the key, not only as a leading prefix
    return {k.replace("module.", ""): v for k, v in state.items()}


def _read_networks(lp_dir: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    manifest = lp.reference_manifest()
    states: dict[str, dict[str, torch.Tensor]] = {}
    hashes: dict[str, str] = {}
    for name, (rel, entry) in BASE_FILES.items():
        path = lp_dir / rel
        state = as_state_dict(safe_torch_load(path), str(path))
        check_keys(state, manifest[entry], str(path))
        states[name] = state
        hashes[rel] = sha256_file(path)
    path = lp_dir / RETARGET_FILE
    bundle = safe_torch_load(path)
    if not isinstance(bundle, Mapping):
        raise CheckpointError(f"{path}: expected a dict of retarget_* state_dicts, got {type(bundle).__name__}")
    for name, entry in RETARGET_ENTRIES.items():
        if entry not in bundle:
            raise CheckpointError(f"{path}: missing entry {entry!r} (has {sorted(map(str, bundle))})")
        source = f"{path} [{entry}]"
        state = _strip_module(as_state_dict(bundle[entry], source))
        check_keys(state, manifest[f"stitching_retargeting_module.{entry}"], source)
        states[name] = state
    hashes[RETARGET_FILE] = sha256_file(path)
    return states, hashes


def _to_engine(states: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """Checkpoint state dicts -> the engine modules' form (fp32, spectral norm folded), checked against them."""
    expected = lp.expected_entries(lp.PRESETS["liveportrait"])
    out = {}
    for name, state in states.items():
        converted = fold_spectral_norm(state) if name == "decoder" else dict(state)
        converted = {k: (v.float() if v.is_floating_point() else v) for k, v in converted.items()}
        check_keys(converted, expected[name], f"{name} (after conversion)")
        out[name] = converted
    return out


def _find_detectors(lp_dir: Path, root: Path) -> dict[str, Path]:
    places = [
        root,
        root / "insightface" / "models" / "buffalo_l",
        lp_dir.parent / "insightface" / "models" / "buffalo_l",
    ]
    found: dict[str, Path] = {}
    for fname in DETECTOR_FILES:
        for place in places:
            hits = sorted(place.rglob(fname)) if place.is_dir() else []
            if hits:
                found[fname] = hits[0]
                break
    return found


def _check_onnx(path: Path) -> None:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf and onnx raise several unrelated types for a bad file
        raise CheckpointError(f"{path}: not a valid ONNX model ({exc})") from exc
    if not model.graph.node:  # some junk bytes decode as an empty protobuf message
        raise CheckpointError(f"{path}: not a valid ONNX model (empty graph)")


def import_liveportrait(src: Path, dst: Path) -> dict[str, Any]:
    """Import the official checkpoints under ``src`` into the store ``dst``; returns the written record."""
    lp_dir, root = _locate(Path(src))
    detectors = _find_detectors(lp_dir, root)
    for path in detectors.values():  # cheap checks first: a bad file fails before the big reads
        _check_onnx(path)
    states, hashes = _read_networks(lp_dir)
    engine_states = _to_engine(states)
    digest = _combined_digest(hashes)
    record: dict[str, Any] = {
        "kind": lp.STORE_KIND,
        "preset": "liveportrait",
        "engine_version": __version__,
        "weights_id": f"liveportrait-{digest[:16]}",
        "source": str(lp_dir),
        "source_sha256": hashes,
        "networks": {
            name: {"file": f"{name}.safetensors", "parameters": int(sum(v.numel() for v in s.values()))}
            for name, s in engine_states.items()
        },
        "detectors": {fname: f"detectors/{fname}" for fname in detectors},
    }
    with atomic_directory(Path(dst)) as tmp:
        for name, state in engine_states.items():
            save_tensors(tmp / f"{name}.safetensors", state)
        if detectors:
            (tmp / "detectors").mkdir()
            for fname, path in detectors.items():
                shutil.copyfile(path, tmp / "detectors" / fname)
        write_record(tmp, record)
    return record


def _combined_digest(hashes: Mapping[str, str]) -> str:
    """One digest over ``{relative file: sha256}`` (order-independent): the weights' identity."""
    h = hashlib.sha256()
    for rel in sorted(hashes):
        h.update(f"{rel}={hashes[rel]}\n".encode())
    return h.hexdigest()


def describe(dst: Path) -> str:
    """Human-readable summary of a LivePortrait store."""
    record = read_record(Path(dst))
    if record.get("kind") != lp.STORE_KIND:
        raise CheckpointError(f"{dst}: store holds {record.get('kind')!r} weights, not {lp.STORE_KIND!r}")
    lines = [
        f"LivePortrait weights at {dst}",
        f"  preset: {record.get('preset')}   id: {record.get('weights_id')}   engine: {record.get('engine_version')}",
    ]
    for name, info in record.get("networks", {}).items():
        lines.append(f"  {name:<10} {info.get('parameters', 0) / 1e6:8.2f} M parameters  {info.get('file')}")
    detectors = record.get("detectors", {})
    lines.append("  detectors: " + (", ".join(sorted(detectors)) if detectors else "none"))
    return "\n".join(lines)
