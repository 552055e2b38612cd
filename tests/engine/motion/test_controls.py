"""Controls: every control moves exactly its keypoints, ramps without pops, rejects bad values, keeps state."""

from __future__ import annotations

import itertools
import math
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch

from engine.keypoints import EMOTION, EYE, LIP, NUM_KP, MotionParams, SourceFace, keypoints_from_params
from engine.motion.control_schema import ControlState, ControlValueError, validate_control
from engine.motion.controls import EYES_BROWS, MOUTH, ControllerConfig, MotionControls
from engine.motion.emotion import (
    EMOTIONS,
    EmotionBank,
    emotion_soft_label,
    reference_motion,
)
from engine.motion.heads import EmotionHead


def _params(seed: int) -> MotionParams:
    g = torch.Generator().manual_seed(seed)
    return MotionParams(
        scale=torch.ones(1, 1) + 0.1 * torch.rand(1, 1, generator=g),
        pitch=torch.randn(1, generator=g) * 5,
        yaw=torch.randn(1, generator=g) * 5,
        roll=torch.randn(1, generator=g) * 5,
        t=torch.randn(1, 3, generator=g) * 0.02,
        exp=torch.randn(1, NUM_KP, 3, generator=g) * 0.02,
    )


@pytest.fixture
def source() -> SourceFace:
    kp = torch.randn(NUM_KP, 3, generator=torch.Generator().manual_seed(7)) * 0.3
    params = _params(99)
    return SourceFace(kp_canonical=kp, params=params, kp_source=keypoints_from_params(kp[None], params)[0])


@pytest.fixture
def bank() -> EmotionBank:
    g = torch.Generator().manual_seed(5)
    return EmotionBank({name: torch.randn(NUM_KP, 3, generator=g) * 0.03 for name in EMOTIONS})


class FakeMotion(NamedTuple):
    pitch: torch.Tensor
    yaw: torch.Tensor
    roll: torch.Tensor
    t: torch.Tensor
    exp: torch.Tensor
    scale: torch.Tensor
    kp: torch.Tensor


def fake_motion_net(frames: torch.Tensor) -> FakeMotion:
    """Deterministic stand-in for LivePortrait M: outputs are fixed functions of the frames' mean colour."""
    m = frames.mean(dim=(1, 2, 3))  # [B]
    bins = torch.arange(66, dtype=torch.float32)
    logits = -((bins[None] - (33 + 10 * m[:, None])) ** 2) / 8
    exp = torch.sin(torch.arange(63)[None] * 0.1 + m[:, None] * 3) * 0.05
    b = frames.shape[0]
    return FakeMotion(logits, logits.flip(-1), logits, m[:, None].repeat(1, 3) * 0.1, exp, torch.ones(b, 1), exp)


BASE = {"blink": False, "gaze": False, "loudness_lips": False, "ramp_s": 0.0}
REFERENCE_CLIP = torch.linspace(0, 1, 9)[:, None, None, None].expand(9, 3, 16, 16)


def _changed(source: SourceFace, bank: EmotionBank, message: dict[str, Any], frames: int = 12) -> set[int]:
    base = MotionControls(source, bank, state=ControlState().apply(BASE))
    ctl = MotionControls(source, bank, state=ControlState().apply(BASE))
    for c in (base, ctl):
        c.set_reference(reference_motion(REFERENCE_CLIP, fake_motion_net))
    ctl.update(message)
    changed: set[int] = set()
    for f in range(frames):
        p = _params(f)
        a = keypoints_from_params(source.kp_canonical[None], base.apply(p, f, -30.0))[0]
        b = keypoints_from_params(source.kp_canonical[None], ctl.apply(p, f, -30.0))[0]
        changed |= {int(k) for k in torch.nonzero((a - b).abs().amax(-1) > 1e-7)[:, 0]}
    return changed


@pytest.mark.parametrize(
    ("message", "region"),
    [
        ({"emotion": "happy"}, EMOTION),
        ({"emotion": "angry", "intensity": 1.5}, EMOTION),
        ({"emotion_b": "sad", "mix": 0.5}, EMOTION),
        ({"mouth_emotion": "angry"}, MOUTH),
        ({"eyes_emotion": "surprised"}, EYES_BROWS),
        ({"emotion": "fear", "pure_emotion": False}, EMOTION),
        ({"emotion_source": "reference"}, EMOTION),
        ({"lip_scale": 2.0}, LIP),
        ({"loudness_lips": True}, LIP),
        ({"blink": True, "blink_rate": 2.0}, EYE),
        ({"gaze": True}, EYE),
    ],
)
def test_control_moves_exactly_its_region(
    source: SourceFace, bank: EmotionBank, message: dict[str, Any], region: tuple[int, ...]
) -> None:
    changed = _changed(source, bank, message, frames=80)
    assert changed, f"{message} changed nothing"
    assert changed <= set(region), f"{message} moved {sorted(changed - set(region))} outside its region"


@pytest.mark.parametrize("mode", ["fixed", "reference"])
def test_head_pose_modes_change_pose_not_expression(source: SourceFace, bank: EmotionBank, mode: str) -> None:
    ctl = MotionControls(source, bank, state=ControlState().apply(BASE))
    ctl.set_reference(reference_motion(REFERENCE_CLIP, fake_motion_net))
    ctl.update({"head_pose": mode})
    for f in range(4):
        p = _params(f)
        out = ctl.apply(p, f)
        torch.testing.assert_close(out.exp, p.exp)
        torch.testing.assert_close(out.scale, p.scale)
        if mode == "fixed":
            torch.testing.assert_close(out.yaw, source.params.yaw)
            torch.testing.assert_close(out.t, source.params.t)
        else:
            assert not torch.allclose(out.yaw, p.yaw)
    assert len(_changed(source, bank, {"head_pose": mode})) == NUM_KP  # rigid motion moves every keypoint


def test_neutral_default_is_identity_and_pure_subtraction(source: SourceFace, bank: EmotionBank) -> None:
    ctl = MotionControls(source, bank, state=ControlState().apply(BASE))
    p = _params(3)
    out = ctl.apply(p, 0)
    torch.testing.assert_close(out.exp, p.exp)  # P(neutral) - P(neutral) = 0
    ctl.update({"emotion": "happy", "intensity": 0.5})
    out = ctl.apply(p, 1)
    expected = (bank.get("happy") - bank.get("neutral")) * 0.5
    torch.testing.assert_close(out.exp[0] - p.exp[0], expected)


def test_ramp_has_no_pops(source: SourceFace, bank: EmotionBank) -> None:
    ctl = MotionControls(source, bank, state=ControlState().apply({**BASE, "ramp_s": 0.4}))
    p = _params(1)
    outs = [ctl.apply(p, 0).exp]
    ctl.update({"emotion": "surprised", "intensity": 1.5, "lip_scale": 2.5})
    for f in range(1, 20):
        outs.append(ctl.apply(p, f).exp)
        if f == 4:  # a second change mid-ramp continues from where the ramp is
            ctl.update({"emotion": "angry"})
    steps = torch.stack([(b - a).abs().max() for a, b in itertools.pairwise(outs)])
    total = (outs[-1] - outs[0]).abs().max()
    assert total > 0 and steps.max() <= total / 10 * 1.5 + 1e-6
    assert steps[-5:].max() == 0  # settled after the ramp


def test_invalid_values_keep_last_state(source: SourceFace, bank: EmotionBank) -> None:
    ctl = MotionControls(source, bank)
    ctl.update({"emotion": "happy"})
    cases: list[tuple[dict[str, Any], str]] = [
        ({"emotion": "bored"}, "unknown emotion"),
        ({"intensity": float("nan")}, "outside"),
        ({"intensity": 2.0}, "outside"),
        ({"intensity": "1"}, "number"),
        ({"blink": 1}, "true or false"),
        ({"head_pose": "wild"}, "expected one of"),
        ({"colour": "red"}, "unknown control"),
        ({"head_pose": "reference"}, "no reference clip"),
    ]
    for bad, match in cases:
        with pytest.raises(ControlValueError, match=match):
            ctl.update(bad)
        assert ctl.state.emotion == "happy" and ctl.state.head_pose == "diffusion"
    assert issubclass(ControlValueError, ValueError)


def test_validate_control_normalises() -> None:
    assert validate_control({"emotion": "Happy", "intensity": 1}) == {"emotion": "happy", "intensity": 1.0}
    with pytest.raises(ControlValueError, match="JSON object"):
        validate_control(["emotion"])  # type: ignore[arg-type]
    with pytest.raises(ControlValueError):
        ControlState(intensity=-0.1)


def test_emotion_labels() -> None:
    lab = emotion_soft_label("neutral")
    np.testing.assert_allclose(lab[4], 0.997657, atol=1e-6)
    np.testing.assert_allclose(lab[0], 3.3468e-4, rtol=1e-4)
    assert abs(float(emotion_soft_label(["happy", "sad"]).sum()) - 1) < 1e-6
    ctl = MotionControls(SourceFace(torch.zeros(NUM_KP, 3), _params(0), torch.zeros(NUM_KP, 3)))
    ctl.update({"emotion": "happy", "emotion_b": "sad", "mix": 0.25})
    label = ctl.emotion_label()
    assert math.isclose(label[3], 0.75 * lab[4] + 0.25 * lab[0], rel_tol=1e-5)
    assert math.isclose(label[5], 0.25 * lab[4] + 0.75 * lab[0], rel_tol=1e-5)


def test_emotion_bank_from_iedp_head() -> None:
    torch.manual_seed(0)
    head = EmotionHead(len(EMOTIONS), hidden=16)
    bank = EmotionBank.from_head(head, lambda name: torch.eye(len(EMOTIONS))[EMOTIONS.index(name)][None, None])
    outside = [k for k in range(NUM_KP) if k not in EMOTION]
    assert all(torch.all(bank.get(e)[outside] == 0) for e in EMOTIONS)
    assert not torch.equal(bank.get("happy"), bank.get("sad"))
    with pytest.raises(ValueError, match="unknown emotion"):
        bank.get("bored")


def test_blinks_and_gaze_are_seeded(source: SourceFace) -> None:
    def run(seed: int) -> torch.Tensor:
        ctl = MotionControls(source, config=ControllerConfig(seed=seed), state=ControlState(blink_rate=1.0))
        return torch.stack([ctl.apply(_params(0), f).exp for f in range(150)])

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    eye_y = a[:, 0, list(EYE), 1].mean(-1)
    assert (eye_y < eye_y.max() - 0.01).any()  # at least one blink in 6 s at 1 blink/s


def test_reference_motion_with_tiny_liveportrait() -> None:
    liveportrait = pytest.importorskip("engine.models.liveportrait")
    nets = liveportrait.build("tiny")
    size = nets.config.input_size
    frames = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    ref = reference_motion(frames, nets.motion)
    assert ref.params.exp.shape == (3, NUM_KP, 3) and ref.pose.shape == (3, 7)
    torch.testing.assert_close(ref.pose[0], torch.zeros(7))
    outside = [k for k in range(NUM_KP) if k not in EMOTION]
    assert torch.all(ref.emotion_offset[outside] == 0)
