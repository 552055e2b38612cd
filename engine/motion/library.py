"""Stored motion examples: emotions taken from example photos or clips, and an avatar's reference clip.

Emotion from examples without trained heads (EP-Talk's EAFD, PC-Talk's pure emotional deformation): ``engine
emotion add NAME --from FILE [--neutral FILE]`` runs the motion extractor over the example, keeps its expression
(a clip: the per-coordinate median over its frames) and the neutral example's, and stores both here. A reference
clip (EP-Talk's MAPD role, ``engine avatar reference``) stores the clip's head-pose trajectory relative to its
median pose, the pose statistics, and the clip's emotion.

Each record holds up to two *spaces*, one per renderer:

* ``keypoints``: LivePortrait expression deltas ``[21, 3]`` (and poses), made with one set of renderer weights,
  whose id is recorded: another set of weights has another keypoint space, so a record made with other weights is
  not used (the refusal says so);
* ``mesh``: the classic keypoints ``[21, 2]`` of the example's 68-point landmarks, aligned by a similarity
  transform that puts the eye centres at ``(-0.5, 0)`` and ``(0.5, 0)`` (units of the inter-ocular distance), with
  the keypoints those landmarks actually measured (landmarks fitted from a template measure only the mouth, the nose
  and the chin; the rest of a template is not evidence of an expression).

Layout under ``root`` (default: the engine home's ``motion-library/``), every file written atomically::

    emotions/global/<emotion>.json + .safetensors           for every avatar
    emotions/avatars/<avatar>/<emotion>.json + .safetensors  for one avatar (found first)
    references/<avatar>.json + .safetensors
    VERSION                                                  changes on every write (running sessions reload)

:func:`keypoint_bank` and :func:`mesh_emotions` turn stored emotions into offsets for one avatar: an emotion's
*pure* offset is its expression minus the neutral reference (the example's own neutral example, else the stored
``neutral`` emotion, else the portrait itself), and its absolute offset replaces the portrait's expression with
the example's.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, NamedTuple, TypeVar

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from engine.keypoints import EMOTION, NUM_KP, MotionParams, SourceFace
from engine.motion import facs
from engine.motion.emotion import EMOTIONS, EmotionBank, ReferenceMotion, emotion_index
from engine.paths import engine_home
from engine.render.classic import keypoints_from_landmarks
from engine.render.classic_mesh import ANCHORS, LID_REF_GAP
from engine.weights.checkpoint import atomic_file

LIBRARY_FORMAT = 1
_SAFE_NAME = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"

# classic keypoints a 68-point template fit measures (mouth corners and seam, nose tip, chin): see the docstring
TEMPLATE_MEASURED: tuple[int, ...] = (3, 6, 12, 14, 17, 19, 20)
ALL_MEASURED: tuple[int, ...] = tuple(k for k in range(NUM_KP) if k not in ANCHORS)
UPPER_LIDS, LOWER_LIDS = (11, 15), (13, 16)


class LibraryError(ValueError):
    """A stored example is missing, damaged or cannot be written; the message says which and why."""


def library_dir() -> Path:
    return engine_home() / "motion-library"


def _check_name(name: str, what: str) -> str:
    if not name or name[0] == "." or any(c not in _SAFE_NAME for c in name) or len(name) > 64:
        raise LibraryError(f"invalid {what} name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    return name


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --- records ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeypointEmotion:
    """An example's expression in one renderer's keypoint space."""

    weights_id: str
    untrained: bool  # made with untrained (random) weights: noise, for tests only
    delta: np.ndarray  # [21, 3] the example's expression (median over a clip's frames)
    neutral: np.ndarray | None = None  # [21, 3] the neutral example's


@dataclass(frozen=True)
class MeshEmotion:
    """An example's face shape in the classic (landmark mesh) space: aligned keypoints, inter-ocular units."""

    shape: np.ndarray  # [21, 2]
    neutral: np.ndarray | None  # [21, 2] the neutral example's
    measured: tuple[int, ...]  # the keypoints its landmarks measured


@dataclass(frozen=True)
class EmotionExample:
    name: str  # one of the control emotions
    avatar: str | None  # None: for every avatar
    source: str  # the example's file name
    neutral_source: str | None
    frames: int  # frames the example's expression is the median of
    keypoints: KeypointEmotion | None = None
    mesh: MeshEmotion | None = None
    created: str = ""

    def spaces(self) -> list[str]:
        return [s for s, v in (("keypoints", self.keypoints), ("mesh", self.mesh)) if v is not None]


@dataclass(frozen=True)
class KeypointReference:
    weights_id: str
    untrained: bool
    pose: np.ndarray  # [T, 7] pitch, yaw, roll (deg), tx, ty, tz, scale, relative to the clip's median
    emotion: np.ndarray  # [21, 3] the clip's median expression minus its least expressive frame's


@dataclass(frozen=True)
class MeshReference:
    pose: np.ndarray  # [T, 6] pitch, yaw, roll (deg), tx, ty (crop half-sides), scale - 1; relative to the median
    emotion: np.ndarray  # [21, 2] median aligned shape minus the clip's most neutral frame's (measured keypoints)
    measured: tuple[int, ...]


@dataclass(frozen=True)
class ReferenceClip:
    avatar: str
    source: str
    frames: int
    fps: float
    keypoints: KeypointReference | None = None
    mesh: MeshReference | None = None
    stats: Mapping[str, Any] | None = None  # per space: pose mean / std / min / max before centring
    created: str = ""

    def spaces(self) -> list[str]:
        return [s for s, v in (("keypoints", self.keypoints), ("mesh", self.mesh)) if v is not None]


def pose_stats(pose: np.ndarray, names: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Mean, std, min and max of each pose dimension ``[T, D]`` (the clip's style of head motion)."""
    p = np.asarray(pose, dtype=np.float64)
    return {
        n: {"mean": float(p[:, i].mean()), "std": float(p[:, i].std()), "min": float(p[:, i].min()),
            "max": float(p[:, i].max())}
        for i, n in enumerate(names)
    }  # fmt: skip


KEYPOINT_POSE = ("pitch", "yaw", "roll", "tx", "ty", "tz", "scale")
MESH_POSE = ("pitch", "yaw", "roll", "tx", "ty", "scale")


def aligned_shape(landmarks: np.ndarray) -> np.ndarray:
    """Classic keypoints ``[21, 2]`` of 68-point landmarks (any pixel frame), aligned: the similarity transform that
    puts the eye centres at ``(-0.5, 0)`` and ``(0.5, 0)`` removes the head's position, size and roll, so shapes of
    different photos and frames compare in inter-ocular units."""
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (68, 2) or not np.isfinite(lm).all():
        raise LibraryError(f"aligned shapes need finite 68-point landmarks, got shape {lm.shape}")
    left, right = lm[36:42].mean(axis=0), lm[42:48].mean(axis=0)
    axis = right - left
    iod = float(np.linalg.norm(axis))
    if iod < 1e-6:
        raise LibraryError("the landmarks' eyes coincide")
    c, s = axis / iod
    rot = np.array([[c, s], [-s, c]]) / iod  # rotates the eye axis onto +x and scales it to length 1
    aligned = (lm - (left + right) / 2) @ rot.T
    # keypoints_from_landmarks maps pixels p to (2 p + 1) / size - 1: with size 2 that is p - 0.5
    return keypoints_from_landmarks(aligned, 2)[:, :2].astype(np.float64) + 0.5


T = TypeVar("T")


class Watched(Generic[T]):
    """What one session reads from the library, loaded again whenever the library changed (an example was added
    or removed while the session runs): :meth:`poll` returns the fresh value, or None when nothing changed."""

    def __init__(self, library: MotionLibrary, load: Callable[[MotionLibrary], T]) -> None:
        self.library = library
        self._load = load
        self._seen: str | None = None

    def poll(self) -> T | None:
        version = self.library.version()
        if version == self._seen:
            return None
        self._seen = version
        return self._load(self.library)


# --- files -----------------------------------------------------------------------------------------------------


def _write_pair(base: Path, meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
    arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
    # tensors first: a reader finds the JSON only once its tensors are in place
    atomic_file(base.with_suffix(".safetensors"), lambda p: save_file(arrays, str(p)))
    atomic_file(base.with_suffix(".json"), lambda p: p.write_text(json.dumps(meta, indent=2, sort_keys=True)))


def _read_pair(base: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    try:
        meta = json.loads(base.with_suffix(".json").read_text())
        tensors = load_file(str(base.with_suffix(".safetensors")))
    except (OSError, ValueError, SafetensorError) as exc:
        raise LibraryError(f"{base}: stored example is damaged ({exc}); remove it and add it again") from exc
    if not isinstance(meta, dict) or meta.get("format") != LIBRARY_FORMAT:
        raise LibraryError(f"{base}.json: unsupported motion library format {meta.get('format')!r}")
    return meta, tensors


class MotionLibrary:
    """The on-disk store of emotion examples and reference clips (see the module docstring)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else library_dir()

    # -- paths --
    def _emotion_base(self, name: str, avatar: str | None) -> Path:
        emotion_index(name)
        scope = self.root / "emotions" / ("global" if avatar is None else f"avatars/{_check_name(avatar, 'avatar')}")
        return scope / name.lower()

    def _reference_base(self, avatar: str) -> Path:
        return self.root / "references" / _check_name(avatar, "avatar")

    def version(self) -> str:
        """Changes whenever something is stored or removed (sessions poll it to reload)."""
        try:
            return (self.root / "VERSION").read_text().strip()
        except OSError:
            return ""

    def _bump(self) -> None:
        atomic_file(self.root / "VERSION", lambda p: p.write_text(uuid.uuid4().hex + "\n"))

    # -- emotions --
    def put_emotion(self, example: EmotionExample) -> Path:
        base = self._emotion_base(example.name, example.avatar)
        tensors: dict[str, np.ndarray] = {}
        meta: dict[str, Any] = {
            "format": LIBRARY_FORMAT,
            "kind": "emotion",
            "name": example.name,
            "avatar": example.avatar,
            "source": example.source,
            "neutral_source": example.neutral_source,
            "frames": example.frames,
            "created": example.created or _now(),
        }
        if example.keypoints is not None:
            kp = example.keypoints
            meta["keypoints"] = {"weights_id": kp.weights_id, "untrained": kp.untrained}
            tensors["keypoints.delta"] = kp.delta
            if kp.neutral is not None:
                tensors["keypoints.neutral"] = kp.neutral
        if example.mesh is not None:
            mesh = example.mesh
            meta["mesh"] = {"measured": list(mesh.measured)}
            tensors["mesh.shape"] = mesh.shape
            if mesh.neutral is not None:
                tensors["mesh.neutral"] = mesh.neutral
        if not tensors:
            raise LibraryError(f"emotion {example.name!r}: nothing to store (no keypoints and no landmarks)")
        _write_pair(base, meta, tensors)
        self._bump()
        return base.with_suffix(".json")

    def _load_emotion(self, base: Path) -> EmotionExample:
        meta, t = _read_pair(base)
        keypoints = mesh = None
        if "keypoints" in meta:
            k = meta["keypoints"]
            keypoints = KeypointEmotion(
                str(k["weights_id"]), bool(k.get("untrained")), t["keypoints.delta"], t.get("keypoints.neutral")
            )
        if "mesh" in meta:
            mesh = MeshEmotion(t["mesh.shape"], t.get("mesh.neutral"), tuple(int(i) for i in meta["mesh"]["measured"]))
        return EmotionExample(
            name=str(meta["name"]),
            avatar=meta.get("avatar"),
            source=str(meta.get("source", "")),
            neutral_source=meta.get("neutral_source"),
            frames=int(meta.get("frames", 1)),
            keypoints=keypoints,
            mesh=mesh,
            created=str(meta.get("created", "")),
        )

    def emotion(self, name: str, avatar: str | None = None) -> EmotionExample | None:
        """The stored example of ``name`` for ``avatar`` (its own first, then the global one), or None."""
        found = self.candidates(name, avatar)
        return found[0] if found else None

    def candidates(self, name: str, avatar: str | None = None) -> list[EmotionExample]:
        """Every stored example of ``name`` ``avatar`` may use, its own before the global one (a renderer takes the
        first that has its space)."""
        out = []
        for scope in ([avatar] if avatar is not None else []) + [None]:
            base = self._emotion_base(name, scope)
            if base.with_suffix(".json").is_file():
                out.append(self._load_emotion(base))
        return out

    def emotions(self, avatar: str | None = None, *, every_scope: bool = False) -> list[EmotionExample]:
        """Stored examples: what ``avatar`` sees (its own over the global ones), or with ``every_scope`` all."""
        out: list[EmotionExample] = []
        scopes: list[Path] = []
        if every_scope:
            scopes = [self.root / "emotions" / "global"]
            avatars = self.root / "emotions" / "avatars"
            scopes += sorted(p for p in avatars.iterdir() if p.is_dir()) if avatars.is_dir() else []
            for scope in scopes:
                out += [self._load_emotion(p.with_suffix("")) for p in sorted(scope.glob("*.json"))]
            return out
        for name in EMOTIONS:
            found = self.emotion(name, avatar)
            if found is not None:
                out.append(found)
        return out

    def remove_emotion(self, name: str, avatar: str | None = None) -> bool:
        base = self._emotion_base(name, avatar)
        existed = base.with_suffix(".json").is_file()
        base.with_suffix(".json").unlink(missing_ok=True)
        base.with_suffix(".safetensors").unlink(missing_ok=True)
        if existed:
            self._bump()
        return existed

    # -- reference clips --
    def put_reference(self, ref: ReferenceClip) -> Path:
        base = self._reference_base(ref.avatar)
        meta: dict[str, Any] = {
            "format": LIBRARY_FORMAT,
            "kind": "reference",
            "avatar": ref.avatar,
            "source": ref.source,
            "frames": ref.frames,
            "fps": ref.fps,
            "stats": dict(ref.stats or {}),
            "created": ref.created or _now(),
        }
        tensors: dict[str, np.ndarray] = {}
        if ref.keypoints is not None:
            meta["keypoints"] = {"weights_id": ref.keypoints.weights_id, "untrained": ref.keypoints.untrained}
            tensors["keypoints.pose"] = ref.keypoints.pose
            tensors["keypoints.emotion"] = ref.keypoints.emotion
        if ref.mesh is not None:
            meta["mesh"] = {"measured": list(ref.mesh.measured)}
            tensors["mesh.pose"] = ref.mesh.pose
            tensors["mesh.emotion"] = ref.mesh.emotion
        if not tensors:
            raise LibraryError(f"reference clip for {ref.avatar!r}: nothing to store")
        _write_pair(base, meta, tensors)
        self._bump()
        return base.with_suffix(".json")

    def reference(self, avatar: str) -> ReferenceClip | None:
        base = self._reference_base(avatar)
        if not base.with_suffix(".json").is_file():
            return None
        meta, t = _read_pair(base)
        keypoints = mesh = None
        if "keypoints" in meta:
            k = meta["keypoints"]
            keypoints = KeypointReference(
                str(k["weights_id"]), bool(k.get("untrained")), t["keypoints.pose"], t["keypoints.emotion"]
            )
        if "mesh" in meta:
            measured = tuple(int(i) for i in meta["mesh"]["measured"])
            mesh = MeshReference(t["mesh.pose"], t["mesh.emotion"], measured)
        return ReferenceClip(
            avatar=str(meta["avatar"]),
            source=str(meta.get("source", "")),
            frames=int(meta.get("frames", 0)),
            fps=float(meta.get("fps", 25.0)),
            keypoints=keypoints,
            mesh=mesh,
            stats=meta.get("stats"),
            created=str(meta.get("created", "")),
        )

    def remove_reference(self, avatar: str) -> bool:
        base = self._reference_base(avatar)
        existed = base.with_suffix(".json").is_file()
        base.with_suffix(".json").unlink(missing_ok=True)
        base.with_suffix(".safetensors").unlink(missing_ok=True)
        if existed:
            self._bump()
        return existed


# --- neural (keypoint space) -------------------------------------------------------------------------------------


def _add_hint(name: str) -> str:
    return f"engine emotion add {name} --from IMAGE_OR_CLIP"


def _stored_examples(
    library: MotionLibrary,
    avatar: str,
    usable: Callable[[EmotionExample], T | None],
    unusable: Callable[[str, list[EmotionExample]], str],
) -> tuple[dict[str, T], dict[str, str]]:
    """Per emotion, the first stored example ``avatar`` may use that has what a renderer needs (``usable``), and for
    the others why not: the library's error, nothing stored, or ``unusable(name, found)``."""
    picked: dict[str, T] = {}
    missing: dict[str, str] = {}
    for name in EMOTIONS:
        try:
            found = library.candidates(name, avatar)
        except LibraryError as exc:
            missing[name] = str(exc)
            continue
        first = next((u for u in map(usable, found) if u is not None), None)
        if first is not None:
            picked[name] = first
        elif not found:
            missing[name] = f"no stored example ({_add_hint(name)})"
        else:
            missing[name] = unusable(name, found)
    return picked, missing


def keypoint_bank(library: MotionLibrary, avatar: str, source: SourceFace, weights_id: str) -> EmotionBank:
    """The stored emotions of ``avatar`` as keypoint offsets relative to its portrait (see the module docstring);
    emotions without a usable example are listed in the bank's ``missing`` with the reason."""

    def unusable(name: str, found: list[EmotionExample]) -> str:
        kp = found[0].keypoints
        if kp is None:
            return (f"its stored example ({found[0].source}) has no LivePortrait keypoints: it was added "
                    "without LivePortrait weights; add it again with them")  # fmt: skip
        return (
            f"its stored example ({found[0].source}) was made with renderer weights {kp.weights_id!r}, this "
            f"renderer runs {weights_id!r}: add it again ({_add_hint(name)})"
        )

    examples, missing = _stored_examples(
        library,
        avatar,
        lambda c: c.keypoints if c.keypoints is not None and c.keypoints.weights_id == weights_id else None,
        unusable,
    )
    if not examples:  # nothing stored: no read-back of the portrait from the device (a session per avatar)
        return EmotionBank({}, pure={}, missing=missing)
    src = source.params.exp[0].detach().float().cpu().numpy()  # [21, 3] the portrait's own expression
    stored_neutral = examples["neutral"].delta if "neutral" in examples else None
    offsets: dict[str, torch.Tensor] = {}
    pure: dict[str, torch.Tensor] = {}
    for name, kp in examples.items():
        if kp.neutral is not None:
            neutral = kp.neutral
        elif name == "neutral":
            neutral = kp.delta  # the neutral example is its own reference: pure neutral adds nothing
        else:
            neutral = stored_neutral if stored_neutral is not None else src
        offsets[name] = torch.from_numpy(np.asarray(kp.delta, np.float32) - src)
        pure[name] = torch.from_numpy(np.asarray(kp.delta, np.float32) - np.asarray(neutral, np.float32))
    return EmotionBank(offsets, pure=pure, missing=missing)


def keypoint_reference(clip: ReferenceClip | None, weights_id: str) -> tuple[ReferenceMotion | None, str]:
    """A stored reference clip as :class:`ReferenceMotion` for this renderer's weights, or ``(None, why not)``."""
    if clip is None:
        return None, "no reference clip is stored for this avatar (engine avatar reference AVATAR --clip VIDEO)"
    ref = clip.keypoints
    if ref is None:
        return None, f"its reference clip ({clip.source}) was stored without LivePortrait weights: store it again"
    if ref.weights_id != weights_id:
        return None, (
            f"its reference clip ({clip.source}) was made with renderer weights {ref.weights_id!r}, this renderer "
            f"runs {weights_id!r}: store it again (engine avatar reference AVATAR --clip VIDEO)"
        )
    pose = torch.from_numpy(np.asarray(ref.pose, np.float32))  # [T, 7]
    n = pose.shape[0]
    params = MotionParams(
        scale=1.0 + pose[:, 6:7],
        pitch=pose[:, 0],
        yaw=pose[:, 1],
        roll=pose[:, 2],
        t=pose[:, 3:6],
        exp=torch.zeros(n, NUM_KP, 3),  # per-frame expressions are not stored: the emotion is
    )
    mask = torch.zeros(NUM_KP, 1)
    mask[list(EMOTION)] = 1.0
    emotion = torch.from_numpy(np.asarray(ref.emotion, np.float32)) * mask
    return ReferenceMotion(params=params, emotion_offset=emotion, pose=pose), ""


# --- classic (mesh space) -----------------------------------------------------------------------------------------


def _reach() -> np.ndarray:
    """How far ``[21]`` (inter-ocular units) the strongest built-in emotion moves each keypoint at intensity 1, at
    least 0.02: the range the classic warp is built and tested for (to intensity 1.5) without folding. Contempt,
    the one one-sided emotion, is left out, so both sides of the face get the same reach."""
    symmetric = [name for name in EMOTIONS if name != "contempt"]
    moves = [np.linalg.norm(facs.offsets(facs.emotion_vector(name)), axis=1) for name in symmetric]
    return np.maximum(np.max(moves, axis=0), 0.02)


MESH_REACH = _reach()


def mesh_offsets(shape: np.ndarray, neutral: np.ndarray, measured: tuple[int, ...]) -> np.ndarray:
    """Classic keypoint offsets ``[21, 2]`` (inter-ocular units, image axes) that turn ``neutral`` into ``shape``,
    on the measured keypoints only and never on the rigid anchors. An upper lid's y offset is in classic mode's
    lid units (``LID_REF_GAP`` closes any eye): the example's lid gap relative to the neutral one, so a half-closed
    eye in the example half-closes the avatar's, whatever its own lid gap; the lids' x (gaze) is not transferred.

    Each keypoint's offset is shortened to :data:`MESH_REACH` (as far as the strongest action-unit emotion moves
    it): an example and a neutral example of different people, or a template landmark fit, differ by face shape as
    well as expression, and a warp that far folds the face (measured: a smiling astronaut over Grace Hopper's
    neutral photo moved the mouth corners 0.2 inter-ocular distances, twice a built-in smile, and tore the mouth)."""
    shape = np.asarray(shape, dtype=np.float64)
    neutral = np.asarray(neutral, dtype=np.float64)
    out = np.zeros((NUM_KP, 2))
    keep = [k for k in measured if k not in ANCHORS and k not in UPPER_LIDS + LOWER_LIDS]
    out[keep] = shape[keep] - neutral[keep]
    if all(k in measured for k in UPPER_LIDS + LOWER_LIDS):
        for upper, lower in zip(UPPER_LIDS, LOWER_LIDS, strict=True):
            gap_n = neutral[lower, 1] - neutral[upper, 1]
            gap_e = shape[lower, 1] - shape[upper, 1]
            if gap_n > 1e-6:
                out[upper, 1] = float(np.clip((gap_n - gap_e) / gap_n, -0.6, 1.0)) * LID_REF_GAP
    length = np.linalg.norm(out, axis=1, keepdims=True)
    lids = list(UPPER_LIDS)  # in lid units, bounded above
    scale = np.minimum(1.0, MESH_REACH[:, None] / np.maximum(length, 1e-12))
    scale[lids] = 1.0
    return out * scale


class MeshOffsets(NamedTuple):
    offsets: np.ndarray  # [21, 2] inter-ocular units, zero off the measured keypoints
    measured: tuple[int, ...]  # the keypoints the example's landmarks measured (the rest is not evidence)


def mesh_emotions(
    library: MotionLibrary, avatar: str, portrait: np.ndarray | None
) -> tuple[dict[str, MeshOffsets], dict[str, str]]:
    """``(pure offsets per emotion with a stored example, why the others have none)`` for classic motion.
    ``portrait``: the avatar's own aligned shape ``[21, 2]``, the neutral reference of last resort."""
    shapes, missing = _stored_examples(
        library,
        avatar,
        lambda c: c.mesh,
        lambda name, found: f"its stored example ({found[0].source}) has no 68-point landmarks for classic mode",
    )
    stored_neutral = shapes.get("neutral")
    out: dict[str, MeshOffsets] = {}
    for name, mesh in shapes.items():
        measured = mesh.measured
        if mesh.neutral is not None:
            neutral = mesh.neutral
        elif name == "neutral":
            neutral = mesh.shape
        elif stored_neutral is not None:
            neutral = stored_neutral.shape
            measured = tuple(k for k in measured if k in stored_neutral.measured)
        elif portrait is not None:
            neutral = portrait
        else:
            missing[name] = "its stored example has no neutral example and the portrait has no landmarks"
            continue
        out[name] = MeshOffsets(mesh_offsets(mesh.shape, neutral, measured), measured)
    return out, missing


# --- what a session's motion stage reads --------------------------------------------------------------------------

# neural: (stored emotions, the reference clip or None, why there is none)
NeuralStored = tuple[EmotionBank, ReferenceMotion | None, str]
# classic: (pure offsets [21, 2] per emotion with a stored example, why the others have none, the reference clip or
# None, why there is none)
ClassicStored = tuple[dict[str, MeshOffsets], dict[str, str], MeshReference | None, str]


def neural_stored(library: MotionLibrary, avatar: str, source: SourceFace, weights_id: str) -> Watched[NeuralStored]:
    """A session's view of ``avatar``'s examples in the keypoint space of ``weights_id`` (reloaded on change)."""

    def load(lib: MotionLibrary) -> NeuralStored:
        bank = keypoint_bank(lib, avatar, source, weights_id)
        try:
            reference, why = keypoint_reference(lib.reference(avatar), weights_id)
        except LibraryError as exc:
            reference, why = None, str(exc)
        return bank, reference, why

    return Watched(library, load)


def classic_stored(library: MotionLibrary, avatar: str, landmarks: np.ndarray | None) -> Watched[ClassicStored]:
    """A session's view of ``avatar``'s examples in the classic mesh space (reloaded on change); ``landmarks``: the
    avatar's 68 points, whose shape is the neutral reference of last resort."""
    portrait = aligned_shape(landmarks) if landmarks is not None and np.shape(landmarks) == (68, 2) else None

    def load(lib: MotionLibrary) -> ClassicStored:
        emotions, missing = mesh_emotions(lib, avatar, portrait)
        try:
            clip = lib.reference(avatar)
        except LibraryError as exc:
            return emotions, missing, None, str(exc)
        if clip is None:
            why = "no reference clip is stored for this avatar (engine avatar reference AVATAR --clip VIDEO)"
            return emotions, missing, None, why
        if clip.mesh is None:
            return emotions, missing, None, f"its reference clip ({clip.source}) has no 68-point landmarks"
        return emotions, missing, clip.mesh, ""

    return Watched(library, load)
