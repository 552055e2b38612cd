"""The shipped test doubles (:mod:`streaming.testing`) honour the protocols they stand in for, with the engine's
own control schema (so a transport test cannot pass on a vocabulary the real session refuses)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.audio.pcm import SAMPLE_RATE
from engine.motion.control_schema import CONTROL_SPEC
from streaming.api import ControlError
from streaming.frames import AudioChunk, EndOfStream, FeatureRows
from streaming.stages import FeatureStep
from streaming.testing import DELAY_S, FakeFactory, FakeSession, MouthMotion, RmsFeatures, run_step

# --- the double itself ------------------------------------------------------------------------------------


async def test_double_echoes_audio_after_delay() -> None:
    session = FakeSession("x", fps=50)
    session.push_audio(np.full(1600, 0.5, np.float32), SAMPLE_RATE)
    chunks = [await session.next_audio() for _ in range(20)]  # 400 ms
    audio = np.concatenate([c.samples for c in chunks if c is not None])
    nonzero = np.flatnonzero(audio)
    assert nonzero.size == 1600
    assert abs(nonzero[0] - (session._input_start or 0) - DELAY_S * SAMPLE_RATE) <= 1
    await session.close()
    assert await session.next_video() is None


def test_double_rejects_bad_controls() -> None:
    session = FakeSession("x")
    assert session.control({"emotion": "happy"})["emotion"] == "happy"
    for bad in ({"emotion": "bored"}, {"intensity": 2.0}, {"intensity": float("nan")}, {"volume": 1}, {"blink": True}):
        with pytest.raises(ControlError):
            session.control(bad)


def test_fake_factory_describes_like_the_real_one() -> None:
    info = FakeFactory().describe()
    assert {"mode", "motion", "controls", "untrained", "banner", "avatar", "fps", "size"} <= set(info)
    assert set(info["controls"]) <= set(CONTROL_SPEC)


def test_stage_harness_runs_a_step_without_an_event_loop() -> None:

    step = FeatureStep(RmsFeatures(25))
    out = run_step(step.process, [AudioChunk(np.full(640 * 3, 0.5, np.float32), 0), EndOfStream()])
    assert isinstance(out[0], FeatureRows) and out[0].rows.shape == (3, 1) and isinstance(out[-1], EndOfStream)
    np.testing.assert_allclose(out[0].rows[:, 0], 0.5, atol=1e-6)
    assert MouthMotion.CONTROLS.keys() == {"emotion", "intensity"}
