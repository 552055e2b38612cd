"""Classic renderer invariants with the eye and mouth layers: exact identity on a photo with an open mouth, no
seams under pure head motion, batches of different avatars, faces leaving the frame, bad landmarks."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import engine.render.classic as classic
from engine.avatar.default import default_avatar
from engine.avatar.face import FaceLocator
from engine.avatar.prepare import prepare_avatar
from engine.keypoints import MotionParams
from engine.render.base import PreparedAvatar
from engine.render.classic import ClassicRenderer, face_size

LANDMARKS = Path(__file__).resolve().parents[2] / "data" / "landmarks" / "astronaut_68.json"


def _params(exp: torch.Tensor | None = None, **pose: float) -> MotionParams:
    return MotionParams(
        torch.ones(1, 1),
        torch.tensor([pose.get("pitch", 0.0)]),
        torch.tensor([pose.get("yaw", 0.0)]),
        torch.tensor([pose.get("roll", 0.0)]),
        torch.tensor([[pose.get("tx", 0.0), pose.get("ty", 0.0), 0.0]]),
        exp if exp is not None else torch.zeros(1, 21, 3),
    )


@pytest.fixture(scope="module")
def renderer() -> ClassicRenderer:
    return ClassicRenderer()


@pytest.fixture(scope="module")
def astronaut(renderer: ClassicRenderer) -> PreparedAvatar:
    data = pytest.importorskip("skimage.data")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "astronaut.png"
        cv2.imwrite(str(path), cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))
        avatar = prepare_avatar(path, "astronaut", landmarks_file=LANDMARKS, locator=FaceLocator(None, False))
    return renderer.prepare(avatar)


def test_identity_is_exact_on_a_photo_with_teeth_showing(renderer: ClassicRenderer, astronaut) -> None:
    out = renderer.render([astronaut], renderer.drive(astronaut, _params()))
    portrait = torch.from_numpy(astronaut.avatar.crop).permute(2, 0, 1).float() / 255
    assert float((out[0] - portrait).abs().max()) < 1e-4  # the layers reproduce what they cover


def test_layers_leave_no_seam_when_only_the_head_moves(
    renderer: ClassicRenderer, astronaut, monkeypatch: pytest.MonkeyPatch
) -> None:
    default = renderer.prepare(default_avatar())
    for prepared in (default, astronaut):
        kp = renderer.drive(prepared, _params(roll=4.0, yaw=3.0, pitch=-2.0, tx=0.02, ty=-0.01))
        layered = renderer.render([prepared], kp)
        with monkeypatch.context() as m:  # the warp alone: eyeballs, lids and mouth interior off
            m.setattr(classic, "eye_layers", lambda *args, **kwargs: [])
            m.setattr(classic, "mouth_layers", lambda *args, **kwargs: [])
            warped = renderer.render([prepared], kp)
        # a rigid head motion moves eyeball, lids and mouth interior exactly as the warp moves the face;
        # measured at most 0.0042 (0..1), mean 3e-6: the same pixels resampled through two paths
        assert float((layered - warped).abs().max()) < 0.02
        assert float((layered - warped).abs().mean()) < 3e-5


def test_a_batch_of_different_avatars_renders_each_as_alone(renderer: ClassicRenderer, astronaut) -> None:
    default = renderer.prepare(default_avatar())
    exp = torch.zeros(1, 21, 3)
    exp[0, [17, 20, 19], 1] = torch.tensor([0.2, 0.19, 0.17])  # jaw drop
    exp[0, 11, 1] = 0.12  # a lid half down
    exp[0, 18, 1] = 0.1  # brows down
    kps, singles = [], []
    for prepared in (default, astronaut):
        kp = renderer.drive(prepared, _params(exp * face_size(prepared.source), roll=2.0))
        kps.append(kp)
        singles.append(renderer.render([prepared], kp)[0])
    both = renderer.render([default, astronaut], torch.cat(kps))
    for i in range(2):
        torch.testing.assert_close(both[i], singles[i], atol=2e-5, rtol=0)


def test_a_face_moved_out_of_the_frame_still_renders(renderer: ClassicRenderer) -> None:
    prepared = renderer.prepare(default_avatar())
    out = renderer.render([prepared], renderer.drive(prepared, _params(tx=1.6)))
    assert out.shape == (1, 3, 512, 512) and bool(torch.isfinite(out).all())


def test_bad_landmarks_are_refused_with_a_clear_error(renderer: ClassicRenderer) -> None:
    avatar = default_avatar()
    with pytest.raises(ValueError, match="NaN or infinite"):
        renderer.prepare(dataclasses.replace(avatar, landmarks=np.full((68, 2), np.nan, dtype=np.float32)))
    with pytest.raises(ValueError, match="eyes at least 8 px apart"):
        renderer.prepare(dataclasses.replace(avatar, landmarks=np.full((68, 2), 200.0, dtype=np.float32)))


def test_the_astronaut_fixture_agrees_with_the_independent_hand_points() -> None:
    """The 68 hand-placed points vs the five points + chin annotated separately for the landmark tests."""
    hand = json.loads((LANDMARKS.parent / "hand_points.json").read_text())["photos"]["astronaut"]
    pts = np.array(json.loads(LANDMARKS.read_text())["points"], dtype=np.float64)
    ours = {
        "eye_left": pts[36:42].mean(axis=0),
        "eye_right": pts[42:48].mean(axis=0),
        "nose_tip": pts[30],
        "mouth_left": pts[48],
        "mouth_right": pts[54],
        "chin": pts[8],
    }
    iod = float(np.linalg.norm(ours["eye_right"] - ours["eye_left"]))
    for name, point in ours.items():
        assert np.linalg.norm(point - np.array(hand[name])) < 0.06 * iod, name  # measured <= 2.1 px of 45.2
