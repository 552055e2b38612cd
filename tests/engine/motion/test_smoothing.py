"""Smoothing: One-Euro and Kalman reduce jitter and keep the step-response delay within the configured lag."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from engine.keypoints import NUM_KP, MotionParams
from engine.motion.smoothing import (
    KalmanConfig,
    KalmanFilter,
    OneEuroConfig,
    OneEuroFilter,
    make_smoother,
    params_to_vector,
    step_delay,
    vector_to_params,
)


def _noisy(n: int = 300, dims: int = 4, noise: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    t = np.arange(n)[:, None]
    clean = np.sin(t / 25.0 + np.arange(dims)[None]) * 0.5  # slow motion: ~0.16 Hz at 25 fps
    return clean, clean + np.random.default_rng(0).standard_normal((n, dims)) * noise


def _jitter(x: np.ndarray) -> float:
    return float(np.std(np.diff(x, n=2, axis=0)))


@pytest.mark.parametrize(
    "make",
    [
        lambda lag: OneEuroFilter(OneEuroConfig(lag_frames=lag)),
        lambda lag: KalmanFilter(KalmanConfig(lag_frames=lag)),
    ],
    ids=["one_euro", "kalman"],
)
@pytest.mark.parametrize("lag", [1, 2, 4])
def test_jitter_reduced_and_lag_bounded(make: Any, lag: int) -> None:
    f = make(lag)
    clean, noisy = _noisy()
    out = np.stack([f(row) for row in noisy])
    assert _jitter(out) < 0.5 * _jitter(noisy)
    assert np.abs(out - clean)[50:].mean() < 0.1  # still follows the motion
    delay = step_delay(f)
    assert delay <= lag


def test_more_lag_allows_more_smoothing() -> None:
    _, noisy = _noisy()
    jit = []
    for lag in (1, 4):
        f = KalmanFilter(KalmanConfig(lag_frames=lag))
        jit.append(_jitter(np.stack([f(row) for row in noisy])))
    assert jit[1] < jit[0]
    assert OneEuroConfig(lag_frames=4).min_cutoff < OneEuroConfig(lag_frames=1).min_cutoff


def test_first_sample_passes_through_and_reset() -> None:
    for f in (OneEuroFilter(), KalmanFilter()):
        np.testing.assert_array_equal(f(np.array([3.0, -1.0])), [3.0, -1.0])
        f(np.array([10.0, 10.0]))
        f.reset()
        np.testing.assert_array_equal(f(np.array([5.0, 5.0])), [5.0, 5.0])


def test_params_smoother_roundtrip() -> None:
    p = MotionParams(
        torch.ones(1, 1),
        torch.tensor([1.0]),
        torch.tensor([2.0]),
        torch.tensor([3.0]),
        torch.ones(1, 3),
        torch.ones(1, NUM_KP, 3),
    )
    v = params_to_vector(p)
    assert v.shape == (70,)
    back = vector_to_params(v, p)
    for name in MotionParams._fields:
        torch.testing.assert_close(getattr(back, name), getattr(p, name))
    sm = make_smoother("kalman")
    assert sm is not None and make_smoother("none") is None
    torch.testing.assert_close(sm(p).yaw, p.yaw)
    with pytest.raises(ValueError, match="smoothing mode"):
        make_smoother("median")
    with pytest.raises(ValueError):
        OneEuroConfig(lag_frames=0.5)
