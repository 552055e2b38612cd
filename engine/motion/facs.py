"""Facial action units (FACS) on the classic 21-keypoint layout, and the 8 control emotions as AU combinations.

Each action unit is a set of keypoint offsets ``(dx, dy)`` in inter-ocular distances (image axes: x right, y down)
at weight 1. "L" / "R" are the image-left / image-right halves of the face (keypoint roles: see
``engine.render.classic.keypoints_from_landmarks``). The classic renderer's dense mesh
(``engine.render.classic_mesh``) turns these few offsets into the AU's shape on the face: e.g. the glabella
keypoint is the inner end of both brows (AU1 / AU4 move it, the brow keypoints the brow middle), the x offset of
an upper-lid keypoint is the gaze and its y offset is in units of ``LID_REF_GAP`` (that much closes any eye).

Region mixing follows the FACS split of the face: :data:`UPPER_FACE` action units (brows, lids, cheek raiser)
come from ``eyes_emotion``, :data:`LOWER_FACE` ones (nose, lips, jaw) from ``mouth_emotion``. No action unit
moves the rigid anchor keypoints (forehead, jaw sides, nose bridge, neck) the renderer fits the head pose to.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from engine.keypoints import NUM_KP
from engine.motion.emotion import EMOTIONS as EMOTION_NAMES

Offsets = dict[int, tuple[float, float]]

# keypoints: 1/2 brow middles, 18 glabella (inner brow ends), 11/15 upper lids, 13/16 lower lids, 4/5 cheeks,
# 3 nose, 6/12 mouth corners, 14 upper lip, 17 lower lip, 20 below the lower lip, 19 chin
ACTION_UNITS: dict[str, Offsets] = {
    # --- upper face ---
    "AU1": {18: (0.0, -0.11), 1: (0.0, -0.055), 2: (0.0, -0.055)},  # inner brow raiser (outer end stays)
    "AU2": {1: (0.0, -0.05), 2: (0.0, -0.05)},  # outer brow raiser (inner end stays)
    "AU4": {18: (0.0, 0.12), 1: (0.05, 0.06), 2: (-0.05, 0.06), 11: (0.0, 0.02), 15: (0.0, 0.02)},  # brow lowerer
    "AU5": {11: (0.0, -0.05), 15: (0.0, -0.05)},  # upper lid raiser (shows sclera above the iris)
    "AU6": {4: (0.0, -0.07), 5: (0.0, -0.07), 13: (0.0, -0.03), 16: (0.0, -0.03)},  # cheek raiser
    "AU7": {13: (0.0, -0.04), 16: (0.0, -0.04), 11: (0.0, 0.025), 15: (0.0, 0.025)},  # lid tightener
    "AU41": {11: (0.0, 0.035), 15: (0.0, 0.035)},  # lid droop
    # --- lower face ---
    "AU9": {3: (0.0, -0.05), 4: (0.0, -0.03), 5: (0.0, -0.03), 14: (0.0, -0.025)},  # nose wrinkler
    "AU10": {14: (0.0, -0.055), 6: (0.0, -0.015), 12: (0.0, -0.015), 3: (0.0, -0.01)},  # upper lip raiser
    "AU12": {6: (-0.065, -0.065), 12: (0.065, -0.065)},  # lip corner puller
    "AU12R": {12: (0.045, -0.055)},  # one-sided lip corner puller
    "AU14R": {12: (0.045, -0.02)},  # one-sided dimpler: the corner pulled back
    "AU15": {6: (0.012, 0.055), 12: (-0.012, 0.055)},  # lip corner depressor
    "AU17": {20: (0.0, -0.035), 17: (0.0, -0.015)},  # chin raiser (pushes the lower lip up)
    "AU20": {6: (-0.065, 0.012), 12: (0.065, 0.012)},  # lip stretcher
    "AU23": {6: (0.025, 0.0), 12: (-0.025, 0.0)},  # lip tightener (narrows the mouth)
    "AU24": {14: (0.0, 0.012), 17: (0.0, -0.012), 20: (0.0, -0.025), 6: (0.01, 0.0), 12: (-0.01, 0.0)},  # presser
    "AU25": {14: (0.0, -0.018), 17: (0.0, 0.035), 20: (0.0, 0.025)},  # lips part
    "AU26": {17: (0.0, 0.2), 20: (0.0, 0.19), 19: (0.0, 0.17), 6: (0.02, 0.08), 12: (-0.02, 0.08), 14: (0.0, -0.016)},
}  # fmt: skip

UPPER_FACE: tuple[str, ...] = ("AU1", "AU2", "AU4", "AU5", "AU6", "AU7", "AU41")
LOWER_FACE: tuple[str, ...] = tuple(name for name in ACTION_UNITS if name not in UPPER_FACE)
AU_NAMES: tuple[str, ...] = tuple(ACTION_UNITS)

# Each emotion as AU weights at intensity 1 (after Ekman & Friesen's prototypes, tuned on contact sheets).
EMOTION_AUS: dict[str, dict[str, float]] = {
    "neutral": {},
    "happy": {"AU6": 1.0, "AU12": 1.2, "AU25": 1.0, "AU26": 0.15},
    "sad": {"AU1": 1.3, "AU4": 0.4, "AU41": 0.8, "AU15": 1.5, "AU17": 1.0},
    "angry": {"AU4": 1.2, "AU5": 0.3, "AU7": 1.0, "AU23": 0.6, "AU24": 1.0},
    "surprised": {"AU1": 1.0, "AU2": 1.0, "AU5": 1.0, "AU25": 1.0, "AU26": 0.6, "AU23": 0.5},
    "fear": {"AU1": 1.0, "AU2": 0.6, "AU4": 0.5, "AU5": 1.0, "AU20": 1.0, "AU25": 1.0, "AU26": 0.12},
    "disgusted": {"AU4": 0.5, "AU6": 0.5, "AU9": 1.0, "AU10": 1.0, "AU15": 0.4, "AU17": 0.5},
    "contempt": {"AU14R": 1.5, "AU12R": 1.0},
}

# the pattern matrix: AU weights [n_au] @ PATTERNS [n_au, 21, 2] -> keypoint offsets [21, 2]
PATTERNS = np.zeros((len(AU_NAMES), NUM_KP, 2))
for _i, _name in enumerate(AU_NAMES):
    for _k, (_dx, _dy) in ACTION_UNITS[_name].items():
        PATTERNS[_i, _k] = (_dx, _dy)
_UPPER_MASK = np.array([name in UPPER_FACE for name in AU_NAMES], dtype=np.float64)


def au_vector(weights: Mapping[str, float]) -> np.ndarray:
    """AU name -> weight mapping as a vector ``[n_au]`` in :data:`AU_NAMES` order."""
    vec = np.zeros(len(AU_NAMES))
    for name, w in weights.items():
        if name not in ACTION_UNITS:
            raise ValueError(f"unknown action unit {name!r}; known: {list(AU_NAMES)}")
        vec[AU_NAMES.index(name)] += w
    return vec


def emotion_vector(name: str) -> np.ndarray:
    """AU weights ``[n_au]`` of one emotion at intensity 1."""
    if name not in EMOTION_AUS:
        raise ValueError(f"unknown emotion {name!r}; choose from {list(EMOTION_NAMES)}")
    return au_vector(EMOTION_AUS[name])


def mixed_vector(
    emotion: str,
    intensity: float = 1.0,
    emotion_b: str | None = None,
    mix: float = 0.0,
    mouth_emotion: str | None = None,
    eyes_emotion: str | None = None,
) -> np.ndarray:
    """AU weights of a control state: interpolation (``emotion`` -> ``emotion_b`` by ``mix``), then region
    mixing (upper-face AUs from ``eyes_emotion``, lower-face ones from ``mouth_emotion``), times ``intensity``."""
    vec = emotion_vector(emotion)
    if emotion_b is not None:
        vec = vec * (1.0 - mix) + emotion_vector(emotion_b) * mix
    if eyes_emotion is not None:
        vec = vec * (1.0 - _UPPER_MASK) + emotion_vector(eyes_emotion) * _UPPER_MASK
    if mouth_emotion is not None:
        vec = vec * _UPPER_MASK + emotion_vector(mouth_emotion) * (1.0 - _UPPER_MASK)
    return vec * intensity


def offsets(vector: np.ndarray) -> np.ndarray:
    """AU weights ``[n_au]`` -> keypoint offsets ``[21, 2]`` in inter-ocular distances."""
    return np.tensordot(np.asarray(vector, dtype=np.float64), PATTERNS, axes=1)


def upper_face_keypoints() -> set[int]:
    """Keypoints the upper-face AUs move (brows, glabella, lids, cheeks)."""
    return {k for name in UPPER_FACE for k in ACTION_UNITS[name]}


def lower_face_keypoints() -> set[int]:
    """Keypoints the lower-face AUs move (nose, cheeks, lips, jaw)."""
    return {k for name in LOWER_FACE for k in ACTION_UNITS[name]}


if set(EMOTION_AUS) != set(EMOTION_NAMES):  # pragma: no cover - a vocabulary mismatch is a programming error
    raise RuntimeError(f"classic AU emotions {sorted(EMOTION_AUS)} != control emotions {sorted(EMOTION_NAMES)}")


def rest_offsets(keypoints: np.ndarray) -> np.ndarray:
    """Offsets ``[21, 2]`` (inter-ocular units) that bring a portrait's own lower-face expression to a neutral
    face, estimated from its classic keypoints ``[21, 2]`` (any units): a smile (mouth corners above the lip
    midline, with its cheek raise) and parted lips. Zero for a portrait that already looks neutral.

    Used when ``pure_emotion`` is off: the emotion then replaces the portrait's expression instead of adding to
    it (a sad face on a smiling photo is sad, not a smile with sad brows)."""
    kp = np.asarray(keypoints, dtype=np.float64)[:, :2]
    iod = float(np.linalg.norm((kp[15] + kp[16]) / 2 - (kp[11] + kp[13]) / 2))
    if iod <= 0:
        return np.zeros((NUM_KP, 2))
    gap = (kp[17, 1] - kp[14, 1]) / iod
    opening = max(0.0, gap - 0.03)
    # where the lips will meet once closed (the lower lip does most of the moving), against the corners
    seam = kp[14, 1] + 0.2 * max(0.0, gap) * iod
    rise = (seam - 0.5 * (kp[6, 1] + kp[12, 1])) / iod  # > 0: corners above the seam
    smile = max(0.0, rise - 0.02)
    out = np.zeros((NUM_KP, 2))
    out[6] = (0.6 * smile, smile)  # corners down and back in
    out[12] = (-0.6 * smile, smile)
    cheek = min(smile / 0.065, 1.5)  # the smile's share of AU6
    out[[4, 5], 1] += 0.04 * cheek
    out[[13, 16], 1] += 0.02 * cheek
    out[17, 1] -= 0.9 * opening  # lips together: mostly the lower lip rises
    out[14, 1] += 0.2 * opening
    out[20, 1] -= 0.6 * opening
    return out
