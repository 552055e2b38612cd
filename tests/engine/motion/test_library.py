"""The motion library: stored emotion examples and reference clips, scopes, and the offsets sessions build."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.avatar.default import default_landmarks
from engine.keypoints import EMOTION, NUM_KP, MotionParams, SourceFace, keypoints_from_params
from engine.motion.library import (
    ALL_MEASURED,
    MESH_REACH,
    TEMPLATE_MEASURED,
    EmotionExample,
    KeypointEmotion,
    KeypointReference,
    LibraryError,
    MeshEmotion,
    MeshReference,
    MotionLibrary,
    ReferenceClip,
    Watched,
    aligned_shape,
    keypoint_bank,
    keypoint_reference,
    mesh_emotions,
    mesh_offsets,
)
from engine.render.classic_mesh import ANCHORS, LID_REF_GAP


def _source(seed: int = 0) -> SourceFace:
    g = torch.Generator().manual_seed(seed)
    params = MotionParams(
        torch.ones(1, 1), torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1, 3),
        torch.randn(1, NUM_KP, 3, generator=g) * 0.02,
    )  # fmt: skip
    kp = torch.randn(NUM_KP, 3, generator=g) * 0.3
    return SourceFace(kp, params, keypoints_from_params(kp[None], params)[0])


def _kp(seed: int, weights: str = "w1", neutral: bool = True) -> KeypointEmotion:
    rng = np.random.default_rng(seed)
    delta = rng.normal(0, 0.03, (NUM_KP, 3)).astype(np.float32)
    own = rng.normal(0, 0.03, (NUM_KP, 3)).astype(np.float32)
    return KeypointEmotion(weights, False, delta, own if neutral else None)


def test_emotions_round_trip_with_scopes_and_versions(tmp_path: Path) -> None:
    lib = MotionLibrary(tmp_path / "lib")
    assert lib.version() == "" and lib.emotion("happy") is None
    mesh = MeshEmotion(np.ones((NUM_KP, 2), np.float32), None, TEMPLATE_MEASURED)
    lib.put_emotion(EmotionExample("happy", None, "g.png", None, 1, keypoints=_kp(1), mesh=mesh))
    v1 = lib.version()
    lib.put_emotion(EmotionExample("happy", "anna", "a.mp4", "n.png", 12, keypoints=_kp(2)))
    assert lib.version() not in ("", v1)  # running sessions see that something changed
    mine, shared = lib.candidates("happy", "anna")
    assert (mine.source, mine.frames, mine.avatar) == ("a.mp4", 12, "anna") and shared.source == "g.png"
    assert lib.emotion("happy", "bob").source == "g.png"  # another avatar sees the global one
    np.testing.assert_array_equal(shared.mesh.shape, mesh.shape)
    assert shared.mesh.measured == TEMPLATE_MEASURED and mine.mesh is None
    np.testing.assert_array_equal(mine.keypoints.neutral, _kp(2).neutral)
    assert {e.source for e in lib.emotions(every_scope=True)} == {"g.png", "a.mp4"}
    assert [e.source for e in lib.emotions("anna")] == ["a.mp4"]
    assert lib.remove_emotion("happy", "anna") and not lib.remove_emotion("happy", "anna")
    assert lib.emotion("happy", "anna").source == "g.png"
    with pytest.raises(ValueError, match="unknown emotion"):
        lib.emotion("bored")
    with pytest.raises(LibraryError, match="invalid avatar name"):
        lib.emotion("happy", "../x")
    (tmp_path / "lib" / "emotions" / "global" / "happy.safetensors").write_bytes(b"broken")
    with pytest.raises(LibraryError, match="damaged"):
        lib.emotion("happy")


def test_reference_round_trip(tmp_path: Path) -> None:
    lib = MotionLibrary(tmp_path)
    pose = np.random.default_rng(0).normal(0, 3, (9, 7)).astype(np.float32)
    ref = ReferenceClip(
        "anna", "clip.mp4", 9, 25.0,
        keypoints=KeypointReference("w1", True, pose, np.ones((NUM_KP, 3), np.float32)),
        mesh=MeshReference(pose[:, :6], np.zeros((NUM_KP, 2), np.float32), ALL_MEASURED),
        stats={"mesh": {"roll": {"std": 1.0}}},
    )  # fmt: skip
    lib.put_reference(ref)
    back = lib.reference("anna")
    assert back is not None and back.frames == 9 and back.stats == {"mesh": {"roll": {"std": 1.0}}}
    motion, why = keypoint_reference(back, "w1")
    assert why == "" and motion is not None
    torch.testing.assert_close(motion.pose, torch.from_numpy(pose))
    outside = [k for k in range(NUM_KP) if k not in EMOTION]
    assert torch.all(motion.emotion_offset[outside] == 0) and torch.all(motion.emotion_offset[list(EMOTION)] == 1)
    assert keypoint_reference(back, "w2")[0] is None and "w2" in keypoint_reference(back, "w2")[1]
    assert "no reference clip" in keypoint_reference(lib.reference("bob"), "w1")[1]
    assert lib.remove_reference("anna") and lib.reference("anna") is None


def test_keypoint_bank_pure_and_absolute_offsets(tmp_path: Path) -> None:
    lib = MotionLibrary(tmp_path)
    source = _source()
    src = source.params.exp[0].numpy()
    happy, sad = _kp(1), _kp(2, neutral=False)
    lib.put_emotion(EmotionExample("happy", None, "h.png", "n.png", 1, keypoints=happy))
    lib.put_emotion(EmotionExample("sad", None, "s.png", None, 1, keypoints=sad))
    lib.put_emotion(EmotionExample("angry", None, "a.png", None, 1, keypoints=_kp(3, weights="other")))
    bank = keypoint_bank(lib, "anna", source, "w1")
    mask = np.zeros((NUM_KP, 1))
    mask[list(EMOTION)] = 1
    assert bank.stored == {"happy", "sad"}
    # pure: the example minus its own neutral example; absolute: the example in place of the portrait
    np.testing.assert_allclose(bank.pure("happy").numpy(), (happy.delta - happy.neutral) * mask, atol=1e-6)
    np.testing.assert_allclose(bank.get("happy").numpy(), (happy.delta - src) * mask, atol=1e-6)
    # no neutral example and no stored neutral emotion: the portrait is neutral
    np.testing.assert_allclose(bank.pure("sad").numpy(), (sad.delta - src) * mask, atol=1e-6)
    assert "renderer weights 'other'" in bank.why_missing("angry") and "engine emotion add" in bank.why_missing("fear")
    # a stored neutral emotion becomes the reference of examples without their own
    calm = _kp(4, neutral=False)
    lib.put_emotion(EmotionExample("neutral", None, "c.png", None, 1, keypoints=calm))
    bank = keypoint_bank(lib, "anna", source, "w1")
    np.testing.assert_allclose(bank.pure("sad").numpy(), (sad.delta - calm.delta) * mask, atol=1e-6)
    assert float(bank.pure("neutral").abs().max()) == 0.0  # pure neutral adds nothing


def test_watched_reloads_only_after_a_change(tmp_path: Path) -> None:
    lib = MotionLibrary(tmp_path)
    loads = []
    watched = Watched(lib, lambda library: loads.append(library.version()) or len(loads))
    assert watched.poll() == 1 and watched.poll() is None
    lib.put_emotion(EmotionExample("sad", None, "s.png", None, 1, keypoints=_kp(2)))
    assert watched.poll() == 2 and watched.poll() is None


def test_aligned_shape_ignores_position_size_and_roll() -> None:
    lm = default_landmarks().astype(np.float64)
    angle = np.deg2rad(17.0)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = (lm - 256) @ rot.T * 0.6 + [40.0, -25.0]
    np.testing.assert_allclose(aligned_shape(moved), aligned_shape(lm), atol=1e-9)
    shape = aligned_shape(lm)
    left, right = (shape[11] + shape[13]) / 2, (shape[15] + shape[16]) / 2  # lid keypoints around each eye
    assert abs(float(np.linalg.norm(right - left)) - 1.0) < 0.1  # inter-ocular units


def test_mesh_offsets_measured_keypoints_anchors_and_lids() -> None:
    neutral = aligned_shape(default_landmarks())
    shape = neutral.copy()
    shape[:, 1] += 0.05  # everything moves down ...
    shape[11, 1] = shape[13, 1] - 0.5 * (neutral[13, 1] - neutral[11, 1])  # ... and one lid half closes
    out = mesh_offsets(shape, neutral, ALL_MEASURED)
    assert np.all(out[list(ANCHORS)] == 0)  # the head-pose anchors never move by expression
    assert out[6, 1] == pytest.approx(0.05) and out[17, 1] == pytest.approx(0.05)
    assert out[11, 1] == pytest.approx(0.5 * LID_REF_GAP, rel=0.02)  # half the lid gap, in classic lid units
    assert out[11, 0] == 0.0 and out[15, 1] == pytest.approx(0.0, abs=0.02)  # no gaze; the other eye kept its gap
    template = mesh_offsets(shape, neutral, TEMPLATE_MEASURED)
    assert np.all(template[[1, 2, 11, 15, 18]] == 0)  # a template fit measures no brows or lids
    assert template[6, 1] == pytest.approx(0.05)


def test_mesh_offsets_stay_within_the_reach_of_the_built_in_emotions() -> None:
    neutral = aligned_shape(default_landmarks())
    shape = neutral.copy()
    shape[6, 0] -= 0.3  # a mouth corner 0.3 inter-ocular distances out: a wider face, not an expression
    shape[12, 0] += 0.3
    shape[17, 1] += 0.05  # the lower lip a little down: within reach, kept as it is
    out = mesh_offsets(shape, neutral, ALL_MEASURED)
    # shortened to as far as the strongest built-in emotion moves them (a smile: 0.1), both sides alike
    assert np.linalg.norm(out[6]) == pytest.approx(MESH_REACH[6]) and MESH_REACH[6] == pytest.approx(MESH_REACH[12])
    assert 0.05 < MESH_REACH[6] < 0.3 and out[6, 0] < 0 < out[12, 0]  # the direction is kept
    assert out[17, 1] == pytest.approx(0.05)


def test_mesh_emotions_neutral_reference(tmp_path: Path) -> None:
    lib = MotionLibrary(tmp_path)
    neutral = aligned_shape(default_landmarks()).astype(np.float32)
    smile = neutral.copy()
    smile[[6, 12], 1] -= 0.06
    lib.put_emotion(EmotionExample("happy", None, "h.png", "n.png", 1, mesh=MeshEmotion(smile, neutral, ALL_MEASURED)))
    lib.put_emotion(EmotionExample("sad", None, "s.png", None, 1, mesh=MeshEmotion(smile, None, ALL_MEASURED)))
    offsets, missing = mesh_emotions(lib, "anna", neutral + 0.01)
    assert offsets["happy"].offsets[6, 1] == pytest.approx(-0.06, abs=1e-6)
    assert offsets["sad"].offsets[6, 1] == pytest.approx(-0.07, abs=1e-6)  # against the portrait's own shape
    assert offsets["happy"].measured == ALL_MEASURED
    assert "no stored example" in missing["angry"]
    offsets, missing = mesh_emotions(lib, "anna", None)
    assert "happy" in offsets and "sad" in missing  # no neutral example and no portrait landmarks
