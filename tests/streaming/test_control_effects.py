"""Every control changes the picture, in both modes, through sessions built the way ``engine serve`` builds them.

Stored examples are made with the real commands (``engine emotion add``, ``engine avatar reference``; see
``control_harness.build_library``). Each case compares two sessions that differ only in one control:

* classic mode: mean absolute differences (0..255 levels) in picture regions of the default avatar; the control's
  region must move by at least the stated margin, the others by less than a bound;
* neural mode (random weights: the picture is noise): the motion stage's expression per keypoint region, which
  must move by at least the margin while every other keypoint stays exactly put, and the picture must change.

The numbers beside each bound are what was measured when it was set (margins about half of them); all of them are
in ``docs/controls.md``. The neural cases are marked slow (about 32 s); the classic ones take about 60 s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio

from engine.avatar.store import AvatarStore
from engine.keypoints import EMOTION, EYE, LIP
from engine.motion.controls import EYES_BROWS, GAZE_KEYPOINTS, MOUTH
from streaming.api import ControlError
from streaming.pipelines import RuntimeConfig
from streaming.runtime import Runtime
from streaming.session import SessionConfig
from tests.streaming.control_harness import (
    STILL,
    Renders,
    Run,
    build_library,
    copy_home,
    keypoint_effect,
    picture_effect,
    regions,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")  # one loop: the runtimes serve every test of the module
ALL = tuple(range(21))
BOX = regions()


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("home")
    printed = build_library(home, tmp_path_factory.mktemp("examples"))
    assert "spaces: keypoints, mesh" in printed["happy"] and "UNTRAINED" in printed["happy"]
    assert "reference clip for avatar default" in printed["reference"]
    return home


@pytest.fixture(autouse=True)
def stored(library: Path, engine_home: Path) -> None:
    copy_home(library, engine_home)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def runtimes() -> Any:
    made: dict[str, Runtime] = {}
    yield made
    for runtime in made.values():
        await runtime.aclose()


@pytest.fixture
def r(runtimes: dict[str, Runtime]) -> Renders:
    return Renders(runtimes)


def s(**controls: Any) -> dict[str, Any]:
    return {**STILL, **controls}


# --- classic mode: picture regions -----------------------------------------------------------------------------

# (case, controls a, controls b, audio, avatar, {region: least difference}, {region: most difference})
CLASSIC = [
    # a stored example (template landmarks: mouth, nose, chin) of a classic smile, found back: 25.8 in the mouth
    ("emotion", s(), s(emotion="happy"), "speech", "default", {"mouth": 10.0}, {"brows": 0.5, "background": 0.3}),
    # an emotion without an example keeps its action units: brows 21.1, eyes 12.5, mouth 13.6
    ("emotion-aus", s(), s(emotion="sad"), "speech", "default", {"brows": 8.0, "eyes": 5.0}, {"background": 0.3}),
    ("intensity", s(emotion="happy", intensity=0.5), s(emotion="happy", intensity=1.5), "speech", "default",
     {"mouth": 10.0}, {"brows": 0.5, "background": 0.3}),  # mouth 27.9
    ("mix", s(emotion="happy"), s(emotion="happy", emotion_b="surprised", mix=0.5), "speech", "default",
     {"mouth": 8.0}, {"background": 0.3}),  # mouth 23.3
    ("mouth_emotion", s(), s(mouth_emotion="happy"), "speech", "default", {"mouth": 10.0},
     {"brows": 0.5, "eyes": 0.5, "background": 0.3}),  # mouth 25.8, brows 0.007
    # the surprised example measured no brows: its upper face is the action units'
    ("eyes_emotion", s(), s(eyes_emotion="surprised"), "speech", "default", {"brows": 12.0, "eyes": 4.0},
     {"mouth": 0.5, "background": 0.3}),
    # her own smile undone first (the astronaut smiles; the default face is neutral and does not change)
    ("pure_emotion", s(), s(pure_emotion=False), "speech", "astronaut", {"mouth": 5.0}, {"brows": 1.0}),
    # the reference clip's typical expression (it smiles): mouth 15.7
    ("emotion_source", s(), s(emotion_source="reference"), "speech", "default", {"mouth": 6.0},
     {"brows": 0.5, "eyes": 0.5, "background": 0.3}),
    ("lip_scale", s(), s(lip_scale=2.0), "speech", "default", {"mouth": 10.0},
     {"brows": 0.3, "eyes": 0.3, "background": 0.3}),  # mouth 26.8
    ("loudness_lips", s(), s(loudness_lips=False), "quiet", "default", {"mouth": 8.0},
     {"brows": 0.3, "eyes": 0.3, "background": 0.3}),  # mouth 21.7: quiet speech opens it like loud speech
    ("blink", s(), s(blink=True, blink_rate=2.0), "speech", "default", {"eyes": 10.0},
     {"mouth": 0.3, "background": 0.3}),  # eyes 28.1
    ("blink_rate", s(blink=True, blink_rate=0.0), s(blink=True, blink_rate=2.0), "speech", "default",
     {"eyes": 10.0}, {"mouth": 0.3, "background": 0.3}),
    # the first saccade (seeded hold of 0.94 s) comes at frame 23: only the long clip reaches it
    ("gaze", s(), s(gaze=True), "long", "default", {"eyes": 1.0},
     {"brows": 0.05, "mouth": 0.05, "background": 0.05}),  # eyes 2.8 (the eyeballs only)
    ("head_pose", s(), s(head_pose="diffusion"), "speech", "default", {"eyes": 5.0}, {"background": 0.3}),  # 16.0
    ("head_pose-reference", s(), s(head_pose="reference"), "speech", "default", {"eyes": 10.0},
     {"background": 1.0}),  # eyes 33.4, background 0.19
]  # fmt: skip


@pytest.mark.parametrize(("case", "a", "b", "audio", "avatar", "moves", "stays"), CLASSIC, ids=[c[0] for c in CLASSIC])
async def test_classic_control_moves_its_region(
    case: str, a: dict, b: dict, audio: str, avatar: str, moves: dict, stays: dict, r: Renders
) -> None:
    ra, rb = await r.run("classic", a, audio, avatar), await r.run("classic", b, audio, avatar)
    box = BOX if avatar == "default" else regions(_astronaut_landmarks())
    effects = {name: picture_effect(ra, rb, region) for name, region in box.items()}
    for region, least in moves.items():
        assert effects[region] >= least, (case, region, effects)
    for region, most in stays.items():
        assert effects[region] < most, (case, region, effects)


def _astronaut_landmarks() -> np.ndarray:
    lm = AvatarStore().get("astronaut").landmarks
    assert lm is not None
    return lm


async def test_classic_interpolation_lies_between_and_intensity_scales(r: Renders) -> None:
    neutral, happy = await r.run("classic", s()), await r.run("classic", s(emotion="happy"))
    surprised = await r.run("classic", s(emotion="surprised"))
    mid = await r.run("classic", s(emotion="happy", emotion_b="surprised", mix=0.5))
    mouth = BOX["mouth"]
    full = picture_effect(happy, surprised, mouth)
    to_happy, to_surprised = picture_effect(mid, happy, mouth), picture_effect(mid, surprised, mouth)
    assert 0.2 * full < to_happy < 0.9 * full and 0.2 * full < to_surprised < 0.9 * full, (full, to_happy, to_surprised)
    weak = picture_effect(await r.run("classic", s(emotion="happy", intensity=0.5)), neutral, mouth)
    strong = picture_effect(await r.run("classic", s(emotion="happy", intensity=1.5)), neutral, mouth)
    assert strong > 1.5 * weak > 0, (weak, strong)
    # blink rate 0 never blinks: the eyes are those of blink off, frame for frame
    still = await r.run("classic", s(blink=True, blink_rate=0.0))
    assert picture_effect(still, neutral, BOX["eyes"]) == 0.0


def _jitter(run: Run, box: tuple[int, int, int, int]) -> float:
    x0, y0, x1, y1 = box
    return float(np.abs(np.diff(run.rgb[:, y0:y1, x0:x1], axis=0)).mean())


async def test_classic_smoothing_filters_the_speech_motion(r: Renders) -> None:
    none = await r.run("classic", s(smoothing="none"))
    for mode in ("one_euro", "kalman"):
        smooth = await r.run("classic", s(smoothing=mode))
        # frame-to-frame change of the mouth: the filter takes some of the jitter out, the eyes stay as they were
        assert _jitter(smooth, BOX["mouth"]) < 0.95 * _jitter(none, BOX["mouth"]), mode
        assert picture_effect(smooth, none, BOX["mouth"]) >= 1.0, mode
        assert picture_effect(smooth, none, BOX["eyes"]) < 0.1, mode


async def test_classic_ramp_s_ramps_the_change(r: Renders) -> None:
    # everything else at the session's start values, so only the emotion changes (and ramps)
    at_once = await r.run("classic", {"emotion": "happy", "ramp_s": 0.0})
    ramped = await r.run("classic", {"emotion": "happy", "ramp_s": 0.6})
    x0, y0, x1, y1 = BOX["mouth"]
    per_frame = np.abs(at_once.rgb[:, y0:y1, x0:x1] - ramped.rgb[:, y0:y1, x0:x1]).mean(axis=(1, 2, 3))
    assert per_frame[0] >= 5.0 and per_frame[-1] < 0.5, per_frame  # far apart at first, the same after 0.6 s
    # closing in without a pop (the speech moves the mouth too: steps of 0.8 up were measured, a pop would be ~20)
    assert np.all(np.diff(per_frame) <= 1.5), per_frame


# --- neural mode: keypoint regions and the picture --------------------------------------------------------------

# (case, controls a, controls b, audio, the keypoints that must move, least expression change)
NEURAL = [
    ("emotion", s(), s(emotion="happy"), "speech", EMOTION, 0.03),  # 0.072
    ("intensity", s(emotion="happy", intensity=0.5), s(emotion="happy", intensity=1.5), "speech", EMOTION, 0.03),
    ("mix", s(emotion="happy"), s(emotion="happy", emotion_b="surprised", mix=0.5), "speech", EMOTION, 0.02),
    ("mouth_emotion", s(), s(mouth_emotion="happy"), "speech", MOUTH, 0.03),  # 0.069
    ("eyes_emotion", s(), s(eyes_emotion="surprised"), "speech", EYES_BROWS, 0.02),  # 0.058
    ("pure_emotion", s(emotion="happy"), s(emotion="happy", pure_emotion=False), "speech", EMOTION, 0.02),  # 0.057
    ("emotion_source", s(), s(emotion_source="reference"), "speech", EMOTION, 0.03),  # 0.073
    ("lip_scale", s(), s(lip_scale=2.0), "speech", LIP, 0.1),  # 0.91 (random diffusion: wild lips)
    ("loudness_lips", s(), s(loudness_lips=False), "quiet", LIP, 0.1),  # 1.0
    # the eye retargeting network with random weights: 0.0018 at full closure (a trained one closes the eye)
    ("blink", s(), s(blink=True, blink_rate=2.0), "speech", EYE, 0.0008),
    ("blink_rate", s(blink=True, blink_rate=0.0), s(blink=True, blink_rate=2.0), "speech", EYE, 0.0008),
    ("gaze", s(), s(gaze=True), "long", GAZE_KEYPOINTS, 0.001),  # 0.0021 (the first saccade: 0.9 s in)
]  # fmt: skip


@pytest.mark.slow  # the neural cases: ~32 s together (the classic ones stay in the fast suite)
@pytest.mark.parametrize(("case", "a", "b", "audio", "region", "least"), NEURAL, ids=[c[0] for c in NEURAL])
async def test_neural_control_moves_its_keypoints(
    case: str, a: dict, b: dict, audio: str, region: tuple[int, ...], least: float, r: Renders
) -> None:
    ra, rb = await r.run("neural", a, audio), await r.run("neural", b, audio)
    assert keypoint_effect(ra, rb, region) >= least, (case, keypoint_effect(ra, rb, region))
    others = [k for k in ALL if k not in region]
    assert keypoint_effect(ra, rb, others) == 0.0, (case, keypoint_effect(ra, rb, others))  # exactly: nothing else
    assert np.abs(ra.pose - rb.pose).max() == 0.0, case  # nor the head
    assert np.abs(ra.rgb - rb.rgb).max() >= 1.0, case  # and the (noise) picture changes


@pytest.mark.slow  # the neural cases: ~32 s together (the classic ones stay in the fast suite)
async def test_neural_head_pose_moves_the_head_only(r: Renders) -> None:
    fixed = await r.run("neural", s())
    for mode, least in (("diffusion", 1.0), ("reference", 0.05)):  # degrees: 14.6 and 0.2 (a random extractor)
        other = await r.run("neural", s(head_pose=mode))
        assert np.abs(other.pose - fixed.pose).max() >= least, mode
        assert keypoint_effect(other, fixed, ALL) == 0.0, mode  # the expression is untouched
        assert np.abs(other.rgb - fixed.rgb).max() >= 1.0, mode


@pytest.mark.slow  # the neural cases: ~32 s together (the classic ones stay in the fast suite)
async def test_neural_stored_emotions_interpolate_and_scale_exactly(r: Renders) -> None:
    base, happy = await r.run("neural", s()), await r.run("neural", s(emotion="happy"))
    surprised = await r.run("neural", s(emotion="surprised"))
    mid = await r.run("neural", s(emotion="happy", emotion_b="surprised", mix=0.5))
    np.testing.assert_allclose(mid.exp - base.exp, 0.5 * (happy.exp - base.exp) + 0.5 * (surprised.exp - base.exp),
                               atol=1e-5)  # fmt: skip
    strong = await r.run("neural", s(emotion="happy", intensity=1.5))
    np.testing.assert_allclose(strong.exp - base.exp, 1.5 * (happy.exp - base.exp), atol=1e-5)
    never = await r.run("neural", s(blink=True, blink_rate=0.0))
    assert keypoint_effect(never, base, ALL) == 0.0  # rate 0: no blink at all (before: one pre-drawn)


def _roughness(run: Run) -> float:
    return float(np.abs(np.diff(run.exp, n=2, axis=0)).mean())


@pytest.mark.slow  # the neural cases: ~32 s together (the classic ones stay in the fast suite)
async def test_neural_smoothing_filters_the_generated_motion(r: Renders) -> None:
    none = await r.run("neural", s(smoothing="none"))
    for mode in ("one_euro", "kalman"):
        smooth = await r.run("neural", s(smoothing=mode))
        assert _roughness(smooth) < 0.9 * _roughness(none), (mode, _roughness(smooth), _roughness(none))
        assert np.abs(smooth.rgb - none.rgb).max() >= 1.0


# --- what a mode cannot honour is refused, with the reason ------------------------------------------------------


async def test_refusals_name_the_reason() -> None:
    runtime = Runtime.create(RuntimeConfig(mode="neural", session=SessionConfig(realtime=False)))
    try:
        session = await runtime.open_session("default")
        with pytest.raises(ControlError, match=r"mouth_emotion 'sad'.*no stored example.*engine emotion add sad"):
            session.control({"mouth_emotion": "sad"})
        with pytest.raises(ControlError, match=r"pure_emotion false.*'angry' has none"):
            session.control({"emotion": "angry", "pure_emotion": False})
        assert session.control({"mouth_emotion": "happy"})["mouth_emotion"] == "happy"  # it has an example
        await runtime.close_session(session)
        other = await runtime.open_session("astronaut")
        with pytest.raises(ControlError, match=r"head_pose / emotion_source 'reference': no reference clip"):
            other.control({"head_pose": "reference"})
        await runtime.close_session(other)
    finally:
        await runtime.aclose()
    runtime = Runtime.create(RuntimeConfig(mode="classic", session=SessionConfig(realtime=False)))
    try:
        session = await runtime.open_session("astronaut")
        with pytest.raises(ControlError, match=r"head_pose: classic mode cannot honour 'reference': no reference"):
            session.control({"head_pose": "reference"})
        assert session.control_state.smoothing == "none"  # classic starts without a filter, and says so
        await runtime.close_session(session)
    finally:
        await runtime.aclose()
