"""The drawn default avatar: shape, determinism, and landmarks that sit on the drawn features."""

from __future__ import annotations

import numpy as np

from engine.avatar.default import default_avatar, default_portrait


def test_portrait_shapes_and_copies() -> None:
    image, landmarks, scheme = default_portrait()
    assert image.shape == (512, 512, 3) and image.dtype == np.uint8
    assert landmarks.shape == (68, 2) and landmarks.dtype == np.float32
    assert scheme == "engine68"
    assert (landmarks >= 0).all() and (landmarks < 512).all()
    image[:] = 0  # callers get copies: the cache must be unaffected
    again, _, _ = default_portrait()
    assert again.std() > 20


def test_deterministic_avatar_record() -> None:
    a, b = default_avatar(), default_avatar()
    assert a.content_hash == b.content_hash and np.array_equal(a.crop, b.crop)
    assert a.landmarks is not None and a.landmark_scheme == "engine68"


def test_landmarks_sit_on_features() -> None:
    image, lm, _ = default_portrait()
    luma = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])

    def at(p: np.ndarray) -> float:
        return float(luma[round(p[1]), round(p[0])])

    skin = at((lm[3] + lm[31] + lm[41]) / 3)  # cheek
    left_iris = (lm[36] + lm[39]) / 2
    right_iris = (lm[42] + lm[45]) / 2
    assert at(left_iris) < skin - 60 and at(right_iris) < skin - 60  # pupils are dark
    assert at(lm[19]) < skin - 60 and at(lm[24]) < skin - 60  # brows are dark
    lip = image[round(lm[57][1]) - 3, round(lm[57][0])].astype(int)
    assert lip[0] - lip[2] > 60  # the lower lip is red
    assert abs(lm[:, 0].mean() - 255.5) < 1.0  # the layout is symmetric about the centre
