"""Safe checkpoint reading, strict key checking and all-or-nothing writes of the engine's weight store.

Shared by every importer (LivePortrait, Ditto): a user's ``.pth`` is read with ``torch.load(weights_only=True)``
only (never plain unpickling), key mismatches are reported by name with the file they came from, and an
import writes into a temporary sibling directory that is renamed into place only when everything succeeded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STORE_FORMAT = 1
RECORD_NAME = "engine_weights.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, unsafe, or does not match the expected architecture."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def safe_torch_load(path: Path) -> Any:
    """Read a ``.pth`` with ``weights_only=True``; refuse anything that needs arbitrary unpickling."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused: this file needs arbitrary Python unpickling, which can run code. The engine only "
            f"reads plain tensor checkpoints (torch.load(weights_only=True)). Details: {str(exc).splitlines()[0]}"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({exc})") from exc


def as_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a state_dict (mapping of tensors), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: entries that are not tensors: {bad[:10]}")
    return dict(obj)


def check_keys(
    state: Mapping[str, torch.Tensor],
    expected: Sequence[tuple[str, Sequence[int]]],
    source: str,
) -> None:
    """Raise one error naming every missing, unexpected and mis-shaped key, and the file they came from."""
    want = {k: tuple(int(d) for d in s) for k, s in expected}
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    misshaped = sorted(
        f"{k}: expected {list(want[k])}, got {list(state[k].shape)}"
        for k in set(want) & set(state)
        if tuple(state[k].shape) != want[k]
    )
    if not (missing or unexpected or misshaped):
        return
    lines = [f"{source}: checkpoint does not match the expected architecture"]
    for title, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("mis-shaped keys", misshaped),
    ):
        if items:
            shown = items[:20]
            more = f" ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
            lines.append(f"  {title} ({len(items)}): " + ", ".join(shown) + more)
    raise CheckpointError("\n".join(lines))


@contextlib.contextmanager
def atomic_directory(dest: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``dest``; on success it replaces ``dest``, on failure it vanishes.

    A previous ``dest`` is kept until the new one is complete, so a failed re-import loses nothing.
    """
    dest = dest.expanduser().resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        backup = None
        if dest.exists():
            backup = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, backup)
        os.replace(tmp, dest)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_file(path: Path, write: Callable[[Path], object]) -> None:
    """Write ``path`` through ``write(tmp_path)`` and rename it over ``path``: readers see the old or the new file,
    never half of one; on failure the temporary file vanishes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"weight file not found: {path}")
    return load_file(str(path), device="cpu")


def write_record(directory: Path, record: Mapping[str, Any]) -> None:
    (directory / RECORD_NAME).write_text(json.dumps({"format": STORE_FORMAT, **record}, indent=2, sort_keys=True))


def read_record(directory: Path) -> dict[str, Any]:
    path = directory / RECORD_NAME
    if not path.is_file():
        raise CheckpointError(
            f"{directory} is not an engine weight store (no {RECORD_NAME}); create one with 'engine weights import'"
        )
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: corrupt record ({exc})") from exc
    if record.get("format") != STORE_FORMAT:
        raise CheckpointError(f"{path}: unsupported store format {record.get('format')!r} (expected {STORE_FORMAT})")
    return dict(record)
