"""Every classic-mode control changes the rendered picture where it should, by a measured margin, and not elsewhere.

Renders come from ClassicMotion.apply_controls -> ClassicRenderer on the default avatar and on a real photo
(skimage's astronaut, with the hand-placed landmarks of tests/data/landmarks/astronaut_68.json). Differences are
mean absolute differences in 0..255 levels over a region; the numbers beside each bound are what the renderer
measured when the bound was set (default avatar / astronaut), so a bound fails when an effect shrinks to well
under half of that, or when a region that must stay still moves by more than a level or so.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from engine.avatar.default import default_avatar
from engine.avatar.face import FaceLocator
from engine.avatar.prepare import prepare_avatar
from engine.motion.base import MotionFrame
from engine.motion.classic import ClassicMotion, ClassicMotionConfig
from engine.motion.control_schema import ControlState, ControlValueError
from engine.render.base import PreparedAvatar
from engine.render.classic import ClassicRenderer, face_size

LANDMARKS = Path(__file__).resolve().parents[2] / "data" / "landmarks" / "astronaut_68.json"
Box = tuple[int, int, int, int]


@pytest.fixture(scope="module")
def renderer() -> ClassicRenderer:
    return ClassicRenderer()


@pytest.fixture(scope="module")
def default(renderer: ClassicRenderer) -> PreparedAvatar:
    return renderer.prepare(default_avatar())


@pytest.fixture(scope="module")
def astronaut(renderer: ClassicRenderer) -> PreparedAvatar:
    data = pytest.importorskip("skimage.data")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "astronaut.png"
        cv2.imwrite(str(path), cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))
        avatar = prepare_avatar(path, "astronaut", landmarks_file=LANDMARKS, locator=FaceLocator(None, False))
    return renderer.prepare(avatar)


def still(**controls: object) -> ControlState:
    """A state with the head, blinks and gaze off and no ramp, so only the control under test moves."""
    base: dict[str, object] = {"head_pose": "fixed", "blink": False, "gaze": False, "ramp_s": 0.0}
    base.update(controls)
    return ControlState(**base)  # type: ignore[arg-type]


def motion(prepared: PreparedAvatar, state: ControlState, n: int = 3, loud: float = 0.0, seed: int = 0):
    m = ClassicMotion(ClassicMotionConfig(seed=seed), face_size=face_size(prepared.source), source=prepared.source)
    m.apply_controls(state)
    rows = np.zeros((n + m.lookahead_frames, 4), dtype=np.float32)
    rows[:, 0] = loud
    return m.push(rows)


def render(renderer: ClassicRenderer, prepared: PreparedAvatar, frame: MotionFrame) -> np.ndarray:
    with torch.inference_mode():
        out = renderer.render([prepared], renderer.drive(prepared, frame.params))
    return out[0].permute(1, 2, 0).numpy() * 255.0


def last(renderer: ClassicRenderer, prepared: PreparedAvatar, state: ControlState, **kw: float) -> np.ndarray:
    return render(renderer, prepared, motion(prepared, state, **kw)[-1])  # type: ignore[arg-type]


def regions(prepared: PreparedAvatar) -> dict[str, Box]:
    lm = prepared.avatar.landmarks
    assert lm is not None
    iod = face_size(prepared.source) * prepared.avatar.crop.shape[0] / 2

    def box(lo: int, hi: int, mx: float, up: float, down: float) -> Box:
        p = lm[lo:hi]
        return (int(p[:, 0].min() - mx), int(p[:, 1].min() - up), int(p[:, 0].max() + mx), int(p[:, 1].max() + down))

    return {
        "brows": box(17, 27, 0.08 * iod, 0.12 * iod, 0.03 * iod),
        "eyes": box(36, 48, 0.05 * iod, 0.04 * iod, 0.04 * iod),
        "mouth": box(48, 68, 0.1 * iod, 0.05 * iod, 0.3 * iod),
        "background": (0, 0, 40, 40),
        "background_right": (472, 0, 512, 40),
    }


def diff(a: np.ndarray, b: np.ndarray, box: Box) -> float:
    x0, y0, x1, y1 = box
    return float(np.abs(a[y0:y1, x0:x1] - b[y0:y1, x0:x1]).mean())


def diffs(a: np.ndarray, b: np.ndarray, boxes: dict[str, Box]) -> dict[str, float]:
    return {name: diff(a, b, box) for name, box in boxes.items()}


# emotion -> (region, least difference from neutral); measured default / astronaut in the comments
EMOTION_EFFECTS = {
    "angry": {"brows": 10.0, "eyes": 8.0},  # brows 29.4 / 34.3, eyes 18.3 / 19.6
    "disgusted": {"brows": 6.0, "mouth": 4.0},  # brows 18.9 / 17.8, mouth 8.6 / 11.4
    "fear": {"brows": 10.0, "eyes": 5.0, "mouth": 6.0},  # 33.6 / 23.7, 12.6 / 10.1, 15.4 / 15.5
    "happy": {"mouth": 7.0, "eyes": 2.5},  # mouth 17.9 / 16.0, eyes (cheek raise) 6.7 / 6.2
    "sad": {"brows": 8.0, "mouth": 4.0},  # brows 21.1 / 21.1, mouth 10.1 / 9.8
    "surprised": {"brows": 12.0, "eyes": 5.0, "mouth": 9.0},  # 38.7 / 33.1, 13.0 / 12.0, 23.3 / 23.2
    "contempt": {"mouth": 2.5},  # mouth 5.5 / 7.6
}
STILL_REGIONS = {"happy": ("brows",), "contempt": ("brows", "eyes")}  # measured <= 0.42 levels


@pytest.mark.parametrize("which", ["default", "astronaut"])
def test_each_emotion_moves_its_regions_and_not_the_background(which: str, renderer: ClassicRenderer, request) -> None:
    prepared = request.getfixturevalue(which)
    boxes = regions(prepared)
    neutral = last(renderer, prepared, still())
    portrait = prepared.avatar.crop.astype(np.float64)
    assert np.abs(neutral - portrait).max() < 0.05  # neutral with everything still is the portrait itself
    for emotion, effects in EMOTION_EFFECTS.items():
        d = diffs(last(renderer, prepared, still(emotion=emotion)), neutral, boxes)
        for region, least in effects.items():
            assert d[region] >= least, (emotion, region, d)
        for region in STILL_REGIONS.get(emotion, ()):
            assert d[region] < 1.0, (emotion, region, d)
        # the background: at most 0.43 levels measured (the astronaut's mottled backdrop, surprised)
        assert d["background"] < 1.0 and d["background_right"] < 1.0, (emotion, d)


def test_contempt_is_one_sided(renderer: ClassicRenderer, default: PreparedAvatar) -> None:
    neutral = last(renderer, default, still())
    smirk = last(renderer, default, still(emotion="contempt"))
    x0, y0, x1, y1 = regions(default)["mouth"]
    assert default.avatar.landmarks is not None
    xm = int(default.avatar.landmarks[51, 0])
    left, right = diff(smirk, neutral, (x0, y0, xm, y1)), diff(smirk, neutral, (xm, y0, x1, y1))
    assert right > 4.0 * left  # measured 10.5 vs 0.45 (2.7 vs 12.7 on the astronaut)


@pytest.mark.parametrize(
    ("state", "moves", "stays"),
    [
        (still(mouth_emotion="happy"), {"mouth": 7.0}, ("brows", "eyes")),  # mouth 17.8 / 15.9, others <= 0.02
        (still(mouth_emotion="sad"), {"mouth": 4.0}, ("brows", "eyes")),  # mouth 10.1 / 9.8
        (still(eyes_emotion="angry"), {"brows": 10.0, "eyes": 8.0}, ("mouth",)),  # 29.4 / 34.3, 18.3; mouth 0.02
        (still(eyes_emotion="surprised"), {"brows": 12.0, "eyes": 5.0}, ("mouth",)),  # 38.7 / 33.1, 13.0; mouth 0
    ],
)
def test_region_mixing_moves_only_its_region(
    state: ControlState, moves: dict[str, float], stays: tuple[str, ...], renderer: ClassicRenderer, default
) -> None:
    boxes = regions(default)
    d = diffs(last(renderer, default, state), last(renderer, default, still()), boxes)
    for region, least in moves.items():
        assert d[region] >= least, (region, d)
    for region in stays:
        assert d[region] < 0.3, (region, d)


def test_interpolation_lies_between_the_two_emotions(renderer: ClassicRenderer, default: PreparedAvatar) -> None:
    boxes = regions(default)
    happy, sad = last(renderer, default, still(emotion="happy")), last(renderer, default, still(emotion="sad"))
    half = last(renderer, default, still(emotion="happy", emotion_b="sad", mix=0.5))
    for region in ("brows", "mouth"):
        full = diff(happy, sad, boxes[region])  # brows 21.1, mouth 21.8
        to_happy, to_sad = diff(half, happy, boxes[region]), diff(half, sad, boxes[region])  # 14.9 / 14.9, 15.6 / 12.6
        assert 0.3 * full < to_happy < 0.9 * full and 0.3 * full < to_sad < 0.9 * full, (region, full, to_happy, to_sad)


def test_intensity_scales_the_expression(renderer: ClassicRenderer, default: PreparedAvatar) -> None:
    box = regions(default)["mouth"]
    neutral = last(renderer, default, still())
    weak = diff(last(renderer, default, still(emotion="surprised", intensity=0.5)), neutral, box)  # 14.0
    strong = diff(last(renderer, default, still(emotion="surprised", intensity=1.5)), neutral, box)  # 32.0
    zero = diff(last(renderer, default, still(emotion="surprised", intensity=0.0)), neutral, box)
    assert strong > 1.8 * weak and weak > 5.0 and zero < 0.01


def _lower_lip_bottom(img: np.ndarray, landmarks: np.ndarray) -> int:
    """Lowest lip-red row on the mouth's centre column of the default avatar (its lips are much redder than skin)."""
    cx = round(float(landmarks[57, 0]))
    col = img[:, cx - 2 : cx + 3].mean(axis=1) / 255.0
    top, bottom = round(float(landmarks[51, 1])), round(float(landmarks[8, 1]))
    rows = np.nonzero(col[top:bottom, 0] - col[top:bottom, 1] > 0.29)[0]
    return int(rows.max()) + top


def test_lip_scale_scales_the_mouth_opening(renderer: ClassicRenderer, default: PreparedAvatar) -> None:
    lm = default.avatar.landmarks
    assert lm is not None
    rest = _lower_lip_bottom(last(renderer, default, still()), lm)
    drops = {}
    for scale in (0.0, 1.0, 1.6):
        img = last(renderer, default, still(lip_scale=scale), n=8, loud=0.8)
        drops[scale] = _lower_lip_bottom(img, lm) - rest
        if scale == 1.6:
            d = diffs(img, last(renderer, default, still(), n=8, loud=0.8), regions(default))
            assert d["eyes"] < 0.1 and d["background"] < 0.1  # measured 0.01 / 0.005
    assert drops[0.0] == 0 and drops[1.0] >= 12  # measured 0 and 20 pixels
    assert drops[1.6] >= 1.4 * drops[1.0]  # measured 32 / 20 = 1.6


def test_loudness_lips_off_opens_quiet_and_loud_speech_alike(
    renderer: ClassicRenderer, default: PreparedAvatar
) -> None:
    lm = default.avatar.landmarks
    assert lm is not None
    rest = _lower_lip_bottom(last(renderer, default, still()), lm)
    drop = {}
    for follow in (True, False):
        for loud in (0.45, 0.9):  # about -37 dB and -15 dB
            img = last(renderer, default, still(loudness_lips=follow), n=8, loud=loud)
            drop[follow, loud] = _lower_lip_bottom(img, lm) - rest
    assert drop[True, 0.9] >= 1.6 * drop[True, 0.45]  # measured 22 vs 11 pixels
    assert abs(drop[False, 0.9] - drop[False, 0.45]) <= 0.15 * drop[False, 0.9]  # measured 25 vs 25
    assert drop[False, 0.45] >= 1.6 * drop[True, 0.45]


def _iris_pixels(img: np.ndarray, landmarks: np.ndarray) -> int:
    """Green iris pixels in both eye boxes of the default avatar (its irises are hazel-green, nothing else is)."""
    total = 0
    for lo in (36, 42):
        pts = landmarks[lo : lo + 6]
        x0, y0 = (pts.min(axis=0) - 3).astype(int)
        x1, y1 = (pts.max(axis=0) + 3).astype(int)
        c = img[y0:y1, x0:x1] / 255.0
        total += int((c[..., 1] > c[..., 0] + 0.05).sum())
    return total


def test_blink_closes_the_eyes_and_opens_them_smoothly(renderer: ClassicRenderer, default: PreparedAvatar) -> None:
    lm = default.avatar.landmarks
    assert lm is not None
    frames = motion(default, still(blink=True, blink_rate=2.0), n=40, seed=1)
    lids = np.array([float(f.params.exp[0, 11, 1]) for f in frames])
    start = int(np.argmax(lids > 0))
    assert 0 < start < 30
    open_area = _iris_pixels(render(renderer, default, frames[start - 1]), lm)
    areas = np.array([_iris_pixels(render(renderer, default, frames[start + k]), lm) for k in range(7)])
    closure = 1.0 - areas / open_area
    # measured: 0.26, 1.0, 1.0, 0.97, 0.53, 0.07, 0.0 (frames of 40 ms)
    assert closure.max() >= 0.8
    shut = np.nonzero(closure >= 0.5)[0]
    assert 2 <= len(shut) <= 5 and np.all(np.diff(shut) == 1)  # 80-200 ms mostly shut, in one piece
    assert closure[0] < closure.max() and closure[-1] < 0.1  # it closes over a frame and is open again by 280 ms
    nothing = motion(default, still(blink=False, blink_rate=2.0), n=40, seed=1)
    assert _iris_pixels(render(renderer, default, nothing[start + 1]), lm) == open_area


def test_blink_rate_zero_never_blinks_and_a_new_rate_applies_to_the_next_blink(
    renderer: ClassicRenderer, default: PreparedAvatar
) -> None:
    lm = default.avatar.landmarks
    assert lm is not None
    open_area = _iris_pixels(last(renderer, default, still()), lm)
    frames = motion(default, still(blink=True, blink_rate=0.0), n=250)  # 10 s
    assert all(float(f.params.exp[0, [11, 15], 1].abs().max()) == 0.0 for f in frames)
    assert all(_iris_pixels(render(renderer, default, f), lm) == open_area for f in frames[::50])

    def first_blink(m: ClassicMotion, rows: int) -> float:
        frames = m.push(np.zeros((rows, 4), dtype=np.float32))
        lid = [f.frame_index for f in frames if float(f.params.exp[0, 11, 1]) > 0]
        return lid[0] / 25.0 if lid else float("inf")

    # set at session start: the first blink already follows the new rate (no pre-drawn blink at the old one)
    fast = []
    for seed in range(10):
        m = ClassicMotion(ClassicMotionConfig(seed=seed, blink_every_s=10.0))
        m.apply_controls(still(blink=True, blink_rate=2.0))
        fast.append(first_blink(m, 100))
    assert np.median(fast) < 1.0 and max(fast) < 2.0  # mean gap 0.5 s at 2 / s (a 10 s gap was pending)
    # changed mid-session: the pending blink is re-drawn from the change
    later = []
    for seed in range(10):
        m = ClassicMotion(ClassicMotionConfig(seed=seed, blink_every_s=10.0))
        m.apply_controls(still(blink=True, blink_rate=0.1))
        m.push(np.zeros((50, 4), dtype=np.float32))
        m.apply_controls(still(blink=True, blink_rate=2.0))
        later.append(first_blink(m, 100) - 50 / 25.0)
    assert np.median(later) < 1.0 and max(later) < 2.0


def test_gaze_moves_the_irises_only(renderer: ClassicRenderer, default: PreparedAvatar) -> None:
    lm = default.avatar.landmarks
    assert lm is not None
    boxes = regions(default)
    frames = motion(default, still(gaze=True), n=90, seed=3)
    shifts = np.array([float(f.params.exp[0, 11, 0]) for f in frames])
    k = int(np.argmax(np.abs(shifts)))
    assert abs(shifts[k]) > 0  # a saccade within 3.6 s
    rest = last(renderer, default, still())
    moved = render(renderer, default, frames[k])
    d = diffs(moved, rest, boxes)
    assert d["eyes"] >= 3.0  # measured 9.2
    assert d["brows"] < 0.05 and d["mouth"] < 0.05 and d["background"] < 0.05  # measured 0.0

    def iris_x(img: np.ndarray) -> float:
        x0, y0 = (lm[36:42].min(axis=0) - 3).astype(int)
        x1, y1 = (lm[36:42].max(axis=0) + 3).astype(int)
        c = img[y0:y1, x0:x1] / 255.0
        return float(np.nonzero(c[..., 1] > c[..., 0] + 0.05)[1].mean())

    shift_px = abs(iris_x(moved) - iris_x(rest))
    iod_px = face_size(default.source) * 256
    assert 1.0 <= shift_px <= 0.06 * iod_px  # visible but subtle: measured 2.4 px (0.018 inter-ocular)


def test_head_pose_fixed_holds_the_head_and_diffusion_sways_it(
    renderer: ClassicRenderer, default: PreparedAvatar
) -> None:
    lm = default.avatar.landmarks
    assert lm is not None
    face = (int(lm[0, 0]), int(lm[19, 1] - 40), int(lm[16, 0]), int(lm[8, 1]))
    for mode, least, most in (("diffusion", 3.0, 255.0), ("fixed", 0.0, 0.01)):
        frames = motion(default, still(head_pose=mode), n=50)
        first, later = render(renderer, default, frames[0]), render(renderer, default, frames[-1])
        moved = diff(later, first, face)  # measured 6.7 over 2 s of sway, 0.0 fixed
        assert least <= moved <= most, (mode, moved)
        assert diff(later, first, (0, 0, 40, 40)) < 0.2  # the background stays: measured 0.05


def test_pure_emotion_off_undoes_a_photo_smile(renderer: ClassicRenderer, astronaut, default) -> None:
    boxes = regions(astronaut)
    d = diffs(last(renderer, astronaut, still(pure_emotion=False)), last(renderer, astronaut, still()), boxes)
    assert d["mouth"] >= 6.0 and d["brows"] < 1.0 and d["background"] < 0.5  # measured 12.0, 0.17, 0.07
    same = diffs(last(renderer, default, still(pure_emotion=False)), last(renderer, default, still()), regions(default))
    assert max(same.values()) < 0.01  # the default face is already neutral: nothing to undo (measured 0.0)


def test_ramp_s_ramps_every_change_and_zero_applies_at_once() -> None:
    def offsets(state: ControlState, loud: float = 0.0, n: int = 30) -> np.ndarray:
        m = ClassicMotion(ClassicMotionConfig(head_motion=1.0))
        m.apply_controls(still(ramp_s=0.0))
        m.push(np.full((5, 4), loud, dtype=np.float32))
        m.apply_controls(state)
        frames = m.push(np.full((n, 4), loud, dtype=np.float32))
        return np.stack([f.params.exp[0, :, :2].numpy() for f in frames])

    smile = offsets(still(emotion="happy", ramp_s=1.0))[:, 6, 1]  # 25 frames
    assert smile[0] < 0 and abs(smile[11] / smile[-1] - 0.5) < 0.06 and smile[24] == pytest.approx(smile[-1])
    assert np.all(np.diff(smile[:25]) < 0)  # monotone, no pop
    at_once = offsets(still(emotion="happy", ramp_s=0.0))[:, 6, 1]
    assert at_once[0] == pytest.approx(at_once[-1])
    jaw = offsets(still(lip_scale=2.0, ramp_s=1.0), loud=0.8)[:, 17, 1]
    assert jaw[24] > 1.8 * jaw[0] and np.all(np.diff(jaw[:25]) > 0)
    m = ClassicMotion(ClassicMotionConfig())
    m.apply_controls(still(ramp_s=0.0))
    m.apply_controls(still(head_pose="diffusion", ramp_s=2.0))
    yaw = np.abs([float(f.params.yaw[0]) for f in m.push(np.zeros((60, 4), dtype=np.float32))])
    assert yaw[0] < 0.05 * 2.5 and yaw[:10].max() < yaw[40:].max()  # the sway fades in


def test_honoured_values_and_refusals() -> None:
    m = ClassicMotion()  # no stored reference clip: "reference" is refused with the reason
    assert set(m.HONOURED) == set(m.CONTROLS) == {f.name for f in dataclasses.fields(ControlState)}
    with pytest.raises(ControlValueError, match=r"head_pose.*reference.*no reference clip is stored"):
        m.check_controls(ControlState(head_pose="reference"))  # what the session asks before acknowledging
    m.check_controls(ControlState(head_pose="fixed", emotion="sad", pure_emotion=False))
    before = m.state
    with pytest.raises(ControlValueError, match=r"head_pose.*reference"):
        m.apply_controls(ControlState(head_pose="reference"))
    with pytest.raises(ControlValueError, match="emotion_source"):
        m.apply_controls(ControlState(emotion_source="reference"))
    assert m.state == before
    with pytest.raises(TypeError, match="ControlState"):
        m.apply_controls({"emotion": "happy"})  # type: ignore[arg-type]
