"""The cheaper classic renderer draws the picture the renderer drew before (``classic_reference.py``, a frozen copy
of it), on the default avatar and Grace Hopper prepared as ``engine render`` prepares them, in driven frames that
exercise every part of it: rest, open mouth, blinks, gaze, head turn, emotions, a mouth pressed shut.

Differences are in 0..255 levels over all pixels and channels of a frame. Three comparisons:

* the same spline evaluation: the reference evaluating its spline as the fast path does. Everything else (warp
  grid, upsampling, lip refinement, sampling, eyes, mouth, lower lip, clamping) must match to float rounding:
  measured max 0.015, 99.9th percentile 0.0014. Layer windows moved by a pixel: max 1.1; the tongue's colour
  changed by 0.04: max 8.7; the eyes' soft edge 0.7 -> 0.8 px: max 10; the lip refinement skipped: max 63.
* the renderer as it was, frames whose control points stay apart: measured mean <= 0.08, 99.9th percentile <= 3.0,
  max <= 7.4 (Grace Hopper, happy). This is the float32 rounding noise of the old spline evaluation, up to ~0.2 px
  at the crop border (a far-field sum of large ``r^3`` terms that cancel), against the fast path's, which is no
  larger: both against a float64 evaluation of the same spline below.
* the renderer as it was, lips pressed shut (``PRESSED``): squeezed control points get spline weights of ~3000, and
  the old float32 evaluation moved the crop border by up to 2.3 px (mean 0.6, 99.9th percentile 30, max 86 against
  the exact spline: Grace Hopper's hat and flag shift). The fast path evaluates such weights in float64 (measured
  against the exact spline: mean 0.05, 99.9th percentile 1.5, max 5.5), so there it is checked against the exact
  spline instead: within the bounds of the ordinary frames, and far closer than the old renderer was.

``python -m pytest tests/engine/render/test_classic_parity.py --basetemp=/tmp/parity`` leaves contact sheets
(before | after | difference x 32, around the face) and the measured numbers in the test's directory there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.avatar.default import default_avatar
from engine.avatar.face import haar_cascade_path
from engine.avatar.prepare import prepare_avatar
from engine.avatar.record import Avatar
from engine.keypoints import MotionParams
from engine.motion.classic import EMOTIONS
from engine.render.classic import EXACT_WEIGHT, ClassicRenderer, face_size
from engine.render.classic_mesh import Spline, eval_spline_grid
from tests.engine.render.classic_reference import ReferenceRenderer, evaluate_exactly

SAME_EVALUATION = (0.002, 0.05, 0.5)  # mean, 99.9th percentile, max (levels): measured <= 0.00002, 0.0014, 0.015
AS_BEFORE = (0.15, 4.0, 12.0)  # measured <= 0.08, 3.0, 7.4 (ordinary frames); 0.05, 1.5, 5.5 (pressed, vs exact)
SHEET_AMPLIFY = 32.0

# expression offsets per keypoint (dx, dy) in inter-ocular units, and the head pose (degrees, normalised shift)
FRAMES: dict[str, tuple[dict[int, tuple[float, float]], dict[str, float]]] = {
    "rest": ({}, {}),
    "mouth_open": ({17: (0.0, 0.2), 20: (0.0, 0.19), 19: (0.0, 0.17)}, {}),
    "blink": ({11: (0.0, 0.15), 15: (0.0, 0.15)}, {}),
    "half_blink": ({11: (0.0, 0.07), 15: (0.0, 0.07)}, {}),
    "gaze": ({11: (0.05, 0.0), 15: (0.05, 0.0)}, {}),
    "head_turn": ({}, {"yaw": 15.0, "pitch": -6.0, "roll": 8.0, "tx": 0.03, "ty": -0.02}),
    "happy": (EMOTIONS["happy"], {}),
    "surprised_talking_turned": (
        {**EMOTIONS["surprised"], 11: (-0.04, -0.05), 15: (-0.04, -0.05)},
        {"yaw": -10.0, "roll": -4.0},
    ),
    "angry_half_blink": ({**EMOTIONS["angry"], 11: (0.0, 0.09), 15: (0.0, 0.09)}, {"pitch": 5.0}),
    "lips_pressed": ({17: (0.0, -0.05), 14: (0.0, 0.02)}, {}),
}
PRESSED = ("angry_half_blink", "lips_pressed")  # the lower lip pushed into the upper one


def _params(iod: float, offsets: dict[int, tuple[float, float]], pose: dict[str, float]) -> MotionParams:
    exp = torch.zeros(1, 21, 3)
    for k, (dx, dy) in offsets.items():
        exp[0, k, 0], exp[0, k, 1] = dx * iod, dy * iod
    return MotionParams(
        torch.ones(1, 1),
        torch.tensor([pose.get("pitch", 0.0)]),
        torch.tensor([pose.get("yaw", 0.0)]),
        torch.tensor([pose.get("roll", 0.0)]),
        torch.tensor([[pose.get("tx", 0.0), pose.get("ty", 0.0), 0.0]]),
        exp,
    )


def _avatar(which: str) -> Avatar:
    if which == "default":
        return default_avatar()
    # prepared as `engine render --image` prepares a photo (Runtime.load_avatar: automatic face and landmarks)
    if haar_cascade_path() is None:
        pytest.skip("installed OpenCV ships no Haar cascades")
    from matplotlib import cbook

    return prepare_avatar(Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)), "grace_hopper")


def _as_fast(spline: Spline, xs: torch.Tensor, ys: torch.Tensor, coarse: bool) -> torch.Tensor:
    """The fast path's spline evaluation, in the reference's layout."""
    return eval_spline_grid(spline, xs, ys, EXACT_WEIGHT if coarse else None).flatten(2).transpose(1, 2)


@pytest.fixture(scope="module", params=["default", "grace_hopper"])
def renders(request: pytest.FixtureRequest) -> tuple[str, Avatar, dict[str, dict[str, np.ndarray]]]:
    """Each frame drawn by the fast path and by the reference as before, exactly, and with the fast evaluation."""
    avatar = _avatar(request.param)
    fast = ClassicRenderer()
    refs = {
        "before": ReferenceRenderer(),
        "exact": ReferenceRenderer(evaluate=evaluate_exactly),
        "same_evaluation": ReferenceRenderer(evaluate=_as_fast),
    }
    out: dict[str, dict[str, np.ndarray]] = {}
    with torch.inference_mode():
        prepared = fast.prepare(avatar)
        ref_prepared = refs["before"].prepare(avatar)
        iod = face_size(prepared.source)
        for name, (offsets, pose) in FRAMES.items():
            kp = fast.drive(prepared, _params(iod, offsets, pose))
            images = {"fast": fast.render([prepared], kp)}
            images.update({key: ref.render([ref_prepared], kp) for key, ref in refs.items()})
            out[name] = {key: img[0].permute(1, 2, 0).numpy() * 255.0 for key, img in images.items()}
    return request.param, avatar, out


def _stats(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    d = np.abs(a - b)
    return float(d.mean()), float(np.percentile(d, 99.9)), float(d.max())


def _within(stats: tuple[float, float, float], bounds: tuple[float, float, float]) -> bool:
    return all(s <= b for s, b in zip(stats, bounds, strict=True))


def test_everything_but_the_spline_evaluation_draws_the_same(renders) -> None:
    which, _, frames = renders
    for name, img in frames.items():
        stats = _stats(img["fast"], img["same_evaluation"])
        assert _within(stats, SAME_EVALUATION), f"{which}/{name}: mean, p99.9, max {stats}"
    # the frames differ from each other: the drive reached the renderer (a broken drive would pass the parity)
    for name, img in frames.items():
        if name != "rest":
            assert _stats(img["fast"], frames["rest"]["fast"])[0] > 0.05, f"{which}/{name} looks like the rest frame"


def test_the_picture_is_the_one_drawn_before(renders, tmp_path: Path) -> None:
    which, avatar, frames = renders
    report = []
    for name, img in frames.items():
        before = _stats(img["fast"], img["before"])  # mean, p99.9, max against the old picture
        old_error = _stats(img["before"], img["exact"])  # the old picture against the exact spline's
        error = _stats(img["fast"], img["exact"])
        report.append(f"{which}/{name}: vs before {before}; vs exact: before {old_error}, now {error}")
        # no less accurate than before: against the exact spline, at most a rounding's worth further off
        assert error[0] <= old_error[0] + 0.01, report[-1]
        if name in PRESSED:  # the old picture was off by its rounding noise: the exact spline is the reference
            assert _within(error, AS_BEFORE) and old_error[1] > 2 * error[1], report[-1]
        else:
            assert _within(before, AS_BEFORE), report[-1]
    (tmp_path / f"parity_{which}.txt").write_text("\n".join(report) + "\n")
    assert avatar.landmarks is not None
    lm = np.asarray(avatar.landmarks)
    pad = 0.35 * (lm.max(0) - lm.min(0))
    x0, y0 = np.maximum(lm.min(0) - pad, 0).astype(int)
    x1, y1 = np.minimum(lm.max(0) + pad, 512).astype(int)
    rows = []
    for img in frames.values():
        diff = np.clip(np.abs(img["fast"] - img["before"]).max(2, keepdims=True) * SHEET_AMPLIFY, 0, 255)
        tiles = [img["before"], img["fast"], diff.repeat(3, axis=2)]
        rows.append(np.concatenate([t[y0:y1, x0:x1] for t in tiles], axis=1))
    Image.fromarray(np.concatenate(rows, axis=0).round().astype(np.uint8)).save(tmp_path / f"parity_{which}.png")
