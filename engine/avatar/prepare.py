"""Turning a user's portrait into an :class:`Avatar`: validate, find and crop the face, read landmarks.

The neural features (F and M outputs) are computed by the neural renderer
(:meth:`engine.render.neural.NeuralRenderer.compute_features`) and cached in the store per weights id."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from engine.avatar.face import FaceLocator
from engine.avatar.geometry import apply_affine, invert_affine
from engine.avatar.image import AvatarError, load_image
from engine.avatar.landmarks import CLASSIC_SCHEMES
from engine.avatar.record import Avatar
from engine.paths import default_weights_dir

logger = logging.getLogger(__name__)

MAX_LANDMARKS = 1000
# number of points -> scheme name, for user landmark files that do not name their scheme
_SCHEMES_BY_COUNT = {203: "lp203", 106: "insightface106", 68: "ibug68"}


class MissingLandmarksError(AvatarError):
    """The avatar must drive classic mode but has no 68-point landmarks; the message says why (no flags:
    the command that catches it knows which options it has)."""


def read_landmarks(path: Path | str) -> tuple[np.ndarray, str]:
    """A user landmark file -> ``([N, 2] float64 image pixels, scheme)``.

    ``.npy``: an ``[N, 2]`` array. ``.json``: ``[[x, y], ...]`` or ``{"points": [[x, y], ...], "scheme": "..."}``.
    """
    path = Path(path)
    if not path.is_file():
        raise AvatarError(f"{path}: landmark file not found")
    scheme = ""
    try:
        if path.suffix.lower() == ".npy":
            data: Any = np.load(path, allow_pickle=False)
        elif path.suffix.lower() == ".json":
            data = json.loads(path.read_text())
            if isinstance(data, dict):
                scheme = str(data.get("scheme", ""))
                data = data.get("points")
        else:
            raise AvatarError(f"{path}: landmark files must be .npy or .json")
        points = np.asarray(data, dtype=np.float64)
    except (ValueError, TypeError, OSError) as exc:
        if isinstance(exc, AvatarError):
            raise
        raise AvatarError(f"{path}: unreadable landmark file ({exc})") from exc
    if points.ndim != 2 or points.shape[1] != 2 or not 2 <= len(points) <= MAX_LANDMARKS:
        raise AvatarError(
            f"{path}: landmarks must be an [N, 2] array with 2 <= N <= {MAX_LANDMARKS}, got shape {points.shape}"
        )
    if not np.isfinite(points).all():
        raise AvatarError(f"{path}: landmarks contain NaN or infinite values")
    return points, scheme or _SCHEMES_BY_COUNT.get(len(points), f"user{len(points)}")


def prepare_avatar(
    image_path: Path | str,
    name: str,
    crop: tuple[int, int, int, int] | None = None,
    landmarks_file: Path | str | None = None,
    detectors_dir: Path | None = None,
    locator: FaceLocator | None = None,
    require_classic: bool = False,
) -> Avatar:
    """Everything computed once per portrait.

    ``crop``: face region ``x, y, w, h``
    in pixels, instead of detection. ``landmarks_file``: the user's landmarks in the photo's pixels (used
    instead of the detector's, and to place the crop when no detector finds the face). ``detectors_dir``:
    where the imported detector ONNX models are (default: the engine home's ``weights/liveportrait/detectors``).
    ``require_classic``: the avatar will drive classic mode, so fail (:class:`MissingLandmarksError`) before
    any feature is computed when it has no 68-point landmarks.
    """
    loaded = load_image(image_path)
    user_points, user_scheme = read_landmarks(landmarks_file) if landmarks_file is not None else (None, "")
    if locator is None:
        locator = FaceLocator(detectors_dir if detectors_dir is not None else default_weights_dir() / "detectors")
    face = locator.locate(loaded.rgb, crop=crop, fallback_points=user_points, source=str(image_path))
    landmarks, scheme, how = face.landmarks, face.landmark_scheme, face.landmark_method
    if user_points is not None:
        landmarks = apply_affine(invert_affine(face.crop_to_image), user_points).astype(np.float32)
        scheme, how = user_scheme, "file"
    logger.info("avatar %r: face by %s, landmarks %s (%s)", name, face.method, scheme or "none", how or "-")
    if require_classic and (landmarks is None or scheme not in CLASSIC_SCHEMES or len(landmarks) != 68):
        where = "in the --crop region" if face.method == "manual" else "on the face it found"
        why = f"no landmarks {where}: {face.landmark_note or 'no landmark source'}"
        if landmarks is not None:
            why = f"its landmarks ({len(landmarks)} points, scheme {scheme!r}) are not a 68-point layout classic reads"
        raise MissingLandmarksError(f"{image_path}: {why}")
    return Avatar(
        name=name,
        content_hash=loaded.content_hash,
        image=loaded.rgb,
        crop=face.crop,
        crop_to_image=face.crop_to_image,
        landmarks=landmarks,
        landmark_scheme=scheme,
        landmark_method=how,
    )
