"""Temporal smoothing of motion: One-Euro filter and a constant-velocity Kalman filter (PC-Talk).

Both are configured by the lag they may add: ``lag_frames`` bounds the step-response delay (frames from a step
in the input until the output crosses half of it). The One-Euro filter derives its minimum cutoff from it; the
Kalman filter picks the largest measurement noise that still meets it. Jitter is reduced as far as that
bound allows. Filters run per dimension on ``[D]`` float64 tensors, one call per frame, on the tensors' device
(the motion's: no host round trip per frame; the Kalman gain depends only on the model, so it is kept on the host).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from engine.keypoints import NUM_KP, MotionParams

PARAMS_DIM = 7 + NUM_KP * 3  # pitch, yaw, roll, tx, ty, tz, scale, exp 63


@dataclass(frozen=True)
class OneEuroConfig:
    fps: float = 25.0
    lag_frames: float = 2.0  # step-response delay bound at rest (the minimum cutoff follows from it)
    beta: float = 0.5  # cutoff increase per unit of speed (units/s): fast moves get through faster
    d_cutoff: float = 1.0  # Hz, for the speed estimate

    def __post_init__(self) -> None:
        if not (self.fps > 0 and self.lag_frames >= 1 and self.beta >= 0 and self.d_cutoff > 0):
            raise ValueError("OneEuroConfig: need fps > 0, lag_frames >= 1, beta >= 0, d_cutoff > 0")

    @property
    def min_cutoff(self) -> float:
        """Cutoff (Hz) whose exponential smoothing reaches half a step after exactly ``lag_frames`` frames."""
        alpha = 1.0 - 0.5 ** (1.0 / (self.lag_frames + 1.0))  # the step frame itself counts as the first
        tau = (1.0 / self.fps) * (1.0 / alpha - 1.0)
        return 1.0 / (2.0 * math.pi * tau)


def _alpha(cutoff: Tensor | float, fps: float) -> Tensor | float:
    tau = 1.0 / (2.0 * math.pi * cutoff)
    return 1.0 / (1.0 + tau * fps)


def _vector(x: Tensor | np.ndarray) -> Tensor:
    return torch.as_tensor(x).to(torch.float64)


class OneEuroFilter:
    """Casiez et al.'s One-Euro filter, vectorised over dimensions."""

    def __init__(self, config: OneEuroConfig | None = None) -> None:
        self.config = config or OneEuroConfig()
        self.reset()

    def reset(self) -> None:
        self._x: Tensor | None = None
        self._dx: Tensor | None = None

    def __call__(self, x: Tensor | np.ndarray) -> Tensor:
        cfg = self.config
        x = _vector(x)
        if self._x is None or self._dx is None:
            self._x, self._dx = x.clone(), torch.zeros_like(x)
            return x.clone()
        dx = (x - self._x) * cfg.fps
        self._dx = self._dx + _alpha(cfg.d_cutoff, cfg.fps) * (dx - self._dx)
        a = _alpha(cfg.min_cutoff + cfg.beta * self._dx.abs(), cfg.fps)
        self._x = self._x + a * (x - self._x)
        return self._x.clone()


@dataclass(frozen=True)
class KalmanConfig:
    lag_frames: float = 1.0  # step-response delay bound
    process_noise: float = 1.0  # white-acceleration variance; only the ratio to the measurement noise matters

    def __post_init__(self) -> None:
        if not (self.lag_frames >= 0 and self.process_noise > 0):
            raise ValueError("KalmanConfig: need lag_frames >= 0 and process_noise > 0")


_F = np.array([[1.0, 1.0], [0.0, 1.0]])
_H = np.array([[1.0, 0.0]])
_Q = np.array([[0.25, 0.5], [0.5, 1.0]])  # white acceleration, dt = 1 frame


def _steady_state(q: float, r: float) -> np.ndarray:
    """Steady-state prior covariance of the constant-velocity model (Riccati iteration)."""
    p = np.eye(2) * 1e3
    for _ in range(2000):
        s = float(p[0, 0]) + r
        k = p @ _H.T / s
        p_new = _F @ ((np.eye(2) - k @ _H) @ p) @ _F.T + q * _Q
        if np.allclose(p_new, p, rtol=1e-12, atol=1e-15):
            break
        p = p_new
    return p


def _position_gain(q: float, r: float) -> float:
    p = _steady_state(q, r)
    return float(p[0, 0] / (p[0, 0] + r))


def _step_delay(q: float, r: float, frames: int = 60) -> int:
    """Frames after a unit step until the filter output first reaches 0.5 (steady-state start)."""
    p = _steady_state(q, r)
    x = np.zeros(2)
    for i in range(frames):
        s = float(p[0, 0]) + r
        k = (p @ _H.T / s)[:, 0]
        x = x + k * (1.0 - x[0])
        if x[0] >= 0.5:
            return i
        x = _F @ x
        p = _F @ ((np.eye(2) - np.outer(k, _H[0])) @ p) @ _F.T + q * _Q
    return frames


class KalmanFilter:
    """Constant-velocity Kalman filter per dimension (state: value, velocity), steady-state gain."""

    def __init__(self, config: KalmanConfig | None = None) -> None:
        self.config = cfg = config or KalmanConfig()
        q = cfg.process_noise
        # The steady-state position gain must be at least an exponential smoother's with this lag; take the
        # largest measurement noise (most smoothing) that keeps it there: bisection in log r (gain falls with r).
        alpha_min = 1.0 - 0.5 ** (1.0 / (cfg.lag_frames + 1.0))
        lo, hi = -8.0, 8.0
        for _ in range(50):
            mid = (lo + hi) / 2
            if _position_gain(q, 10.0**mid) >= alpha_min:
                lo = mid
            else:
                hi = mid
        self.measurement_noise = 10.0**lo
        self._p0 = _steady_state(q, self.measurement_noise)
        self.reset()

    def reset(self) -> None:
        self._x: Tensor | None = None  # [2, D]: value, velocity
        self._p = self._p0.copy()

    def __call__(self, z: Tensor | np.ndarray) -> Tensor:
        z = _vector(z)
        if self._x is None:
            self._x = torch.stack([z, torch.zeros_like(z)])
            return z.clone()
        q, r = self.config.process_noise, self.measurement_noise
        position, velocity = self._x[0] + self._x[1], self._x[1]  # predict with F = [[1, 1], [0, 1]]
        p = _F @ self._p @ _F.T + q * _Q
        k = p @ _H.T / (float(p[0, 0]) + r)  # [2, 1]; the same gain for every dimension (host maths)
        innovation = z - position
        self._x = torch.stack([position + float(k[0, 0]) * innovation, velocity + float(k[1, 0]) * innovation])
        self._p = (np.eye(2) - k @ _H) @ p
        return self._x[0].clone()


def step_delay(filter_: OneEuroFilter | KalmanFilter, frames: int = 60) -> int:
    """Measured step-response delay of a fresh filter (1-d): frames until the output reaches half the step."""
    filter_.reset()
    for _ in range(5):
        filter_(torch.zeros(1))
    for i in range(frames):
        if float(filter_(torch.ones(1))[0]) >= 0.5:
            filter_.reset()
            return i
    filter_.reset()
    return frames


def params_to_vector(params: MotionParams) -> Tensor:
    """Batch-1 :class:`MotionParams` -> ``[70]`` float64 on their device (pitch, yaw, roll, t 3, scale, exp 63)."""
    p = params
    parts = [p.pitch.reshape(1), p.yaw.reshape(1), p.roll.reshape(1), p.t.reshape(3), p.scale.reshape(1)]
    return torch.cat([*parts, p.exp.reshape(-1)]).detach().double()


def vector_to_params(v: Tensor, like: MotionParams) -> MotionParams:
    t = torch.as_tensor(v).to(like.exp.device, like.exp.dtype)
    return MotionParams(
        scale=t[6:7].reshape(1, 1),
        pitch=t[0:1],
        yaw=t[1:2],
        roll=t[2:3],
        t=t[3:6].reshape(1, 3),
        exp=t[7:].reshape(1, NUM_KP, 3),
    )


class ParamsSmoother:
    """Applies a filter to successive batch-1 :class:`MotionParams`."""

    def __init__(self, filter_: OneEuroFilter | KalmanFilter) -> None:
        self.filter = filter_

    def reset(self) -> None:
        self.filter.reset()

    def __call__(self, params: MotionParams) -> MotionParams:
        return vector_to_params(self.filter(params_to_vector(params)), params)


def make_smoother(mode: str, lag_frames: float = 2.0, fps: float = 25.0) -> ParamsSmoother | None:
    """``"none"`` -> None; ``"one_euro"`` / ``"kalman"`` with the given lag bound."""
    if mode == "none":
        return None
    if mode == "one_euro":
        return ParamsSmoother(OneEuroFilter(OneEuroConfig(fps=fps, lag_frames=lag_frames)))
    if mode == "kalman":
        return ParamsSmoother(KalmanFilter(KalmanConfig(lag_frames=lag_frames)))
    raise ValueError(f"unknown smoothing mode {mode!r}; choose none, one_euro or kalman")
