"""Test utilities shipped with the engine, so transport authors and downstream users test the way we do
(as pipecat ships its test utilities).

* :class:`FakeSession` / :class:`FakeFactory`: deterministic doubles of :class:`streaming.api.LiveSession` and
  :class:`streaming.api.SessionFactory` that speak the engine's real control schema;
* stage doubles simple enough that a test can predict every output: :class:`RmsFeatures` (a ``FeatureStage``),
  :class:`MouthMotion` (a ``MotionStage`` that takes controls), :class:`PatternRenderer` (a ``Renderer`` with a
  configurable cost on a simulated clock) and :func:`tiny_avatar`;
* :func:`eager_renderer`: the neural renderer of some networks as the runtime builds it on a CPU;
* :func:`drain`: a session's whole output; :func:`run_step`: feed frames through one stage step
  (``process(frame, stale, generation)``) without an event loop and collect what it emits;
  :func:`burst_signal`: a test signal whose loud/quiet edges make offsets measurable.

These are real implementations of the protocols, not mocks of the code under test.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np
import torch

from engine.audio.pcm import SAMPLE_RATE, resample
from engine.avatar.record import Avatar
from engine.keypoints import LIP, NUM_KP, MotionParams, SourceFace, keypoints_from_params
from engine.models.liveportrait import LivePortraitNets
from engine.motion.base import MotionFrame
from engine.motion.control_schema import ControlState, ControlValueError, describe_schema, validate_control
from engine.motion.emotion import EMOTIONS
from engine.render.base import PreparedAvatar
from engine.render.neural import NeuralRenderer
from export.backends import BackendConfig, RendererRuntime, get_backend
from streaming.api import ControlError, LiveSession
from streaming.clock import Clock, frame_bound
from streaming.frames import OutputAudio, VideoFrame

Frame = Any


async def drain(session: LiveSession) -> tuple[list[VideoFrame], list[OutputAudio]]:
    """Everything a session puts out until its end (both outputs read together: offline, an unread one holds
    the other back)."""

    async def video() -> list[VideoFrame]:
        return [f async for f in _until_none(session.next_video)]

    async def audio() -> list[OutputAudio]:
        return [a async for a in _until_none(session.next_audio)]

    frames, chunks = await asyncio.gather(video(), audio())
    return frames, chunks


async def _until_none(next_item: Callable[[], Any]) -> Any:
    while (item := await next_item()) is not None:
        yield item


def run_step(
    step: Callable[[Frame, bool, int], list[Frame]], frames: Iterable[Frame], generation: int = 0
) -> list[Frame]:
    """Everything ``step`` emits for ``frames`` (all of the current ``generation``), in order."""
    out: list[Frame] = []
    for frame in frames:
        out.extend(step(frame, False, generation))
    return out


DELAY_S = 0.2
LOUD_RMS = 0.05


class FakeSession:
    """A deterministic :class:`streaming.api.LiveSession` double for transport tests.

    Video frames are solid colours: green encodes ``frame_index % 16`` and red is full when the output audio of
    that frame is loud, so a receiver can count frames and see whether picture and sound line up. Output audio is
    the input echoed on the output clock ``DELAY_S`` later (what the real session does after its pipeline).
    Controls are validated by the engine's real schema; ``honoured`` are the keys it accepts (others are refused
    with the reason, as a real session refuses what its motion generator cannot do).
    """

    def __init__(
        self,
        session_id: str,
        fps: int = 25,
        size: int = 64,
        untrained: bool = False,
        honoured: Iterable[str] = ("emotion", "intensity", "lip_scale", "head_pose"),
    ) -> None:
        self.id = session_id
        self.fps = fps
        self.size = size
        self.untrained = untrained
        self.closed = False
        self.pushed_samples = 0
        self.interrupts = 0
        self.honoured = frozenset(honoured)
        self.control_state = ControlState()
        self._t0 = time.monotonic()
        self._input = np.zeros(0, np.float32)  # input audio on the output clock, before the delay
        self._input_start: int | None = None
        self._frame = 0
        self._audio_pos = 0
        self._ended = False

    # -- input ----------------------------------------------------------------------------------------------
    def push_audio(self, pcm: np.ndarray, sample_rate: int) -> None:
        if pcm.ndim not in (1, 2) or pcm.dtype not in (np.int16, np.float32) or sample_rate <= 0:
            raise ValueError(f"bad audio: shape {pcm.shape}, dtype {pcm.dtype}, rate {sample_rate}")
        x = pcm.astype(np.float32) / (32768.0 if pcm.dtype == np.int16 else 1.0)
        if x.ndim == 2:
            x = x.mean(axis=1)
        if sample_rate != SAMPLE_RATE:
            x = resample(x, sample_rate, SAMPLE_RATE)
        if self._input_start is None:
            self._input_start = int((time.monotonic() - self._t0) * SAMPLE_RATE)
        self._input = np.concatenate([self._input, x])
        self.pushed_samples += x.size

    def control(self, message: Mapping[str, Any]) -> dict[str, Any]:
        try:
            values = validate_control(message)
            refused = sorted(set(values) - self.honoured)
            if refused:
                raise ControlValueError(f"{', '.join(refused)}: not supported by this session")
            self.control_state = self.control_state.apply(values)
        except ControlValueError as exc:
            raise ControlError(str(exc)) from exc
        return self.control_state.as_dict()

    def interrupt(self) -> None:
        self.interrupts += 1
        self._input = np.zeros(0, np.float32)
        self._input_start = None

    def end_of_stream(self) -> None:
        self._ended = True

    # -- output ---------------------------------------------------------------------------------------------
    def _output(self, start: int, n: int) -> np.ndarray:
        out = np.zeros(n, np.float32)
        if self._input_start is None:
            return out
        lo = start - int(DELAY_S * SAMPLE_RATE) - self._input_start
        a, b = max(lo, 0), min(lo + n, self._input.size)
        if b > a:
            out[a - lo : b - lo] = self._input[a:b]
        return out

    async def _wait(self, pts: float) -> None:
        delay = self._t0 + pts - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    async def next_video(self) -> VideoFrame | None:
        if self.closed or self._ended:
            return None
        n = self._frame
        self._frame += 1
        await self._wait(n / self.fps)  # real time, like the real session: it never runs ahead
        per_frame = SAMPLE_RATE // self.fps
        audio = self._output(n * per_frame, per_frame)
        loud = float(np.sqrt(np.mean(audio**2))) > LOUD_RMS
        rgb = np.empty((self.size, self.size, 3), np.uint8)
        rgb[..., 0] = 255 if loud else 0
        rgb[..., 1] = (n % 16) * 16 + 8
        rgb[..., 2] = 128
        return VideoFrame(frame_index=n, fps=self.fps, rgb=rgb, created=time.monotonic())

    async def next_audio(self) -> OutputAudio | None:
        if self.closed or self._ended:
            return None
        block = SAMPLE_RATE // 50
        start = self._audio_pos
        self._audio_pos += block
        await self._wait((start + block) / SAMPLE_RATE - DELAY_S / 2)
        return OutputAudio(samples=self._output(start, block), start=start)

    def metrics(self) -> dict[str, float]:
        return {"latency_ms": DELAY_S * 1000.0, "frames": float(self._frame)}

    async def close(self) -> None:
        self.closed = True


class FakeFactory:
    """:class:`streaming.api.SessionFactory` double: counts sessions, remembers them so tests can see they were
    closed. Its description has the same keys as the real factory's."""

    def __init__(
        self, mode: str = "classic", untrained: bool = False, fps: int = 25, size: int = 64, banner: str | None = None
    ) -> None:
        self.mode = mode
        self.untrained = untrained
        self.fps = fps
        self.size = size
        self.banner = banner
        self.sessions: list[FakeSession] = []
        self.closed = False

    def describe(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "motion": self.mode,
            "controls": sorted(FakeSession("probe").honoured),
            "control_schema": describe_schema({k: "" for k in FakeSession("probe").honoured}),
            "untrained": self.untrained,
            "banner": self.banner,
            "avatar": "test",
            "fps": self.fps,
            "size": self.size,
            "emotions": list(EMOTIONS),
        }

    def preview(self) -> np.ndarray | None:
        return np.full((self.size, self.size, 3), 128, np.uint8)  # the grey the fake sessions start from

    def metrics(self) -> dict[str, float]:
        return {"render_calls": float(sum(s._frame for s in self.sessions))}

    async def open_session(self) -> LiveSession:
        session = FakeSession(f"s{len(self.sessions)}", fps=self.fps, size=self.size, untrained=self.untrained)
        self.sessions.append(session)
        return session

    async def close(self) -> None:
        self.closed = True


def burst_signal(seconds: float, rate: int = 48_000) -> np.ndarray:
    """Irregular bursts of a 220 Hz tone (float32 mono): loud/quiet edges make A/V offsets measurable."""
    t = np.arange(int(seconds * rate)) / rate
    gate = np.zeros_like(t)
    pos, k = 0.3, 0
    while pos < seconds:
        on = 0.25 + 0.1 * (k % 3)
        gate[(t >= pos) & (t < pos + on)] = 1.0
        pos += on + 0.3 + 0.15 * ((k * 7) % 4)
        k += 1
    return (0.5 * gate * np.sin(2 * math.pi * 220 * t)).astype(np.float32)


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

    It honours the schema's ``emotion`` and ``intensity`` (:class:`engine.motion.control_schema.Controllable`):
    ``yaw`` and ``t`` carry the intensity, so a test sees when a control took effect. An interrupt drops the held
    rows (their frames are never emitted, their indices are reused) and the next frames ease back to idle over
    ``ease`` frames.
    """

    CONTROLS: ClassVar[Mapping[str, str]] = MappingProxyType(
        {"emotion": "recorded in applied", "intensity": "turns the head (yaw = 10 x intensity)"}
    )

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
        self.applied: list[ControlState] = []  # every state applied, in order (on the stage's thread)
        self.interrupts = 0

    def check_controls(self, state: ControlState) -> None:
        """Every value the schema allows is honoured."""

    def apply_controls(self, state: ControlState) -> None:
        self.state = {"emotion": state.emotion, "intensity": state.intensity}
        self.applied.append(state)

    def _frame(self, index: int, value: float) -> MotionFrame:
        if self._eased < self.ease:
            self._eased += 1
            w = self._eased / self.ease
            value = (1 - w) * self._from + w * value
        self._last = value
        exp = torch.zeros(1, NUM_KP, 3)
        exp[0, list(LIP), 1] = value  # the mouth: the lip keypoints open by the value
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
        # the next frames start from rest (what engine motion stages do: the session closes the frames in flight)
        self._from = 0.0
        self._eased = 0


class PatternRenderer:
    """Renderer: each frame is a deterministic function of its own keypoints only (so batching cannot change it).

    Pixel ``(i, j)`` of channel ``c`` is ``sigmoid(kp.sum() * (c + 1) / 40 + (i - j) / size)``. With a clock,
    each render call costs ``call_cost_s + cost_s * batch`` on it (``call_cost_s`` > 0: GPU-like, a fixed cost per
    call; ``cost_s`` alone: CPU-like), plus any one-off stall queued with :meth:`stall` (a GC pause, a stopped
    process). Both costs may be changed while sessions run. :meth:`render` spends that time holding the caller
    (a render on the event loop's own thread); :meth:`render_async` lets the loop run meanwhile, as a GPU or a
    render thread does (what the render worker uses when it renders inline).
    """

    name = "pattern"

    def __init__(
        self, size: int = 8, cost_s: float = 0.0, clock: Clock | None = None, call_cost_s: float = 0.0
    ) -> None:
        self.size = size
        self.untrained = False
        self.cost_s = cost_s
        self.call_cost_s = call_cost_s
        self.clock = clock
        self.calls: list[int] = []  # batch size of every render call
        self._stalls: list[float] = []

    def stall(self, seconds: float) -> None:
        """The next render call takes ``seconds`` longer (on the simulated clock)."""
        self._stalls.append(seconds)

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
        cost = self._cost(b)
        if self.clock is not None and cost:
            self.clock.spend(cost)
        return self._image(kp_driving)

    async def render_async(self, prepared: Sequence[PreparedAvatar], kp_driving: torch.Tensor) -> torch.Tensor:
        b = kp_driving.shape[0]
        assert len(prepared) == b
        cost = self._cost(b)
        image = self._image(kp_driving)
        if self.clock is not None and cost:
            await self.clock.sleep_until(self.clock.now() + cost)
        return image

    def _cost(self, b: int) -> float:
        self.calls.append(b)
        return self.call_cost_s + self.cost_s * b + (self._stalls.pop(0) if self._stalls else 0.0)

    def _image(self, kp_driving: torch.Tensor) -> torch.Tensor:
        b = kp_driving.shape[0]
        s = self.size
        ramp = (torch.arange(s)[:, None] - torch.arange(s)[None, :]).float() / s  # [S, S]
        out = []
        for i in range(b):
            total = kp_driving[i].double().sum().float()
            chans = [torch.sigmoid(total * (c + 1) / 40 + ramp) for c in range(3)]
            out.append(torch.stack(chans))
        return torch.stack(out)  # [B, 3, S, S]


def eager_renderer(nets: LivePortraitNets, *, use_stitching: bool = True) -> NeuralRenderer:
    """The neural renderer of ``nets`` on the eager backend, CPU, fp32 (what the runtime builds by default there)."""
    networks = RendererRuntime(nets, get_backend(BackendConfig("eager", "cpu", "fp32")))
    return NeuralRenderer(networks, use_stitching=use_stitching)


def tiny_avatar(name: str = "test") -> Avatar:
    img = np.full((16, 16, 3), 128, np.uint8)
    return Avatar(name, "0" * 64, img, img.copy(), np.eye(2, 3))
