"""Analytic classic motion: determinism, region sets, jaw follows loudness, blinks, emotions, streaming."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.keypoints import EYE, LIP, NUM_KP
from engine.motion.classic import EMOTIONS, ClassicFeatures, ClassicMotion, ClassicMotionConfig
from engine.motion.control_schema import ControlState
from engine.motion.emotion import EMOTIONS as CONTROL_EMOTIONS
from engine.render.classic_mesh import ANCHORS


def _rows(loud: np.ndarray) -> np.ndarray:
    rows = np.zeros((len(loud), 4), dtype=np.float32)
    rows[:, 0] = loud
    return rows


def _exp(frames: list) -> np.ndarray:
    return torch.cat([f.params.exp for f in frames]).numpy()  # [N, 21, 3]


def _touched(exp: np.ndarray) -> set[int]:
    return {k for k in range(NUM_KP) if np.abs(exp[:, k]).max() > 1e-9}


def test_features_rows_and_streaming_equivalence() -> None:
    rng = np.random.default_rng(0)
    pcm = (0.1 * rng.standard_normal(16000 + 123)).astype(np.float32)
    whole = ClassicFeatures()
    a = np.concatenate([whole.push(pcm), whole.flush()])
    assert a.shape == (int(np.ceil(len(pcm) / 640)), 4)
    parts = ClassicFeatures()
    b = np.concatenate([parts.push(c) for c in np.array_split(pcm, 7)] + [parts.flush()])
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    silent = ClassicFeatures().push(np.zeros(640, dtype=np.float32))
    assert silent[0, 0] == 0.0 and a[0, 0] > 0.5


def test_deterministic_and_seed_dependent() -> None:
    loud = np.abs(np.sin(np.arange(200) / 5.0))
    runs = [_exp(ClassicMotion(ClassicMotionConfig(seed=s)).push(_rows(loud))) for s in (3, 3, 4)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])  # blink times depend on the seed


def test_jaw_follows_loudness_only_on_lip_set() -> None:
    loud = np.zeros(60)
    loud[20:35] = 1.0
    motion = ClassicMotion(ClassicMotionConfig(head_motion=0.0, blink_every_s=1000.0))
    motion.apply_controls(ControlState(gaze=False, blink=False))  # gaze moves the eyes (on by default)
    frames = motion.push(_rows(loud)) + motion.flush()
    assert [f.frame_index for f in frames] == list(range(60))
    exp = _exp(frames)
    jaw = exp[:, 17, 1]  # lower lip drops (y down)
    assert jaw[:18].max() < 1e-6 and jaw[25:34].min() > 0.05
    assert jaw[45:].max() < 0.2 * jaw.max()  # released after the sound
    assert int(np.argmax(np.diff(jaw))) in (18, 19)  # opens at the onset (one frame of anticipation)
    assert _touched(exp) <= set(LIP)


def test_lookahead_and_interrupt() -> None:
    motion = ClassicMotion(ClassicMotionConfig(lookahead_frames=2))
    assert len(motion.push(_rows(np.ones(5)))) == 3
    motion.interrupt()
    later = motion.push(_rows(np.zeros(4)))
    assert [f.frame_index for f in later] == [5, 6]  # dropped rows' indices are skipped
    # the frames after an interrupt start from a closed mouth: the session eases the frames already in flight
    # to rest (streaming.session), so the motion stage resumes from there without a jump
    assert float(later[0].params.exp[0, 17, 1]) == 0.0 and float(later[1].params.exp[0, 17, 1]) == 0.0


def test_blinks_happen_on_eye_set() -> None:
    motion = ClassicMotion(ClassicMotionConfig(head_motion=0.0, blink_every_s=2.0))
    exp = _exp(motion.push(_rows(np.zeros(500))))
    closure = exp[:, 11, 1]
    starts = np.nonzero((closure[1:] > 0) & (closure[:-1] == 0))[0]
    assert 4 <= len(starts) <= 20
    assert _touched(exp) <= set(EYE)


@pytest.mark.parametrize("name", sorted(set(EMOTIONS) - {"neutral"}))
def test_emotions_spare_the_head_anchors_and_ramp(name: str) -> None:
    motion = ClassicMotion(ClassicMotionConfig(head_motion=0.0, blink_every_s=1000.0, emotion_ramp_frames=10))
    motion.apply_controls(ControlState(gaze=False, blink=False))
    motion.set_emotion(name, 1.5)
    exp = _exp(motion.push(_rows(np.zeros(30))))
    # the classic renderer fits the head pose to the anchors: an expression must never move them
    assert _touched(exp) and not _touched(exp) & set(ANCHORS)
    size = np.abs(exp).sum(axis=(1, 2))
    assert 0 < size[0] < size[5] < size[12] and size[12] == pytest.approx(size[-1])


def test_emotion_specifics_and_bad_controls() -> None:
    def emotion_exp(name: str) -> np.ndarray:
        motion = ClassicMotion(ClassicMotionConfig(head_motion=0.0, emotion_ramp_frames=1))
        motion.apply_controls(ControlState(gaze=False, blink=False))
        motion.set_emotion(name, 1.0)
        return _exp(motion.push(_rows(np.zeros(3))))[-1]

    happy, angry, surprised = emotion_exp("happy"), emotion_exp("angry"), emotion_exp("surprised")
    assert happy[6, 1] < 0 and happy[12, 1] < 0 and happy[6, 0] < 0 < happy[12, 0]  # corners up and out
    assert angry[1, 1] > 0 and angry[2, 1] > 0  # brows down
    assert surprised[1, 1] < 0 and surprised[17, 1] > 0  # brows up, mouth open
    fear, contempt = emotion_exp("fear"), emotion_exp("contempt")
    assert fear[1, 1] < 0 and fear[6, 0] < 0 < fear[12, 0]  # brows up, lips stretched
    assert contempt[12, 1] < 0 and not contempt[6].any()  # one-sided smirk
    motion = ClassicMotion()
    with pytest.raises(ValueError, match="unknown emotion"):
        motion.set_emotion("bored")
    with pytest.raises(ValueError, match="intensity"):
        motion.set_emotion("happy", 2.0)
    with pytest.raises(ValueError, match="ClassicFeatures rows"):
        motion.push(np.zeros((3, 80), dtype=np.float32))


def test_classic_mode_covers_every_emotion_the_controls_accept() -> None:

    assert set(EMOTIONS) == set(CONTROL_EMOTIONS)
