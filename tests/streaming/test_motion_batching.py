"""Motion batching across sessions, through the runtime as ``serve``/``render`` build it: two neural sessions with
Ditto motion (tiny, untrained, CPU) share their diffusion steps in one denoiser call when ``motion_batching`` is on,
show the same frames as with it off, and report it in the metrics; auto leaves it off on a CPU."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from engine.config import ConfigError, from_dict
from engine.motion.neural import NeuralMotionStage
from engine.motion.shared_denoiser import SharedDenoiser
from export.backends import BackendConfig, DenoiserRuntime
from streaming.factory import open_engine_factory
from streaming.pipelines import RuntimeConfig
from streaming.runtime import Runtime
from streaming.session import SessionConfig
from streaming.testing import drain

UINT8_TOL = 1  # a batch changes float rounding; one 8-bit step can flip


def _config(batching: str) -> RuntimeConfig:
    return RuntimeConfig(
        mode="neural",
        motion="ditto",
        session=SessionConfig(realtime=False),
        backend=BackendConfig("eager", "cpu", "fp32"),
        motion_batching=batching,
    )


async def _two_sessions(batching: str) -> tuple[list[list[np.ndarray]], dict[str, float], object]:
    factory = await open_engine_factory(_config(batching))  # as engine serve builds it
    try:
        sessions = [await factory.runtime.open_session(None) for _ in range(2)]
        motion = sessions[0].motion
        assert isinstance(motion, NeuralMotionStage)
        denoiser = motion.scheduler.denoiser
        rng = np.random.default_rng(3)
        for session in sessions:
            session.push_audio((0.1 * rng.standard_normal(16_000)).astype(np.float32), 16_000)  # 1 s each
            session.end_of_stream()
        results = await asyncio.gather(*(drain(s) for s in sessions))
        metrics = factory.metrics()  # what /metrics reports
    finally:
        await factory.close()
    return [[f.rgb for f in frames] for frames, *_ in results], metrics, denoiser


async def test_two_sessions_share_denoiser_calls_and_show_the_same_frames() -> None:
    on, on_metrics, shared = await _two_sessions("on")
    off, off_metrics, plain = await _two_sessions("off")
    assert isinstance(shared, SharedDenoiser) and isinstance(plain, DenoiserRuntime)
    for a, b in zip(on, off, strict=True):
        assert len(a) == len(b) == 25
        diff = np.abs(np.stack(a).astype(np.int16) - np.stack(b).astype(np.int16))
        assert int(diff.max()) <= UINT8_TOL
    assert not np.array_equal(on[0][-1], on[1][-1])  # each session moves its own way
    calls, requests = on_metrics["motion_denoiser_calls"], on_metrics["motion_denoiser_requests"]
    print(f"\n2 sessions: {requests:.0f} diffusion steps in {calls:.0f} denoiser calls")
    assert on_metrics["motion_denoiser_max_requests"] == 2 and calls < requests
    assert "motion_denoiser_calls" not in off_metrics


def test_auto_is_off_on_a_cpu_and_bad_values_are_named() -> None:
    runtime = Runtime.create(_config("auto"))
    assert runtime.pipeline.motion_stats is None  # the denoiser is called per session on a CPU
    with pytest.raises(ValueError, match="motion_batching must be one of"):
        _config("always")
    with pytest.raises(ConfigError, match="motion_batching"):
        from_dict(RuntimeConfig, {"motion_batching": "yes"})
