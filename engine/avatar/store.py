"""The on-disk avatar store.

Layout under ``root`` (default: the engine home's ``avatars/``)::

    entries/<sha256>/image.png          the photo (EXIF-rotated RGB), paste-back target
    entries/<sha256>/crop.png           the 512x512 face crop
    entries/<sha256>/meta.json          affine, landmarks, scheme, sizes, how the face was found
    entries/<sha256>/features/<id>.safetensors   F/M outputs for one set of weights
    entries/<sha256>/personal/<space>/  a personal motion model learned from clips (engine personalize)
    names/<name>                        the name index: a text file holding the entry's sha256

Entries are keyed by the content hash of the photo's bytes, so adding the same photo twice (under any name)
shares one entry. An entry is written into a temporary directory and renamed into place, and a name file is
replaced atomically, so a failed ``add`` leaves nothing behind. The name ``default`` is reserved: it is
created on demand from the engine's drawn default portrait.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from engine.avatar.default import default_portrait
from engine.avatar.geometry import CROP_SIZE
from engine.avatar.image import AvatarError
from engine.avatar.record import Avatar
from engine.paths import avatars_dir
from engine.weights.checkpoint import atomic_directory, atomic_file

STORE_FORMAT = 1
DEFAULT_NAME = "default"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HASH = re.compile(r"^[0-9a-f]{64}$")


def validate_name(name: str) -> str:
    """Avatar names become file names: letters, digits, ``.``, ``_``, ``-``; no leading dot; at most 64."""
    if not isinstance(name, str) or not _NAME.match(name) or name.endswith("."):
        raise AvatarError(
            f"invalid avatar name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def _features_file(weights_id: str) -> str:
    if _NAME.match(weights_id) and not weights_id.endswith("."):
        return f"{weights_id}.safetensors"
    return f"w-{hashlib.sha256(weights_id.encode()).hexdigest()[:24]}.safetensors"


def _write_png(path: Path, rgb: np.ndarray) -> None:
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), mode="RGB").save(path, format="PNG")


def _read_png(path: Path) -> np.ndarray:
    with Image.open(path, formats=["PNG"]) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def _write_features(path: Path, weights_id: str, features: Mapping[str, np.ndarray]) -> None:
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in features.items()}
    save_file(tensors, str(path), metadata={"weights_id": weights_id})


@dataclass(frozen=True)
class AvatarInfo:
    name: str
    content_hash: str
    meta: dict[str, Any]
    weights_ids: tuple[str, ...]


class AvatarStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else avatars_dir()

    # -- paths ---------------------------------------------------------------------------------------------
    def _entry(self, content_hash: str) -> Path:
        if not _HASH.match(content_hash):
            raise AvatarError(f"invalid content hash {content_hash!r}")
        return self.root / "entries" / content_hash

    def _name_file(self, name: str) -> Path:
        return self.root / "names" / validate_name(name)

    def _hash_of(self, name: str) -> str | None:
        path = self._name_file(name)
        if not path.is_file():
            return None
        content_hash = path.read_text().strip()
        if not _HASH.match(content_hash):
            raise AvatarError(f"{path}: corrupt name index entry")
        return content_hash

    # -- queries -------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        directory = self.root / "names"
        if not directory.is_dir():
            return []
        return sorted(p.name for p in directory.iterdir() if p.is_file() and _NAME.match(p.name))

    def __contains__(self, name: str) -> bool:
        return self._hash_of(name) is not None

    def info(self, name: str) -> AvatarInfo:
        content_hash = self._require(name)
        entry = self._entry(content_hash)
        return AvatarInfo(name, content_hash, self._read_meta(entry), tuple(sorted(self._feature_paths(entry))))

    def list(self) -> list[AvatarInfo]:
        return [self.info(n) for n in self.names()]

    def get(self, name: str) -> Avatar:
        """The stored avatar ``name`` with all cached features; ``default`` is created on first use."""
        if name == DEFAULT_NAME and DEFAULT_NAME not in self:
            return self.add(_default_avatar())
        content_hash = self._require(name)
        entry = self._entry(content_hash)
        meta = self._read_meta(entry)
        try:
            image, crop = _read_png(entry / "image.png"), _read_png(entry / "crop.png")
        except OSError as exc:
            raise AvatarError(f"{entry}: avatar entry is damaged ({exc}); remove and add it again") from exc
        landmarks = meta.get("landmarks")
        return Avatar(
            name=name,
            content_hash=content_hash,
            image=image,
            crop=crop,
            crop_to_image=np.asarray(meta["crop_to_image"], dtype=np.float64),
            landmarks=None if landmarks is None else np.asarray(landmarks, dtype=np.float32),
            landmark_scheme=str(meta.get("landmark_scheme", "")),
            features=self._feature_ids(entry),
            landmark_method=str(meta.get("landmark_method", "")),
        )

    # -- changes -------------------------------------------------------------------------------------------
    def add(self, avatar: Avatar, *, overwrite: bool = False, info: Mapping[str, Any] | None = None) -> Avatar:
        """Store ``avatar`` under ``avatar.name``; returns it as read back from the store.

        The same photo already stored (same hash) is shared: only new features are written. If it was prepared
        differently this time (another crop, or landmarks it lacked), the entry is replaced, so a re-add with
        ``--landmarks`` or ``--crop`` is never silently ignored; cached features of the old crop go with it.
        A name that already refers to a different photo is an error unless ``overwrite``.
        """
        name = validate_name(avatar.name)
        old = self._hash_of(name)
        if old is not None and old != avatar.content_hash and not overwrite:
            raise AvatarError(f"an avatar named {name!r} already exists (a different image); remove it first")
        entry = self._entry(avatar.content_hash)
        if entry.is_dir() and self._same_preparation(entry, avatar):
            for weights_id, features in avatar.features.items():
                self.put_features(avatar.content_hash, weights_id, features)
        else:
            self._write_entry(entry, avatar, info or {})
        atomic_file(self._name_file(name), lambda p: p.write_text(avatar.content_hash + "\n"))
        if old is not None and old != avatar.content_hash:
            self._drop_if_unreferenced(old)
        return self.get(name)

    def put_features(self, name_or_hash: str, weights_id: str, features: Mapping[str, np.ndarray]) -> None:
        """Cache F/M outputs of ``weights_id`` for a stored avatar (by name or content hash)."""
        content_hash = name_or_hash if _HASH.match(name_or_hash) else self._require(name_or_hash)
        entry = self._entry(content_hash)
        if not entry.is_dir():
            raise AvatarError(f"no stored avatar with hash {content_hash}")
        path = entry / "features" / _features_file(weights_id)
        atomic_file(path, lambda p: _write_features(p, weights_id, features))

    def personal_dir(self, name: str, space: str) -> Path:
        """Where the personal motion model of ``name`` in motion space ``space`` lives (it may not exist)."""
        if not _NAME.match(space):
            raise AvatarError(f"invalid motion space name {space!r}")
        return self._entry(self._require(name)) / "personal" / space

    def personal_spaces(self, name: str) -> tuple[str, ...]:
        """The motion spaces ``name`` has a personal model for."""
        root = self._entry(self._require(name)) / "personal"
        if not root.is_dir():
            return ()
        return tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")))

    def save_personal(self, name: str, space: str, write: Callable[[Path], None]) -> Path:
        """Write a personal model through ``write(folder)`` and put it in place atomically (replacing the old one);
        a failed write leaves the old one."""
        directory = self.personal_dir(name, space)
        with atomic_directory(directory) as tmp:
            write(tmp)
        return directory

    def remove(self, name: str) -> None:
        content_hash = self._require(name)
        self._name_file(name).unlink()
        self._drop_if_unreferenced(content_hash)

    # -- internals -----------------------------------------------------------------------------------------
    def _require(self, name: str) -> str:
        content_hash = self._hash_of(name)
        if content_hash is None:
            known = ", ".join(self.names()) or "none"
            raise AvatarError(f"no avatar named {name!r} (stored: {known}); add one with 'engine avatar add'")
        return content_hash

    def _write_entry(self, entry: Path, avatar: Avatar, info: Mapping[str, Any]) -> None:
        crop = np.asarray(avatar.crop)
        if crop.ndim != 3 or crop.shape[0] != crop.shape[1] or crop.shape[2] != 3:
            raise AvatarError(f"avatar {avatar.name!r}: crop must be [S, S, 3], got {list(crop.shape)}")
        image = np.asarray(avatar.image)
        meta = {
            "format": STORE_FORMAT,
            "content_hash": avatar.content_hash,
            "image_size": [int(image.shape[1]), int(image.shape[0])],
            "crop_size": int(crop.shape[0]),
            "crop_to_image": np.asarray(avatar.crop_to_image, dtype=np.float64).tolist(),
            "landmarks": None if avatar.landmarks is None else np.asarray(avatar.landmarks, np.float64).tolist(),
            "landmark_scheme": avatar.landmark_scheme,
            "landmark_method": avatar.landmark_method,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **dict(info),
        }
        with atomic_directory(entry) as tmp:
            _write_png(tmp / "image.png", image)
            _write_png(tmp / "crop.png", crop)
            (tmp / "features").mkdir()
            for weights_id, features in avatar.features.items():
                _write_features(tmp / "features" / _features_file(weights_id), weights_id, features)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))

    def _same_preparation(self, entry: Path, avatar: Avatar) -> bool:
        meta = self._read_meta(entry)
        if not np.allclose(np.asarray(meta["crop_to_image"]), avatar.crop_to_image, atol=1e-6):
            return False
        stored = meta.get("landmarks")
        if avatar.landmarks is None or stored is None:
            return avatar.landmarks is None and stored is None
        stored_arr = np.asarray(stored)
        return stored_arr.shape == avatar.landmarks.shape and bool(np.allclose(stored_arr, avatar.landmarks, atol=1e-3))

    def _read_meta(self, entry: Path) -> dict[str, Any]:
        path = entry / "meta.json"
        try:
            meta = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise AvatarError(f"{path}: avatar entry is damaged ({exc}); remove and add it again") from exc
        if meta.get("format") != STORE_FORMAT:
            raise AvatarError(f"{path}: unsupported avatar store format {meta.get('format')!r}")
        return dict(meta)

    def _feature_paths(self, entry: Path) -> dict[str, Path]:
        """weights id -> feature file, reading only the files' headers."""
        out: dict[str, Path] = {}
        directory = entry / "features"
        for path in sorted(directory.glob("*.safetensors")) if directory.is_dir() else []:
            try:
                with safe_open(str(path), framework="numpy") as f:
                    out[(f.metadata() or {}).get("weights_id", path.stem)] = path
            except (SafetensorError, OSError) as exc:
                raise AvatarError(f"{path}: damaged feature cache ({exc}); remove and add the avatar again") from exc
        return out

    def _feature_ids(self, entry: Path) -> dict[str, dict[str, np.ndarray]]:
        out: dict[str, dict[str, np.ndarray]] = {}
        for weights_id, path in self._feature_paths(entry).items():
            try:
                out[weights_id] = load_file(str(path))
            except (SafetensorError, OSError) as exc:
                raise AvatarError(f"{path}: damaged feature cache ({exc}); remove and add the avatar again") from exc
        return out

    def _drop_if_unreferenced(self, content_hash: str) -> None:
        if any(self._hash_of(n) == content_hash for n in self.names()):
            return
        shutil.rmtree(self._entry(content_hash), ignore_errors=True)


def _default_avatar() -> Avatar:
    """The drawn default portrait as an avatar; its hash is that of the raw pixels (there is no file)."""

    image, landmarks, scheme = default_portrait()
    h, w = image.shape[:2]
    side = max(h, w)
    # the portrait is already framed like a crop; pad to square if it is not, then scale to the crop size
    pad_y, pad_x = (side - h) // 2, (side - w) // 2
    square = cv2.copyMakeBorder(image, pad_y, side - h - pad_y, pad_x, side - w - pad_x, cv2.BORDER_REPLICATE)
    k = side / CROP_SIZE
    crop = square if side == CROP_SIZE else cv2.resize(square, (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_AREA)
    # crop pixel u -> square pixel (u + 0.5) * k - 0.5 -> image pixel minus the padding
    crop_to_image = np.array([[k, 0.0, 0.5 * k - 0.5 - pad_x], [0.0, k, 0.5 * k - 0.5 - pad_y]], dtype=np.float64)
    crop_landmarks = (np.asarray(landmarks, np.float64) + [pad_x, pad_y] + 0.5) / k - 0.5
    return Avatar(
        name=DEFAULT_NAME,
        content_hash=hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest(),
        image=image,
        crop=crop,
        crop_to_image=crop_to_image,
        landmarks=crop_landmarks.astype(np.float32),
        landmark_scheme=scheme,
        landmark_method="drawn",
    )
