"""Action units of classic mode: which keypoints each moves, emotion prototypes, interpolation, region mixing,
and the estimate of a portrait's own smile (pure_emotion off)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.avatar.default import default_avatar
from engine.motion import facs
from engine.motion.emotion import EMOTIONS
from engine.render.classic import source_face
from engine.render.classic_mesh import ANCHORS

UPPER_KEYPOINTS = {1, 2, 18, 11, 15, 13, 16, 4, 5}  # brows, glabella, lids, cheeks
LOWER_KEYPOINTS = {3, 4, 5, 6, 12, 14, 17, 19, 20}  # nose, cheeks, mouth, jaw


def test_action_units_move_their_half_of_the_face_and_never_the_anchors() -> None:
    assert facs.upper_face_keypoints() <= UPPER_KEYPOINTS
    assert facs.lower_face_keypoints() <= LOWER_KEYPOINTS
    for name, offsets in facs.ACTION_UNITS.items():
        assert offsets and not set(offsets) & set(ANCHORS), name
    assert set(facs.UPPER_FACE) | set(facs.LOWER_FACE) == set(facs.AU_NAMES)
    assert set(facs.EMOTION_AUS) == set(EMOTIONS)


def test_emotion_prototypes_have_their_signature_action_units() -> None:
    def off(name: str) -> np.ndarray:
        return facs.offsets(facs.emotion_vector(name))

    happy, sad, angry, surprised = off("happy"), off("sad"), off("angry"), off("surprised")
    fear, disgusted, contempt = off("fear"), off("disgusted"), off("contempt")
    assert not off("neutral").any()
    assert happy[6, 1] < 0 and happy[12, 1] < 0 and happy[6, 0] < 0 < happy[12, 0] and happy[4, 1] < 0  # AU6+12
    assert sad[18, 1] < sad[1, 1] and sad[6, 1] > 0 and sad[12, 1] > 0  # inner brows up (AU1), corners down (AU15)
    assert angry[18, 1] > 0 and angry[1, 0] > 0 > angry[2, 0] and angry[13, 1] < 0  # brows down & in, lids tight
    assert surprised[1, 1] < 0 and surprised[18, 1] < 0 and surprised[11, 1] < 0 and surprised[17, 1] > 0.1
    assert fear[1, 1] < 0 and fear[6, 0] < 0 < fear[12, 0] and fear[11, 1] < 0  # brows up, lips stretched, lids up
    assert disgusted[3, 1] < 0 and disgusted[14, 1] < 0  # nose wrinkle, upper lip raised
    assert contempt[12, 1] < 0 and not contempt[6].any()  # one-sided


def test_interpolation_region_mixing_and_intensity() -> None:
    happy, sad = facs.emotion_vector("happy"), facs.emotion_vector("sad")
    np.testing.assert_allclose(facs.mixed_vector("happy", 1.0, "sad", 0.5), 0.5 * (happy + sad))
    np.testing.assert_allclose(facs.mixed_vector("happy", 0.4), 0.4 * happy)
    upper = np.array([n in facs.UPPER_FACE for n in facs.AU_NAMES])
    mixed = facs.mixed_vector("neutral", 1.0, mouth_emotion="happy", eyes_emotion="sad")
    np.testing.assert_allclose(mixed[upper], sad[upper])
    np.testing.assert_allclose(mixed[~upper], happy[~upper])
    # region mixing overrides the interpolated emotion in its region only
    over = facs.mixed_vector("angry", 1.0, "fear", 0.5, mouth_emotion="happy")
    np.testing.assert_allclose(over[upper], facs.mixed_vector("angry", 1.0, "fear", 0.5)[upper])
    with pytest.raises(ValueError, match="unknown emotion"):
        facs.emotion_vector("bored")
    with pytest.raises(ValueError, match="unknown action unit"):
        facs.au_vector({"AU99": 1.0})


def test_rest_offsets_undo_a_smile_and_leave_a_neutral_face() -> None:
    avatar = default_avatar()
    assert avatar.landmarks is not None
    kp = source_face(avatar.landmarks, 512).kp_source.numpy()
    np.testing.assert_array_equal(facs.rest_offsets(kp), np.zeros((21, 2)))
    smiling = kp.copy()
    iod = float(np.linalg.norm((kp[15, :2] + kp[16, :2]) / 2 - (kp[11, :2] + kp[13, :2]) / 2))
    smiling[[6, 12], 1] -= 0.1 * iod  # corners well above the lip midline
    smiling[17, 1] += 0.12 * iod  # and the lips parted
    rest = facs.rest_offsets(smiling)
    assert rest[6, 1] > 0.05 and rest[12, 1] > 0.05 and rest[6, 0] > 0 > rest[12, 0]  # corners down and in
    assert rest[17, 1] < -0.05 and rest[14, 1] > 0  # lips back together
    assert not rest[[1, 2, 18, 11, 15]].any()  # the brows and upper lids are left alone
