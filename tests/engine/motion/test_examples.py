"""Motion from examples: reading photos and clips, expressions in both spaces, head pose by solvePnP."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from engine.avatar.default import default_avatar
from engine.avatar.face import FaceLocator
from engine.keypoints import rotation_matrix
from engine.media import VideoWriter
from engine.models import liveportrait
from engine.motion.examples import (
    FACE_3D,
    ExampleError,
    FaceTrack,
    emotion_example,
    head_poses,
    read_example,
    reference_clip,
)
from engine.motion.library import TEMPLATE_MEASURED
from engine.render.neural import NeuralRenderer
from export.backends import BackendConfig, RendererRuntime, get_backend
from tests.engine.motion.example_media import clip, photo


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("photos")
    return {name: photo(root, name) for name in ("neutral", "happy")}


@pytest.fixture(scope="module")
def tiny() -> NeuralRenderer:
    return NeuralRenderer(RendererRuntime(liveportrait.build("tiny"), get_backend(BackendConfig())))


def test_head_pose_recovers_known_rotations() -> None:
    """Landmarks projected from the mean 3-D face under known rotations come back as those angles, in the
    convention of engine.keypoints.rotation_matrix (relative to the clip's median pose)."""
    idx = list(FACE_3D)
    model = np.array([FACE_3D[i] for i in idx])
    poses = [(0.0, 0.0, 0.0), (10.0, -20.0, 7.0), (-5.0, 15.0, -3.0), (0.0, 0.0, 0.0), (0.0, 0.0, 0.0)]
    landmarks = []
    for pitch, yaw, roll in poses:
        m = rotation_matrix(torch.tensor([pitch]), torch.tensor([yaw]), torch.tensor([roll]))[0].double().numpy().T
        cam = model @ m.T + np.array([0.0, 0.0, 8.0])
        lm = np.zeros((68, 2))
        lm[idx] = cam[:, :2] / cam[:, 2:] * 512 + 256
        landmarks.append(lm)
    track = FaceTrack("synthetic", [], [np.zeros((68, 2))] * 5, landmarks, [200.0] * 5, [(512, 512)] * 5, "ibug68",
                      "file", 0)  # fmt: skip
    found = head_poses(track)
    assert found is not None
    np.testing.assert_allclose(found[:, :3], np.array(poses), atol=0.05)


def test_read_example_photos_and_clips(tmp_path: Path, photos: dict[str, Path]) -> None:
    one = read_example(photos["happy"])
    assert len(one.frames) == 1 and not one.is_clip
    clip = tmp_path / "clip.mp4"
    with VideoWriter(clip, 25, 160) as writer:
        for i in range(30):
            writer.video(np.full((160, 160, 3), 8 * i, np.uint8))
        writer.audio(np.zeros(16000, np.float32))
    at_rate = read_example(clip, fps=25.0, max_frames=100)
    assert at_rate.is_clip and len(at_rate.frames) == 30
    brightness = [float(f.mean()) for f in at_rate.frames]
    assert brightness == sorted(brightness)  # in order, none twice
    slower = read_example(clip, fps=12.5, max_frames=100)
    assert len(slower.frames) == 15
    spread = read_example(clip, max_frames=6)
    assert len(spread.frames) == 6 and float(spread.frames[-1].mean()) > 150  # spread to the end of the clip
    (tmp_path / "notes.mp4").write_text("not a video")
    with pytest.raises(ExampleError, match=r"notes\.mp4: not a readable photo or video"):
        read_example(tmp_path / "notes.mp4")
    with pytest.raises(ExampleError, match="not found"):
        read_example(tmp_path / "missing.png")


def test_emotion_example_in_both_spaces(photos: dict[str, Path], tiny: NeuralRenderer, tmp_path: Path) -> None:
    record = emotion_example("happy", photos["happy"], neutral=photos["neutral"], renderer=tiny)
    assert record.spaces() == ["keypoints", "mesh"] and record.frames == 1
    assert record.keypoints is not None and record.keypoints.untrained
    assert record.keypoints.weights_id == tiny.nets.weights_id and record.keypoints.neutral is not None
    assert not np.allclose(record.keypoints.delta, record.keypoints.neutral)  # another picture, another delta
    mesh = record.mesh
    assert mesh is not None and mesh.neutral is not None and mesh.measured == TEMPLATE_MEASURED
    smile = mesh.shape - mesh.neutral
    # the classic smile (AU12 pulls the corners up and out by 0.078 inter-ocular distances), found back in the photo
    assert smile[6, 1] < -0.03 and smile[12, 1] < -0.03 and smile[6, 0] < -0.03 and smile[12, 0] > 0.03
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((256, 256, 3), 128, np.uint8))
    with pytest.raises(ExampleError, match="no face found"):
        emotion_example("sad", blank, locator=FaceLocator(None))


def test_reference_clip_pose_trajectory(tmp_path: Path, tiny: NeuralRenderer) -> None:
    path, truth = clip(tmp_path, frames=12)
    record = reference_clip(default_avatar(), path, renderer=tiny)
    assert record.frames == 12 and record.spaces() == ["keypoints", "mesh"] and record.stats is not None
    assert record.mesh is not None and record.keypoints is not None
    roll = record.mesh.pose[:, 2]
    true_roll = truth[:, 2] - np.median(truth[:, 2])
    # the face's in-plane roll, from the landmarks of each frame: measured r 0.99, std 3.1 vs 2.9 degrees (the
    # flat classic warp has no parallax, so its yaw and pitch are not recoverable: a real head's are)
    assert np.corrcoef(roll, true_roll)[0, 1] > 0.9
    assert 0.7 < roll.std() / true_roll.std() < 1.4
    assert set(record.stats["mesh"]) == {"pitch", "yaw", "roll", "tx", "ty", "scale"}
    assert record.keypoints.pose.shape == (12, 7) and abs(float(np.median(record.keypoints.pose[:, 1]))) < 1e-6
    # the clip smiles (classic AU12 at 0.6) where the avatar's photo does not: its mouth corners rise
    assert record.mesh.emotion[6, 1] < -0.01 and record.mesh.emotion[12, 1] < -0.01
    with pytest.raises(ExampleError, match="video clip"):
        reference_clip(default_avatar(), photo(tmp_path, "neutral"))
