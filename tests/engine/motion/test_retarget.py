"""Blinks and rest lips through the retargeting networks, and the blink schedule of neural motion's controls."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.avatar.default import default_landmarks
from engine.keypoints import EYE, LIP, NUM_KP, MotionParams, SourceFace, keypoints_from_params
from engine.models import liveportrait
from engine.motion.control_schema import ControlState
from engine.motion.controls import ControllerConfig, MotionControls
from engine.motion.retarget import Retargeting, open_ratios


def _source() -> SourceFace:
    g = torch.Generator().manual_seed(4)
    params = MotionParams(
        torch.full((1, 1), 1.5), torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1, 3),
        torch.randn(1, NUM_KP, 3, generator=g) * 0.02,
    )  # fmt: skip
    kp = torch.randn(NUM_KP, 3, generator=g) * 0.3
    return SourceFace(kp, params, keypoints_from_params(kp[None], params)[0])


class LinearNet(torch.nn.Module):
    """A stand-in retargeting MLP whose output is linear in its last input (the target ratio): what it is asked for
    is visible in what it returns."""

    def __init__(self, inputs: int) -> None:
        super().__init__()
        self.inputs = inputs
        self.calls: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == self.inputs
        self.calls.append(x.detach().clone())
        return x[:, -1:].repeat(1, NUM_KP * 3) * torch.linspace(1, 2, NUM_KP * 3)


def test_open_ratios_of_the_default_face() -> None:
    ratios = open_ratios(default_landmarks(), "engine68")
    assert ratios is not None
    eyes, lip = ratios
    assert np.all((eyes > 0.15) & (eyes < 0.5)) and abs(eyes[0] - eyes[1]) < 0.05  # two open, alike eyes
    assert 0.0 <= lip < 0.1  # nearly closed (drawn a little parted: 0.036, over LivePortrait's 0.03 threshold)
    assert open_ratios(None, "engine68") is None and open_ratios(np.zeros((5, 2)), "user5") is None


def test_blink_drives_the_eye_ratio_to_zero_and_moves_only_the_eyes() -> None:
    source = _source()
    eye = LinearNet(NUM_KP * 3 + 3)
    rt = Retargeting(source, eye, None, np.array([0.3, 0.32]), None, steps=4)
    targets = eye.calls[0][:, -1]
    torch.testing.assert_close(targets, torch.tensor([0.31, 0.2325, 0.155, 0.0775, 0.0]))  # open .. shut
    torch.testing.assert_close(eye.calls[0][:, 63:65], torch.tensor([[0.3, 0.32]]).expand(5, 2))  # the source's
    scale = torch.full((1, 1), 1.5)
    assert float(rt.blink(0.0, scale).abs().max()) == 0.0  # no closure: exactly nothing
    full, half = rt.blink(1.0, scale), rt.blink(0.5, scale)
    outside = [k for k in range(NUM_KP) if k not in EYE]
    assert torch.all(full[0, outside] == 0) and float(full.abs().max()) > 0
    torch.testing.assert_close(half, full / 2)  # linear net, linear table
    expected = -0.31 * torch.linspace(1, 2, 63).reshape(NUM_KP, 3)[list(EYE)] / 1.5  # keypoint offset / scale
    torch.testing.assert_close(full[0, list(EYE)], expected)
    assert rt.rest_lips(1.0, scale) is None  # no lip network


def test_rest_lips_close_only_an_open_source_mouth() -> None:
    source = _source()
    lip = LinearNet(NUM_KP * 3 + 2)
    assert Retargeting(source, None, lip, None, 0.01).lip_close is None  # closed already: nothing to do
    rt = Retargeting(source, None, lip, None, 0.2)
    torch.testing.assert_close(lip.calls[-1][:, -1], torch.tensor([0.2, 0.0]))  # from its own ratio to shut
    offset = rt.rest_lips(0.5, torch.ones(1, 1))
    assert offset is not None and float(offset.abs().max()) > 0
    assert torch.all(offset[0, [k for k in range(NUM_KP) if k not in LIP]] == 0)
    assert rt.rest_lips(0.0, torch.ones(1, 1)) is None


def test_untrained_networks_blink_small_but_only_the_eyes() -> None:
    nets = liveportrait.build("tiny")
    source = _source()
    rt = Retargeting(source, nets.eye, nets.lip, np.array([0.3, 0.3]), 0.1)
    full = rt.blink(1.0, torch.ones(1, 1))
    assert full is not None and rt.lip_close is not None
    # random weights: measured 2e-3 at full closure (the trained network's is what closes a real eye)
    assert 1e-5 < float(full.abs().max()) < 0.1
    assert torch.all(full[0, [k for k in range(NUM_KP) if k not in EYE]] == 0)


def _blinks(ctl: MotionControls, frames: int, start: int = 0) -> list[int]:
    p = MotionParams(torch.ones(1, 1), torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1, 3),
                     torch.zeros(1, NUM_KP, 3))  # fmt: skip
    ys = [float(ctl.apply(p, f).exp[0, list(EYE), 1].abs().max()) for f in range(start, start + frames)]
    # blink starts; one already under way at ``start`` is not counted (it finishes whatever the rate)
    return [start + i for i, y in enumerate(ys) if y > 0 and i > 0 and ys[i - 1] == 0]


BASE = {"gaze": False, "ramp_s": 0.0, "head_pose": "fixed"}


def test_blink_rate_zero_never_blinks_and_a_rate_applies_from_the_first_blink() -> None:
    source = _source()
    never = MotionControls(source, state=ControlState(blink_rate=0.0, **BASE))  # type: ignore[arg-type]
    assert _blinks(never, 250) == []  # 10 s without a blink (before: one pre-drawn blink)
    firsts, gaps = [], []
    for seed in range(12):
        ctl = MotionControls(source, config=ControllerConfig(seed=seed), state=ControlState(blink_rate=0.1, **BASE))
        ctl.update({"blink_rate": 2.0})  # set at session start, before any frame: the first blink follows it
        starts = _blinks(ctl, 250)
        firsts.append(starts[0] / 25.0)
        gaps += list(np.diff(starts) / 25.0)
    assert np.median(firsts) < 1.0 and max(firsts) < 2.0  # at 0.1 / s the first would come ~10 s in
    assert abs(np.mean(gaps) - 0.5) < 0.1 and min(gaps) >= 0.34  # 2 per second, never closer than 0.35 s
    # changed mid-stream: re-drawn from the change; 0 stops them
    ctl = MotionControls(source, config=ControllerConfig(seed=3), state=ControlState(blink_rate=2.0, **BASE))
    assert _blinks(ctl, 50)
    ctl.update({"blink_rate": 0.0})
    assert _blinks(ctl, 250, start=50) == []


@pytest.mark.parametrize("rate", [0.3, 1.0])
def test_blinks_use_the_eye_network_when_given(rate: float) -> None:
    source = _source()
    rt = Retargeting(source, LinearNet(NUM_KP * 3 + 3), None, np.array([0.3, 0.3]), None)
    plain = MotionControls(source, state=ControlState(blink_rate=rate, **BASE))  # type: ignore[arg-type]
    net = MotionControls(source, state=ControlState(blink_rate=rate, **BASE), retargeting=rt)  # type: ignore[arg-type]
    assert _blinks(plain, 150) == _blinks(net, 150)  # same seeded schedule, other closure
    p = MotionParams(torch.ones(1, 1), torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1, 3),
                     torch.zeros(1, NUM_KP, 3))  # fmt: skip
    net.reset()
    frame = _blinks(MotionControls(source, state=ControlState(blink_rate=rate, **BASE)), 150)[0] + 2  # type: ignore[arg-type]
    out = [net.apply(p, f).exp for f in range(frame + 1)][-1]
    amount = np.sin(np.pi * 2.5 / 6)  # the blink's closure curve two frames in
    torch.testing.assert_close(out, rt.blink(float(amount), p.scale), atol=1e-5, rtol=1e-4)
