"""A dataset on disk: safetensors shards of clip arrays and one JSON index, written so a build can resume.

Layout of ``DS/``::

    index.json                  format, extractor settings, every clip (labels, frames, split, shard), every
                                skipped video with the reason, the shard list
    shards/shard-00000.safetensors   arrays of several clips, keys "<clip id>/<name>" (see engine.train.extract)
    report.json                 the last build's summary (kept, skipped and why, hours, emotions)

Clips are buffered and written a shard at a time; the index is replaced atomically after each shard, so a build
that stops (crash, Ctrl-C) loses at most the clips of the shard in progress and resumes after the last one written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from engine.weights.checkpoint import atomic_file

INDEX_NAME = "index.json"
REPORT_NAME = "report.json"
FORMAT = 1
KIND = "avatar-engine-dataset"


class DatasetError(ValueError):
    """A dataset folder that is missing, damaged or of another kind; the message says which and why."""


def write_json_atomic(path: Path, data: Any) -> None:
    atomic_file(path, lambda p: p.write_text(json.dumps(data, indent=1, sort_keys=True)))


def read_index(root: Path) -> dict[str, Any]:
    path = Path(root) / INDEX_NAME
    if not path.is_file():
        raise DatasetError(f"{root}: not a dataset (no {INDEX_NAME}); build one with 'engine dataset build'")
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: damaged index ({exc})") from exc
    if index.get("kind") != KIND or index.get("format") != FORMAT:
        raise DatasetError(
            f"{path}: not an engine dataset index (kind {index.get('kind')!r}, format {index.get('format')!r})"
        )
    return dict(index)


class ShardWriter:
    """Appends clips to ``root``'s shards (see the module docstring). ``settings`` must match an existing index."""

    def __init__(
        self, root: Path, settings: Mapping[str, Any], max_clips: int = 64, max_bytes: int = 256 << 20
    ) -> None:
        if max_clips < 1 or max_bytes < 1:
            raise ValueError("a shard must hold at least one clip and one byte")
        self.root = Path(root)
        self.max_clips, self.max_bytes = max_clips, max_bytes
        if (self.root / INDEX_NAME).is_file():
            self.index = read_index(self.root)
            old = self.index.get("settings", {})
            if old != json.loads(json.dumps(dict(settings))):
                raise DatasetError(
                    f"{self.root}: the dataset was built with other settings ({old}); build into a new folder"
                )
        else:
            if self.root.exists() and any(self.root.iterdir()):
                raise DatasetError(f"{self.root}: exists and is not a dataset; give an empty or new folder")
            self.index = {
                "kind": KIND,
                "format": FORMAT,
                "settings": dict(settings),
                "clips": [],
                "skipped": [],
                "shards": [],
            }
        self._buffer: dict[str, np.ndarray] = {}
        self._pending: list[dict[str, Any]] = []
        self._bytes = 0

    def done(self) -> set[str]:
        return {c["id"] for c in self.index["clips"]}

    def skipped(self) -> set[str]:
        return {c["id"] for c in self.index["skipped"]}

    def add(self, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        clip = str(meta["id"])
        if clip in self.done() or any(p["id"] == clip for p in self._pending):
            raise DatasetError(f"clip {clip} is already in the dataset")
        for name, value in arrays.items():
            arr = np.ascontiguousarray(value)
            self._buffer[f"{clip}/{name}"] = arr
            self._bytes += arr.nbytes
        self._pending.append(dict(meta))
        self.index["skipped"] = [s for s in self.index["skipped"] if s["id"] != clip]
        if len(self._pending) >= self.max_clips or self._bytes >= self.max_bytes:
            self.flush()

    def skip(self, meta: Mapping[str, Any], reason: str) -> None:
        entry = {**dict(meta), "reason": reason}
        self.index["skipped"] = [s for s in self.index["skipped"] if s["id"] != entry["id"]] + [entry]
        self._write_index()  # buffered clips are not in the index yet, so this never lists a clip before its shard

    def flush(self) -> None:
        if not self._pending:
            return
        name = f"shards/shard-{len(self.index['shards']):05d}.safetensors"
        path = self.root / name
        atomic_file(path, lambda p: save_file(self._buffer, str(p), metadata={"format": str(FORMAT)}))
        for meta in self._pending:
            meta["shard"] = name
        self.index["clips"].extend(self._pending)
        self.index["shards"].append(name)
        self._buffer, self._pending, self._bytes = {}, [], 0
        self._write_index()

    def close(self) -> None:
        self.flush()
        self._write_index()

    def _write_index(self) -> None:
        write_json_atomic(self.root / INDEX_NAME, self.index)


@dataclass(frozen=True)
class ClipInfo:
    id: str
    frames: int
    shard: str
    speaker: str | None
    emotion: str | None
    intensity: float | None
    split: str
    spaces: tuple[str, ...]
    meta: dict[str, Any]


class Dataset:
    """The read side: clip metadata from the index, arrays loaded per clip from the shards (memory-mapped)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.index = read_index(self.root)
        self.settings: dict[str, Any] = dict(self.index.get("settings", {}))
        self.clips = [
            ClipInfo(
                id=c["id"],
                frames=int(c["frames"]),
                shard=c["shard"],
                speaker=c.get("speaker"),
                emotion=c.get("emotion"),
                intensity=c.get("intensity"),
                split=c.get("split") or "train",
                spaces=tuple(c.get("spaces", ())),
                meta=dict(c),
            )
            for c in self.index["clips"]
        ]
        self._by_id = {c.id: c for c in self.clips}

    def __len__(self) -> int:
        return len(self.clips)

    def split(self, name: str) -> list[ClipInfo]:
        return [c for c in self.clips if c.split == name]

    def arrays(self, clip: str | ClipInfo, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """``{name: array}`` of one clip (all its arrays, or ``names``)."""
        info = clip if isinstance(clip, ClipInfo) else self._by_id[clip]
        path = self.root / info.shard
        prefix = f"{info.id}/"
        try:
            with safe_open(str(path), framework="numpy") as f:
                keys = [k for k in f.keys() if k.startswith(prefix)]  # noqa: SIM118 (safe_open is no dict)
                out = {k[len(prefix) :]: f.get_tensor(k) for k in keys}
        except (SafetensorError, OSError) as exc:
            raise DatasetError(f"{path}: damaged shard ({exc})") from exc
        if names is not None:
            missing = [n for n in names if n not in out]
            if missing:
                raise DatasetError(f"clip {info.id} has no {missing} (spaces: {list(info.spaces)})")
            out = {n: out[n] for n in names}
        return out
