"""Small deterministic implementations of the stage protocols for the streaming tests.

They are real ``FeatureStage`` / ``MotionStage`` / ``Renderer`` implementations (simple enough that a test can
predict every output), not mocks of the code under test.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from engine.avatar.record import Avatar
from engine.keypoints import NUM_KP, MotionParams, keypoints_from_params
from engine.motion.base import MotionFrame
from engine.render.base import PreparedAvatar, SourceFace
from streaming.clock import Clock, frame_bound

EMOTIONS = ("neutral", "happy", "sad")


def frame_rms(pcm: np.ndarray, fps: int) -> np.ndarray:
    """Per-frame RMS of 16 kHz audio on the session's frame grid (last frame: the samples it has)."""
    rows = []
    n = 0
    while frame_bound(n, fps) < pcm.size:
        part = pcm[frame_bound(n, fps) : frame_bound(n + 1, fps)]
        rows.append(float(np.sqrt(np.mean(part.astype(np.float64) ** 2))))
        n += 1
    return np.asarray(rows, np.float32)


class RmsFeatures:
    """FeatureStage: one row per frame, ``[rms]`` of the frame's samples; no lookahead."""

    dim = 1

    def __init__(self, fps: int = 25) -> None:
        self.fps = fps
        self.reset()

    def reset(self) -> None:
        self._buf = np.zeros(0, np.float32)
        self._row = 0

    def _size(self) -> int:
        return frame_bound(self._row + 1, self.fps) - frame_bound(self._row, self.fps)

    def push(self, pcm: np.ndarray) -> np.ndarray:
        self._buf = np.concatenate([self._buf, pcm.astype(np.float32)])
        rows = []
        while self._buf.size >= self._size():
            size = self._size()
            part, self._buf = self._buf[:size], self._buf[size:]
            rows.append([np.sqrt(np.mean(part.astype(np.float64) ** 2))])
            self._row += 1
        return np.asarray(rows, np.float32).reshape(-1, 1)

    def flush(self) -> np.ndarray:
        if self._buf.size == 0:
            return np.zeros((0, 1), np.float32)
        row = np.asarray([[np.sqrt(np.mean(self._buf.astype(np.float64) ** 2))]], np.float32)
        self._buf = np.zeros(0, np.float32)
        self._row += 1
        return row


class MouthMotion:
    """MotionStage: mouth opening = feature x gain, released ``lookahead_frames`` rows late.

    ``yaw`` and ``t`` carry the emotion intensity (so a test sees controls); an interrupt drops the held rows (their
    frames are never emitted, their indices are reused) and the next frames ease back to idle over ``ease`` frames.
    """

    def __init__(self, lookahead_frames: int = 2, gain: float = 4.0, ease: int = 3) -> None:
        self.lookahead_frames = lookahead_frames
        self.gain = gain
        self.ease = ease
        self._rows: list[float] = []
        self._next = 0  # next frame index to emit
        self._pushed = 0
        self._from = 0.0  # mouth value an interrupt eases from
        self._eased = ease  # frames since the interrupt
        self._last = 0.0
        self.state: dict[str, Any] = {"emotion": "neutral", "intensity": 0.0}
        self.interrupts = 0

    def update_controls(self, values: Mapping[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(values) - {"emotion", "intensity"})
        if unknown:
            raise ValueError(f"unknown control(s) {unknown}")
        new = dict(self.state)
        if "emotion" in values:
            if values["emotion"] not in EMOTIONS:
                raise ValueError(f"unknown emotion {values['emotion']!r}")
            new["emotion"] = values["emotion"]
        if "intensity" in values:
            x = values["intensity"]
            if not isinstance(x, int | float) or not np.isfinite(x) or not 0.0 <= x <= 1.0:
                raise ValueError(f"intensity must be in [0, 1], got {x!r}")
            new["intensity"] = float(x)
        self.state = new
        return dict(new)

    def _frame(self, index: int, value: float) -> MotionFrame:
        if self._eased < self.ease:
            self._eased += 1
            w = self._eased / self.ease
            value = (1 - w) * self._from + w * value
        self._last = value
        exp = torch.zeros(1, NUM_KP, 3)
        exp[0, :, 1] = value
        params = MotionParams(
            scale=torch.ones(1, 1),
            pitch=torch.zeros(1),
            yaw=torch.full((1,), 10.0 * self.state["intensity"]),
            roll=torch.zeros(1),
            t=torch.tensor([[0.5 * self.state["intensity"], 0.0, 0.0]]),
            exp=exp,
        )
        return MotionFrame(index, params)

    def push(self, features: np.ndarray) -> list[MotionFrame]:
        self._rows.extend(float(r) * self.gain for r in np.asarray(features).reshape(-1))
        self._pushed += len(features)
        out = []
        while self._pushed - self._next > self.lookahead_frames:
            out.append(self._frame(self._next, self._rows.pop(0)))
            self._next += 1
        return out

    def flush(self) -> list[MotionFrame]:
        out = []
        while self._rows:
            out.append(self._frame(self._next, self._rows.pop(0)))
            self._next += 1
        return out

    def interrupt(self) -> None:
        self.interrupts += 1
        # the held rows are dropped and their indices reused (as the diffusion scheduler does): the session must
        # map the stage's numbering back onto its clock
        self._pushed = self._next
        self._rows.clear()
        self._from = self._last
        self._eased = 0


class PatternRenderer:
    """Renderer: each frame is a deterministic function of its own keypoints only (so batching cannot change it).

    Pixel ``(i, j)`` of channel ``c`` is ``sigmoid(kp.sum() * (c + 1) / 40 + (i - j) / size)``. With a clock,
    each render call costs ``cost_s`` per frame on it (a slow GPU on a simulated clock).
    """

    name = "pattern"

    def __init__(self, size: int = 8, cost_s: float = 0.0, clock: Clock | None = None) -> None:
        self.size = size
        self.untrained = False
        self.cost_s = cost_s
        self.clock = clock
        self.calls: list[int] = []  # batch size of every render call

    def prepare(self, avatar: Avatar) -> PreparedAvatar:
        kp = torch.linspace(-0.5, 0.5, NUM_KP * 3).reshape(NUM_KP, 3)
        params = MotionParams(
            torch.ones(1, 1), torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1, 3), torch.zeros(1, 21, 3)
        )
        return PreparedAvatar(avatar, SourceFace(kp, params, kp.clone()), state=None)

    def drive(self, prepared: PreparedAvatar, params: MotionParams) -> torch.Tensor:
        return keypoints_from_params(prepared.source.kp_canonical[None], params)  # [B, 21, 3]

    def render(self, prepared: Sequence[PreparedAvatar], kp_driving: torch.Tensor) -> torch.Tensor:
        b = kp_driving.shape[0]
        assert len(prepared) == b
        self.calls.append(b)
        if self.clock is not None and self.cost_s:
            self.clock.spend(self.cost_s * b)
        s = self.size
        ramp = (torch.arange(s)[:, None] - torch.arange(s)[None, :]).float() / s  # [S, S]
        out = []
        for i in range(b):
            total = kp_driving[i].double().sum().float()
            chans = [torch.sigmoid(total * (c + 1) / 40 + ramp) for c in range(3)]
            out.append(torch.stack(chans))
        return torch.stack(out)  # [B, 3, S, S]


def tiny_avatar(name: str = "test") -> Avatar:
    img = np.full((16, 16, 3), 128, np.uint8)
    return Avatar(name, "0" * 64, img, img.copy(), np.eye(2, 3))
