"""Import Ditto's motion diffusion checkpoint (``lmdm_v0.4_hubert.pth``) into the engine's weight store.

The store holds ``lmdm.safetensors`` (the MotionDecoder state dict, keys exactly as Ditto's, checked against the
manifest that ships with :mod:`engine.motion.lmdm`), optionally Ditto's streaming HuBERT
(``hubert_streaming_fix_kv.onnx``, used by the audio feature stage) and ``engine_weights.json`` (kind ``ditto``).
The ``.pth`` is read with ``weights_only=True`` only; the store is written all-or-nothing.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import torch

from engine import __version__
from engine.motion.lmdm import (
    HUBERT_FILE,
    LMDM_WEIGHTS_NAME,
    STORE_KIND,
    manifest_entries,
    preset_config,
    read_ditto_record,
    read_lmdm_store,
    rotary_keys,
)
from engine.weights.checkpoint import (
    RECORD_NAME,
    CheckpointError,
    as_state_dict,
    atomic_directory,
    check_keys,
    safe_torch_load,
    save_tensors,
    sha256_file,
    write_record,
)

PRESET = "ditto"
LMDM_FILE = "lmdm_v0.4_hubert.pth"
STATE_KEY = "model_state_dict"
# where Ditto's release keeps the files, relative to the folder a user points at
LMDM_LOCATIONS = (LMDM_FILE, f"models/{LMDM_FILE}", f"ditto_pytorch/models/{LMDM_FILE}")
HUBERT_LOCATIONS = (
    HUBERT_FILE,
    f"ditto_onnx/{HUBERT_FILE}",
    f"aux_models/{HUBERT_FILE}",
    f"ditto_pytorch/aux_models/{HUBERT_FILE}",
)


def find_lmdm_checkpoint(src: Path) -> Path:
    """``src`` itself when it is a file, else the first of Ditto's known locations under it."""
    src = src.expanduser()
    if src.is_file():
        return src
    if not src.is_dir():
        raise CheckpointError(f"{src}: no such file or folder")
    for rel in LMDM_LOCATIONS:
        if (src / rel).is_file():
            return src / rel
    raise CheckpointError(f"{src}: no Ditto motion checkpoint found (looked for {', '.join(LMDM_LOCATIONS)})")


def find_hubert_onnx(src: Path, checkpoint: Path) -> Path | None:
    """Ditto's streaming HuBERT ONNX beside the checkpoint or in the release's usual folders, if present."""
    roots = [src.expanduser()] if src.is_dir() else []
    roots.append(checkpoint.parent)
    if checkpoint.parent.name == "models":
        # Ditto's release layout checkpoints/ditto_pytorch/models/*.pth: also search ditto_pytorch/ and checkpoints/
        roots += [checkpoint.parent.parent, checkpoint.parent.parent.parent]
    for root in roots:
        for rel in HUBERT_LOCATIONS:
            if (root / rel).is_file():
                return root / rel
    return None


def _check_rotary_aliases(state: dict[str, torch.Tensor], source: str) -> None:
    """Ditto stores one shared rotary buffer under 11 names; differing copies would load order-dependently."""
    keys = rotary_keys(list(state))
    differing = [k for k in keys if not torch.equal(state[k], state[keys[0]])]
    if differing:
        raise CheckpointError(f"{source}: rotary.freqs copies disagree with {keys[0]}: {differing}")


def read_lmdm_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The MotionDecoder state dict of a Ditto ``.pth``, strictly checked (clones: no shared storage)."""
    obj = safe_torch_load(path)
    if not isinstance(obj, dict) or STATE_KEY not in obj:
        found = sorted(map(str, obj))[:10] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f"{path}: expected Ditto's checkpoint layout, a dict with {STATE_KEY!r} (the MotionDecoder state dict); "
            f"found {found}"
        )
    state = as_state_dict(obj[STATE_KEY], f"{path}[{STATE_KEY!r}]")
    check_keys(state, manifest_entries(), str(path))
    bad_dtype = sorted(k for k, v in state.items() if not v.is_floating_point())
    if bad_dtype:
        raise CheckpointError(f"{path}: expected floating-point tensors, got integer ones for {bad_dtype[:10]}")
    _check_rotary_aliases(state, str(path))
    # the aliases share storage in the .pth; safetensors refuses shared tensors, so every entry gets its own copy
    return {k: v.detach().to(torch.float32).clone() for k, v in state.items()}


def _check_onnx(path: Path) -> None:
    import onnx

    try:
        # the graph structure only: a 1 GB model's weights need not be parsed to know the file is an ONNX model
        onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises protobuf DecodeError and others; all mean "not a usable model"
        raise CheckpointError(f"{path}: not a readable ONNX model ({exc})") from exc


def import_engine_store(src: Path, dst: Path) -> dict[str, Any]:
    """Copy an engine Ditto store (e.g. an ``engine train motion`` run folder) into ``dst``: its record and the
    files it lists, after checking the denoiser loads."""
    record = read_ditto_record(src)
    read_lmdm_store(src)  # keys and shapes checked against the record's config
    files = {k: str(v) for k, v in record.get("files", {}).items()}
    with atomic_directory(Path(dst)) as tmp:
        for name in files.values():
            if not (src / name).is_file():
                raise CheckpointError(f"{src}: the record lists {name}, which is missing")
            shutil.copyfile(src / name, tmp / name)
        write_record(tmp, {k: v for k, v in record.items() if k != "format"})
    return record


def import_ditto(src: Path, dst: Path) -> dict[str, Any]:
    """Import the LMDM checkpoint at ``src`` (the ``.pth`` or a folder holding it, or an engine Ditto store such as
    a training run) into the store ``dst``."""
    if Path(src).is_dir() and (Path(src) / RECORD_NAME).is_file():
        return import_engine_store(Path(src), Path(dst))
    checkpoint = find_lmdm_checkpoint(Path(src))
    state = read_lmdm_checkpoint(checkpoint)
    hubert = find_hubert_onnx(Path(src), checkpoint)
    if hubert is not None:
        _check_onnx(hubert)
    lmdm_sha256 = sha256_file(checkpoint)
    record: dict[str, Any] = {
        "kind": STORE_KIND,
        "preset": PRESET,
        "engine_version": __version__,
        "weights_id": f"ditto-{lmdm_sha256[:16]}",
        "sha256": lmdm_sha256,
        "config": dataclasses.asdict(preset_config(PRESET)),
        "files": {"lmdm": LMDM_WEIGHTS_NAME},
        "sources": {"lmdm": {"path": str(checkpoint.resolve()), "sha256": lmdm_sha256}},
        "num_parameters": sum(v.numel() for k, v in state.items() if not k.endswith("rotary.freqs")),
    }
    with atomic_directory(Path(dst)) as tmp:
        save_tensors(tmp / LMDM_WEIGHTS_NAME, state)
        if hubert is not None:
            shutil.copyfile(hubert, tmp / HUBERT_FILE)
            record["files"]["hubert_onnx"] = HUBERT_FILE
            record["sources"]["hubert_onnx"] = {"path": str(hubert.resolve()), "sha256": sha256_file(hubert)}
        write_record(tmp, record)
    return record


def describe(dst: Path) -> str:
    record = read_ditto_record(dst)
    c = record.get("config", {})
    files = record.get("files", {})
    sources = record.get("sources", {})
    lines = [
        f"Ditto motion diffusion store: {Path(dst)}   id: {record.get('weights_id')}",
        f"  LMDM denoiser (preset {record.get('preset')}): motion {c.get('motion_dim')}, cond {c.get('cond_dim')}, "
        f"{c.get('seq_len')} frames, width {c.get('width')}, {c.get('encoder_layers')}+{c.get('decoder_layers')} "
        f"layers, {record.get('num_parameters', 0) / 1e6:.1f}M parameters",
        f"    from {sources.get('lmdm', {}).get('path')} (sha256 {sources.get('lmdm', {}).get('sha256', '')[:16]}…)",
    ]
    if "hubert_onnx" in files:
        lines.append(f"  streaming HuBERT: {files['hubert_onnx']} (sha256 {sources['hubert_onnx']['sha256'][:16]}…)")
    else:
        lines.append(f"  streaming HuBERT: absent (put {HUBERT_FILE} beside the checkpoint to import it)")
    return "\n".join(lines)
