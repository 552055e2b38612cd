"""WindowScheduler: latency, one frame per row, chunking == offline, continuity, clipping, interrupt; decode."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from engine.keypoints import EYE, LIP, NUM_KP, MotionParams, SourceFace, bins_to_degrees
from engine.motion import lmdm
from engine.motion.decode import (
    EXP,
    MOTION_DIM,
    PITCH,
    SCALE,
    YAW,
    MotionBounds,
    MotionStitch,
    decode_motion,
    degrees_to_logits,
    encode_motion,
)
from engine.motion.emotion import emotion_soft_label
from engine.motion.scheduler import SchedulerConfig, SourceCondition, WindowScheduler, assemble_condition

FEAT_DIM = 81  # 80 log-mels + loudness
SILENCE = np.full(FEAT_DIM, -13.8, np.float32)


@pytest.fixture(scope="module")
def den() -> lmdm.MotionDecoder:
    return lmdm.build("tiny", cond_dim=lmdm.logmel_cond_dim())


class Spy:
    """Wraps a denoiser, recording the condition and cond_frame of every call."""

    def __init__(self, inner: lmdm.MotionDecoder) -> None:
        self.inner, self.config = inner, inner.config
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(
        self, x: Any, cond_frame: Any, cond: Any, t: Any, drop_cond: bool = False, drop_mask: Any = None
    ) -> Any:
        self.calls.append((cond_frame.clone(), cond.clone()))
        return self.inner(x, cond_frame, cond, t, drop_cond=drop_cond, drop_mask=drop_mask)


def _sched(den: object, **kw: object) -> WindowScheduler:
    cfg = SchedulerConfig(**{"steps": 3, **kw})  # type: ignore[arg-type]
    sc = SourceCondition(sc=tuple(np.linspace(-0.5, 0.5, 63).tolist()))
    return WindowScheduler(den, SILENCE, torch.zeros(MOTION_DIM), sc, cfg)  # type: ignore[arg-type]


def _feats(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, FEAT_DIM)).astype(np.float32)


def test_first_frame_after_hop_plus_lookahead(den: lmdm.MotionDecoder) -> None:
    s = _sched(den)
    feats = _feats(12)
    assert s.push(feats[:6]) == []
    frames = s.push(feats[6:7])  # H + L = 7 rows
    assert [f.frame_index for f in frames] == [0, 1, 2, 3, 4]
    assert s.push(feats[7:11]) == []
    assert [f.frame_index for f in s.push(feats[11:12])] == [5, 6, 7, 8, 9]
    assert [f.frame_index for f in s.flush()] == [10, 11]
    assert frames[0].params.exp.shape == (1, NUM_KP, 3)


@pytest.mark.parametrize("seed", range(3))
def test_random_chunking_equals_offline(den: lmdm.MotionDecoder, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    feats = _feats(n, seed)
    s = _sched(den, seed=seed)
    offline = s.offline(feats)
    assert offline.shape == (n, MOTION_DIM)
    got: list[torch.Tensor] = []
    indices: list[int] = []
    i = 0
    while i < n:
        k = int(rng.integers(0, 9))
        start, vec = s.push_vectors(feats[i : i + k])
        indices.extend(range(start, start + vec.shape[0]))
        got.append(vec)
        i += k
    start, vec = s.flush_vectors()
    indices.extend(range(start, start + vec.shape[0]))
    assert indices == list(range(n))
    assert torch.equal(torch.cat([*got, vec]), offline)


def test_seeded_and_seed_dependent(den: lmdm.MotionDecoder) -> None:
    feats = _feats(15)
    a = _sched(den, seed=1).offline(feats)
    assert torch.equal(a, _sched(den, seed=1).offline(feats))
    assert not torch.equal(a, _sched(den, seed=2).offline(feats))


def test_silence_past_and_continuity_conditioning(den: lmdm.MotionDecoder) -> None:
    spy = Spy(den)
    s = _sched(spy, guidance=1.0)  # one denoiser call per step
    feats = _feats(12)
    first = s.push_vectors(feats[:7])[1]
    cond_frame0, cond0 = spy.calls[0]
    assert torch.equal(cond_frame0, torch.zeros(1, MOTION_DIM))  # init motion before the first frame
    np.testing.assert_array_equal(cond0[0, :73, :80].numpy(), np.tile(SILENCE[:80], (73, 1)))  # past = silence
    np.testing.assert_array_equal(cond0[0, 73:, :80].numpy(), feats[:7, :80])
    np.testing.assert_allclose(cond0[0, 0, 80:88].numpy(), emotion_soft_label("neutral"))
    spy.calls.clear()
    s.push_vectors(feats[7:12])
    assert torch.equal(spy.calls[0][0][0], first[-1])  # conditioned on the last frame shown


def test_window_start_cond_frame_mode(den: lmdm.MotionDecoder) -> None:
    spy = Spy(den)
    s = _sched(spy, guidance=1.0, cond_frame="window_start", steps=1)
    shown = s.push_vectors(_feats(82))[1]
    # window k starts at 5k + 7 - 80: before frame 0 until k = 15 (start 2: frame 1 is the one before it)
    assert len(spy.calls) == 16
    assert torch.equal(spy.calls[14][0], torch.zeros(1, MOTION_DIM))
    assert torch.equal(spy.calls[15][0][0], shown[1])


def test_clipping(den: lmdm.MotionDecoder) -> None:
    class Huge:
        config = den.config

        def __call__(
            self, x: Any, cond_frame: Any, cond: Any, t: Any, drop_cond: bool = False, drop_mask: Any = None
        ) -> Any:
            return torch.full_like(x, 1e6)

    out = _sched(Huge()).offline(_feats(10))
    bounds = MotionBounds.default()
    assert torch.all(out <= torch.tensor(bounds.hi)) and out[:, EXP].max() == 0.5


def test_interrupt_drops_pending_and_ramps(den: lmdm.MotionDecoder) -> None:
    s = _sched(den, interrupt_ramp=10)
    feats = _feats(30)
    shown = s.push_vectors(feats[:9])[1]  # frames 0..4 shown; rows 5..8 pending
    s.interrupt()
    start, after = s.push_vectors(feats[9:16])
    assert start == 5 and after.shape[0] == 5  # pending rows dropped: indices continue at 5 with new rows
    ramp_first = (after[0] - shown[-1]).abs().max()
    fresh = _sched(den).offline(feats[9:16])
    assert ramp_first < (fresh[0] - shown[-1]).abs().max()  # starts close to what was on screen
    with pytest.raises(ValueError, match="features must be"):
        s.push(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        s.push(np.full((1, FEAT_DIM), np.nan, np.float32))


def test_config_validation(den: lmdm.MotionDecoder) -> None:
    for bad in ({"lookahead": 1}, {"hop": 0}, {"hop": 40, "lookahead": 40}, {"smooth_k": 2}, {"cond_frame": "x"}):
        with pytest.raises(ValueError):
            SchedulerConfig(**bad)
    with pytest.raises(ValueError, match="windows"):
        _sched(den, window=60)


def test_condition_layout_ditto() -> None:
    sc = SourceCondition(sc=tuple(range(63)), eye_open=(0.1, 0.2), eye_ball=(1, 2, 3, 4, 5, 6))
    audio = np.random.default_rng(0).standard_normal((80, 1024)).astype(np.float32)
    emo = np.tile(emotion_soft_label("happy"), (80, 1))
    cond = assemble_condition(audio, emo, sc)
    assert cond.shape == (80, 1103)
    np.testing.assert_array_equal(cond[:, :1024], audio)
    np.testing.assert_array_equal(cond[:, 1024:1032], emo)
    np.testing.assert_allclose(cond[5, 1032:1034], [0.1, 0.2])
    np.testing.assert_array_equal(cond[5, 1034:1040], [1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(cond[5, 1040:], np.arange(63))


# --- decode ---


def _source() -> SourceFace:
    g = torch.Generator().manual_seed(0)
    params = MotionParams(
        scale=torch.tensor([[1.3]]),
        pitch=torch.tensor([4.0]),
        yaw=torch.tensor([-12.0]),
        roll=torch.tensor([2.0]),
        t=torch.tensor([[0.01, -0.02, 0.0]]),
        exp=torch.randn(1, NUM_KP, 3, generator=g) * 0.02,
    )
    return SourceFace(torch.randn(NUM_KP, 3, generator=g), params, torch.zeros(NUM_KP, 3))


def test_degrees_logits_roundtrip() -> None:
    deg = torch.tensor([-90.0, -30.0, 0.0, 17.3, 95.0])
    np.testing.assert_allclose(bins_to_degrees(degrees_to_logits(deg)).numpy(), deg.numpy(), atol=1e-3)
    p = _source().params
    back = decode_motion(encode_motion(p))
    for name in MotionParams._fields:
        torch.testing.assert_close(getattr(back, name), getattr(p, name), atol=1e-3, rtol=0)


def test_motion_stitch() -> None:
    src = _source()
    stitch = MotionStitch(src)
    g = torch.Generator().manual_seed(1)
    x_d = torch.randn(4, MOTION_DIM, generator=g)
    out = stitch.relative(x_d)
    torch.testing.assert_close(out[0], stitch.x_s[0])  # d0 = the first driving frame: frame 0 is the source
    assert torch.equal(out[:, SCALE], stitch.x_s[:, SCALE].expand(4, 1))
    exp = out[:, EXP].reshape(4, NUM_KP, 3)
    others = [k for k in range(NUM_KP) if k not in LIP + EYE]
    torch.testing.assert_close(exp[:, others], src.params.exp[:, others].expand(4, -1, -1), atol=1e-6, rtol=0)
    # gaze fix: kp 11 x (exp[33]) moves with yaw, kp 11 y (exp[34]) against pitch
    rel = stitch.x_s + (x_d - x_d[:1])
    dx = 0.26 * (bins_to_degrees(rel[:, YAW]) - bins_to_degrees(stitch.x_s[:, YAW]))
    dy = 0.28 * (bins_to_degrees(rel[:, PITCH]) - bins_to_degrees(stitch.x_s[:, PITCH]))
    expected33 = rel[:, 202 + 33] + dx * torch.where(dx > 0, 0.0007, 0.001)
    torch.testing.assert_close(out[:, 202 + 33], expected33)
    torch.testing.assert_close(out[:, 202 + 46], rel[:, 202 + 46] - 0.001 * dy)
    params = stitch(x_d)
    assert params.exp.shape == (4, NUM_KP, 3) and math.isclose(float(params.scale[0]), 1.3, rel_tol=1e-5)
