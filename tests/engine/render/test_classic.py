"""Warp-only classic renderer: keypoint placement, shapes, identity, mouth opening, batching, errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from engine.avatar.default import default_avatar
from engine.keypoints import EYE, LIP, MotionParams
from engine.render.classic import ClassicRenderer, face_size, keypoints_from_landmarks


def _params(exp: torch.Tensor | None = None, roll: float = 0.0) -> MotionParams:
    return MotionParams(
        torch.ones(1, 1),
        torch.zeros(1),
        torch.zeros(1),
        torch.tensor([roll]),
        torch.zeros(1, 3),
        exp if exp is not None else torch.zeros(1, 21, 3),
    )


@pytest.fixture(scope="module")
def setup() -> tuple:
    renderer = ClassicRenderer(size=512, flow_size=96)
    return renderer, renderer.prepare(default_avatar())


def test_region_sets_land_on_face_parts() -> None:
    avatar = default_avatar()
    assert avatar.landmarks is not None
    kp = keypoints_from_landmarks(avatar.landmarks, 512)
    assert kp.shape == (21, 3) and np.all(kp[:, 2] == 0) and np.abs(kp[:, :2]).max() < 1
    px = (kp[:, :2] + 1) * 256 - 0.5
    lm = avatar.landmarks
    mouth_lo, mouth_hi = lm[48:68].min(0), lm[48:68].max(0)
    for k in LIP[:4]:  # corners and lip edges inside the mouth box
        assert np.all(px[k] >= mouth_lo - 1) and np.all(px[k] <= mouth_hi + 1)
    eyes_lo, eyes_hi = lm[17:27].min(0), lm[36:48].max(0)  # brows to lower lids
    for k in EYE:
        assert np.all(px[k] >= eyes_lo - 1) and np.all(px[k] <= eyes_hi + 1)


def test_identity_render_reproduces_portrait(setup: tuple) -> None:
    renderer, prepared = setup
    kp = renderer.drive(prepared, _params())
    torch.testing.assert_close(kp[0], prepared.source.kp_source)
    out = renderer.render([prepared], kp)
    assert out.shape == (1, 3, 512, 512) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    portrait = torch.from_numpy(prepared.avatar.crop).permute(2, 0, 1).float() / 255
    assert float((out[0] - portrait).abs().max()) < 1e-4


def test_jaw_opening_darkens_mouth_and_batches(setup: tuple) -> None:
    renderer, prepared = setup
    iod = face_size(prepared.source)
    exp = torch.zeros(1, 21, 3)
    exp[0, [17, 20, 19], 1] = torch.tensor([0.2, 0.19, 0.17]) * iod
    params = [_params(), _params(exp), _params(roll=5.0)]
    kp = torch.cat([renderer.drive(prepared, p) for p in params])
    out = renderer.render([prepared] * 3, kp)
    lm = prepared.avatar.landmarks
    x0, x1 = round(lm[48, 0]), round(lm[54, 0])
    y0, y1 = round(lm[51, 1]), round(lm[8, 1] - 20)
    luma = (out[:, :, y0:y1, x0:x1] * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1)
    dark = (luma < 0.3).float().mean(dim=(1, 2))  # share of cavity-dark pixels in the mouth box
    assert float(dark[1]) > float(dark[0]) + 0.05  # the opened mouth shows a dark cavity
    single = renderer.render([prepared], kp[1:2])
    torch.testing.assert_close(single[0], out[1], atol=1e-5, rtol=0)  # batching does not mix avatars
    assert float((out[2] - out[0]).abs().mean()) > 0.01  # head roll moves the face
    far = out[:, :, :40, :40]
    torch.testing.assert_close(far[2], far[0], atol=6e-3, rtol=0)  # the background stays (within ~1 level)


def test_missing_landmarks_error_and_bad_shapes(setup: tuple) -> None:
    renderer, prepared = setup
    bare = dataclasses.replace(default_avatar(), landmarks=None, landmark_scheme="")
    with pytest.raises(ValueError, match=r"no landmarks.*--landmarks"):
        renderer.prepare(bare)
    other = dataclasses.replace(default_avatar(), landmark_scheme="lp203")
    with pytest.raises(ValueError, match="68-point"):
        renderer.prepare(other)
    with pytest.raises(ValueError, match="kp_driving"):
        renderer.render([prepared], torch.zeros(2, 21, 3))
