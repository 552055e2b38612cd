"""Which videos make a dataset, and their labels: a folder, a glob pattern or a CSV; MEAD and CREMA-D names parsed.

* MEAD: ``<speaker>/video/<view>/<emotion>/level_<n>/<clip>.mp4`` -> speaker, view, emotion, level ``n``.
* CREMA-D: ``<actor>_<sentence>_<EMO>_<LEVEL>.flv`` (e.g. ``1001_DFA_ANG_XX``) -> speaker, emotion, level
  (``LO``/``MD``/``HI`` -> 1/2/3, ``XX`` unspecified).
* CSV: a header with ``path`` (relative to the CSV's folder, or absolute) and optionally ``emotion``, ``level``
  (1-3) or ``intensity`` (0-1.5), ``speaker``, ``split`` (``train``/``val``). Labels given in the CSV win over
  labels parsed from names.

Emotions use the engine's vocabulary (:data:`engine.motion.emotion.EMOTIONS`, MEAD's eight); common spellings
(``anger``, ``disgust``, ``happiness``, ...) are mapped onto it.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from engine.motion.emotion import EMOTIONS
from engine.train.video import VIDEO_SUFFIXES

SPLITS = ("train", "val")
LEVEL_INTENSITY = {1: 0.5, 2: 0.75, 3: 1.0}  # MEAD / CREMA-D levels on the engine's intensity scale
_ALIASES = {
    "anger": "angry",
    "ang": "angry",
    "disgust": "disgusted",
    "dis": "disgusted",
    "fearful": "fear",
    "fea": "fear",
    "afraid": "fear",
    "happiness": "happy",
    "hap": "happy",
    "joy": "happy",
    "neu": "neutral",
    "sadness": "sad",
    "surprise": "surprised",
    "sur": "surprised",
    "con": "contempt",
}
_CREMA = re.compile(r"^(\d{4})_([A-Z]{3})_([A-Z]{3})_(LO|MD|HI|XX)$")
_CREMA_LEVEL = {"LO": 1, "MD": 2, "HI": 3}
_LEVEL = re.compile(r"^level_?(\d)$", re.IGNORECASE)


class SourceError(ValueError):
    """The VIDEOS argument or a CSV names nothing usable; the message says what."""


@dataclass(frozen=True)
class ClipSource:
    path: Path
    id: str  # stable: readable stem + hash of the path relative to the input root
    speaker: str | None = None
    emotion: str | None = None
    level: int | None = None  # 1-3 when the dataset grades intensity
    intensity: float | None = None  # engine scale 0-1.5 (from the level, or given)
    split: str | None = None  # train | val; None: decided by the builder
    labels_from: str = ""  # "mead", "crema-d", "csv" or ""

    def meta(self) -> dict[str, object]:
        return {
            "id": self.id,
            "source": str(self.path),
            "speaker": self.speaker,
            "emotion": self.emotion,
            "level": self.level,
            "intensity": self.intensity,
            "labels_from": self.labels_from,
        }


def normalise_emotion(name: str) -> str:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in EMOTIONS:
        raise SourceError(f"unknown emotion {name!r}; use one of {list(EMOTIONS)}")
    return key


def clip_id(path: Path, root: Path) -> str:
    try:
        rel = path.resolve().relative_to(root.resolve())
    except ValueError:
        rel = path.resolve()
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", path.stem)[:40].strip("-") or "clip"
    return f"{stem}-{hashlib.sha1(rel.as_posix().encode()).hexdigest()[:10]}"


def parse_labels(path: Path) -> tuple[str | None, str | None, int | None, str]:
    """(speaker, emotion, level, which layout) read from a MEAD path or a CREMA-D file name."""
    m = _CREMA.match(path.stem)
    if m:
        emotion = normalise_emotion(m.group(3))
        return m.group(1), emotion, _CREMA_LEVEL.get(m.group(4)), "crema-d"
    parts = path.parts
    for i, part in enumerate(parts):
        lm = _LEVEL.match(part)
        if lm and i >= 2:
            try:
                emotion = normalise_emotion(parts[i - 1])
            except SourceError:
                continue
            speaker = None
            if "video" in parts[:i]:
                v = len(parts[:i]) - 1 - parts[:i][::-1].index("video")
                speaker = parts[v - 1] if v >= 1 else None
            return speaker, emotion, int(lm.group(1)), "mead"
    return None, None, None, ""


def _source(path: Path, root: Path) -> ClipSource:
    speaker, emotion, level, how = parse_labels(path)
    return ClipSource(
        path=path,
        id=clip_id(path, root),
        speaker=speaker,
        emotion=emotion,
        level=level,
        intensity=(LEVEL_INTENSITY.get(level, 1.0) if level is not None else 1.0) if emotion is not None else None,
        labels_from=how,
    )


def _from_csv(path: Path) -> list[ClipSource]:
    root = path.parent
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise SourceError(f"{path}: unreadable CSV ({exc})") from exc
    if not rows or "path" not in rows[0]:
        raise SourceError(f"{path}: the CSV needs a header with a 'path' column")
    out = []
    for n, row in enumerate(rows, start=2):
        if not (row.get("path") or "").strip():
            raise SourceError(f"{path}:{n}: empty path")
        clip = Path(row["path"].strip())
        clip = clip if clip.is_absolute() else root / clip
        base = _source(clip, root)
        emotion = normalise_emotion(row["emotion"]) if (row.get("emotion") or "").strip() else base.emotion
        level = int(row["level"]) if (row.get("level") or "").strip() else base.level
        if level is not None and level not in LEVEL_INTENSITY:
            raise SourceError(f"{path}:{n}: level must be 1, 2 or 3, got {level}")
        intensity: float | None
        if (row.get("intensity") or "").strip():
            intensity = float(row["intensity"])
            if not 0.0 <= intensity <= 1.5:
                raise SourceError(f"{path}:{n}: intensity must be in [0, 1.5], got {intensity}")
        else:
            intensity = LEVEL_INTENSITY.get(level, 1.0) if level is not None else base.intensity
        if emotion is not None and intensity is None:
            intensity = 1.0
        split = (row.get("split") or "").strip().lower() or None
        if split is not None and split not in SPLITS:
            raise SourceError(f"{path}:{n}: split must be one of {SPLITS}, got {split!r}")
        speaker = (row.get("speaker") or "").strip() or base.speaker
        out.append(
            ClipSource(clip, base.id, speaker, emotion, level, intensity, split, "csv" if row.get("emotion") else "")
        )
    return out


def list_sources(spec: str | Path) -> list[ClipSource]:
    """The videos named by ``spec``: a folder (searched recursively), a glob pattern, a CSV, or one video file.
    Sorted by path; raises :class:`SourceError` when nothing matches."""
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix.lower() == ".csv":
        sources = _from_csv(path)
    elif path.is_file():
        sources = [_source(path, path.parent)]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
        sources = [_source(p, path) for p in files]
    elif any(c in text for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(text, recursive=True))
        files = [p for p in files if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES]
        root = Path(text.split("*")[0].split("?")[0].split("[")[0] or ".")
        root = root if root.is_dir() else root.parent
        sources = [_source(p, root) for p in files]
    else:
        raise SourceError(f"{spec}: no such file, folder or glob match")
    if not sources:
        raise SourceError(f"{spec}: no videos found ({', '.join(VIDEO_SUFFIXES)})")
    ids = [s.id for s in sources]
    if len(set(ids)) != len(ids):
        raise SourceError(f"{spec}: the same video is listed twice")
    return sources
