"""The avatar as a pipecat service, inside real pipecat pipelines (``Pipeline`` run by pipecat's own test runner
``pipecat.tests.utils.run_test``, which drives a ``PipelineWorker``, pipecat's successor of ``PipelineTask``),
fed by a fake TTS that emits ``TTSAudioRawFrame`` bursts the way TTS services do."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pipecat")

from pipecat.frames.frames import (
    ErrorFrame,
    Frame,
    InterruptionFrame,
    OutputImageRawFrame,
    TextFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.tests.utils import SleepFrame, run_test

from engine.avatar.default import default_landmarks
from streaming.api import ControlError
from streaming.measure.sync import mouth_box, mouth_opening
from streaming.pipelines import RuntimeConfig
from streaming.transports.pipecat import AvatarControlFrame, AvatarVideoService, avatar_video_params
from tests.streaming.transports.agent_doubles import FPS, avatar, espeak, pattern_runtime, quiet_gc, voice

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _no_gc_pauses() -> Iterator[None]:
    with quiet_gc():
        yield


class FakeTTS(FrameProcessor):
    """A TTS stand-in: a ``TextFrame`` whose text is a key of ``speech`` becomes TTSStarted, the speech as 20 ms
    ``TTSAudioRawFrame`` pushed at once (faster than real time, like a TTS service), TTSStopped."""

    def __init__(self, speech: dict[str, tuple[np.ndarray, int]]) -> None:
        super().__init__()
        self.speech = speech
        self.pushed: list[TTSAudioRawFrame] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, TextFrame) and frame.text in self.speech:
            pcm, rate = self.speech[frame.text]
            await self.push_frame(TTSStartedFrame(context_id=frame.text))
            step = rate // 50
            for i in range(0, pcm.size, step):
                audio = TTSAudioRawFrame(pcm[i : i + step].tobytes(), rate, 1, context_id=frame.text)
                self.pushed.append(audio)
                await self.push_frame(audio)
            await self.push_frame(TTSStoppedFrame(context_id=frame.text))
        else:
            await self.push_frame(frame, direction)


class Recorder(FrameProcessor):
    """Stamps every frame that comes down to it, as it comes (direct mode: no queue in between)."""

    def __init__(self) -> None:
        super().__init__(enable_direct_mode=True)
        self.log: list[tuple[float, Frame]] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM:
            self.log.append((time.monotonic(), frame))
        await self.push_frame(frame, direction)

    def of(self, kind: type) -> list[tuple[float, Any]]:
        return [(t, f) for t, f in self.log if isinstance(f, kind)]


def audio_bytes(frames: list[Any]) -> bytes:
    return b"".join(f.audio for f in frames)


def left_running(shared_runtime: bool = True) -> list[str]:
    """Tasks still running, but for the shared runtime's render worker (the runtime outlives the pipeline)."""
    others = (t.get_name() for t in asyncio.all_tasks() if t is not asyncio.current_task())
    return sorted(n for n in others if not (shared_runtime and n == "render-worker"))


def rgb(frame: OutputImageRawFrame) -> np.ndarray:
    return np.frombuffer(frame.image, np.uint8).reshape(frame.size[1], frame.size[0], 3)


async def test_speaks_in_a_pipecat_pipeline() -> None:
    runtime = pattern_runtime()
    pcm = voice(1.0, 24_000)
    tts = FakeTTS({"hello": (pcm, 24_000)})
    service = AvatarVideoService(runtime=runtime, avatar=avatar())
    rec = Recorder()
    t0 = time.monotonic()
    down, _ = await run_test(
        Pipeline([tts, service, rec]),
        frames_to_send=[SleepFrame(0.5), TextFrame("hello"), SleepFrame(1.5)],
        start_timeout=10.0,
    )
    try:
        assert left_running() == [], "no task of the pipeline or the engine is left running"
        assert service.session is None and runtime.sessions == {}, "the engine session was closed with the pipeline"

        images = rec.of(OutputImageRawFrame)
        assert {(f.size, f.format) for _, f in images} == {((8, 8), "RGB")}
        span = images[-1][0] - images[0][0]
        assert (len(images) - 1) / span == pytest.approx(FPS, rel=0.2), "frames out at the configured fps"
        assert images[0][0] - t0 < 1.0, "frames come while idle, before any speech"

        out = rec.of(TTSAudioRawFrame)
        assert audio_bytes([f for _, f in out]) == pcm.tobytes(), "audio out equals audio in, sample for sample"
        assert {(f.sample_rate, f.num_channels, f.context_id) for _, f in out} == {(24_000, 1, "hello")}
        # delayed to the frames: the speech spreads over its real duration instead of arriving as a burst
        assert out[-1][0] - out[0][0] == pytest.approx(1.0, abs=0.25)
        started = rec.of(TTSStartedFrame)[0][0]
        stopped = rec.of(TTSStoppedFrame)[0][0]
        assert started < out[0][0] and stopped >= out[-1][0], "TTS start/stop keep their place around the audio"
        assert isinstance(down[-1], TTSStoppedFrame) or not any(isinstance(f, TTSAudioRawFrame) for f in down[-1:])
        speaking = [rgb(f) for t, f in images if out[0][0] < t < out[-1][0]]
        idle = [rgb(f) for t, f in images if t < out[0][0] - 0.05]
        change = [
            np.mean([np.abs(a.astype(int) - b).mean() for a, b in itertools.pairwise(x)]) for x in (idle, speaking)
        ]
        assert change[1] > 1.0 > change[0] + 0.5, (
            f"frames move with the speech only: idle {change[0]}, speech {change[1]}"
        )
    finally:
        await runtime.aclose()


async def test_interruption_stops_speech_at_once() -> None:
    runtime = pattern_runtime()
    pcm = voice(3.0, 16_000)
    tts = FakeTTS({"long": (pcm, 16_000)})
    service = AvatarVideoService(runtime=runtime, avatar=avatar())
    rec = Recorder()
    await run_test(
        Pipeline([tts, service, rec]),
        frames_to_send=[SleepFrame(0.6), TextFrame("long"), SleepFrame(1.2), InterruptionFrame(), SleepFrame(1.0)],
        start_timeout=10.0,
    )
    try:
        assert left_running() == []
        t_int = rec.of(InterruptionFrame)[0][0]
        out = [f for t, f in rec.of(TTSAudioRawFrame) if t <= t_int]
        assert not [f for t, f in rec.of(TTSAudioRawFrame) if t > t_int], "no stale audio after the interruption"
        played = audio_bytes(out)
        assert 0 < len(played) < pcm.nbytes and pcm.tobytes().startswith(played), "what played was the start of it"
        assert not rec.of(TTSStoppedFrame), "the interrupted utterance's TTSStoppedFrame is dropped with it"

        images = rec.of(OutputImageRawFrame)
        idle = rgb(images[0][1])
        after = [(t - t_int, rgb(f)) for t, f in images if t > t_int]
        assert after[0][0] < 0.12 and np.array_equal(after[0][1], idle), "the avatar is at rest within 120 ms"
        still = [x for dt, x in after if dt < 0.5]
        assert all(np.abs(x.astype(int) - idle).mean() < 1.0 for x in still), "and stays there"
        times = [t for t, _ in images]
        assert max(b - a for a, b in itertools.pairwise(times)) < 4.5 / FPS, "frames keep coming through it"
    finally:
        await runtime.aclose()


async def test_controls_as_frames_and_refusals_as_errors() -> None:
    runtime = pattern_runtime()
    service = AvatarVideoService(runtime=runtime, avatar=avatar())
    rec = Recorder()
    _, up = await run_test(
        Pipeline([service, rec]),
        frames_to_send=[
            SleepFrame(0.5),
            AvatarControlFrame({"emotion": "happy", "intensity": 1.2}),
            SleepFrame(0.5),
            AvatarControlFrame({"lip_scale": 2.0}),
            SleepFrame(0.2),
        ],
        start_timeout=10.0,
    )
    try:
        errors = [f for f in up if isinstance(f, ErrorFrame)]
        assert len(errors) == 1 and "lip_scale" in errors[0].error and "not supported" in errors[0].error
        images = [rgb(f) for _, f in rec.of(OutputImageRawFrame)]
        # MouthMotion turns the head by 10 degrees per unit of intensity: the whole pattern shifts, once
        change = [float(np.abs(b.astype(int) - a).mean()) for a, b in itertools.pairwise(images)]
        assert np.abs(images[-1].astype(int) - images[0]).mean() > 10.0
        assert sum(c > 1.0 for c in change) == 1, change
        assert not [f for _, f in rec.log if isinstance(f, AvatarControlFrame)], "controls are consumed"
    finally:
        await runtime.aclose()


def test_set_controls_validates_against_the_schema() -> None:
    async def main() -> None:
        runtime = pattern_runtime()
        assert avatar_video_params(runtime) == {
            "video_out_enabled": True,
            "video_out_is_live": True,
            "video_out_width": 8,
            "video_out_height": 8,
            "video_out_framerate": FPS,
        }
        service = AvatarVideoService(runtime=runtime, avatar=avatar())
        assert service.set_controls({"emotion": "sad"}) == {"emotion": "sad"}  # kept for the session
        await run_test(Pipeline([service]), frames_to_send=[SleepFrame(0.2)], start_timeout=10.0)
        await runtime.aclose()

    asyncio.run(main())
    with pytest.raises(ControlError, match="unknown emotion"):
        AvatarVideoService(config=RuntimeConfig()).set_controls({"emotion": "bored"})
    with pytest.raises(ValueError, match="either a runtime or a config"):
        AvatarVideoService(runtime=object(), config=RuntimeConfig())  # type: ignore[arg-type]


async def test_an_avatar_that_cannot_start_is_reported() -> None:
    runtime = pattern_runtime()
    service = AvatarVideoService(runtime=runtime, avatar="no-such-avatar")
    try:
        _, up = await run_test(Pipeline([service]), frames_to_send=[SleepFrame(0.2)], start_timeout=10.0)
        errors = [f.error for f in up if isinstance(f, ErrorFrame)]
        assert len(errors) == 1 and "cannot start" in errors[0] and "no-such-avatar" in errors[0], errors
        assert service.session is None and runtime.sessions == {}
    finally:
        await runtime.aclose()


def save_sheet(images: list[np.ndarray], name: str) -> None:
    """A contact sheet of ``images`` where AGENTS_SHEETS points (to look at what a user sees)."""
    folder = os.environ.get("AGENTS_SHEETS")
    if folder and images:
        Image.fromarray(np.concatenate([x[::2, ::2] for x in images], axis=1)).save(Path(folder) / name)


@pytest.mark.slow
async def test_classic_avatar_in_a_pipecat_pipeline() -> None:
    """The engine as a user builds it (classic mode, default avatar): the mouth moves while the speech plays,
    and is still within 120 ms of the interruption, with no audio after it."""
    pcm, rate = espeak("Hello, I am the open avatar. I speak while my mouth moves, until you interrupt me.")
    tts = FakeTTS({"speak": (pcm, rate)})
    service = AvatarVideoService(config=RuntimeConfig(mode="classic"))
    rec = Recorder()
    await run_test(
        Pipeline([tts, service, rec]),
        frames_to_send=[SleepFrame(1.5), TextFrame("speak"), SleepFrame(2.5), InterruptionFrame(), SleepFrame(1.5)],
        start_timeout=60.0,
    )
    assert left_running(shared_runtime=False) == [], "the service closed the runtime it built"
    assert service.session is None

    images = rec.of(OutputImageRawFrame)
    assert {f.size for _, f in images} == {(512, 512)}
    span = images[-1][0] - images[0][0]
    fps = (len(images) - 1) / span
    t_int = rec.of(InterruptionFrame)[0][0]
    out = rec.of(TTSAudioRawFrame)
    assert out and not [t for t, _ in out if t > t_int], "no audio after the interruption"
    played = audio_bytes([f for _, f in out])
    assert pcm.tobytes().startswith(played) and len(played) < pcm.nbytes

    box = mouth_box(default_landmarks())
    stamps = np.array([t for t, _ in images])
    opening = mouth_opening(np.stack([rgb(f) for _, f in images]), box)
    motion = np.abs(np.diff(opening))  # mouth change between consecutive frames
    speaking = motion[(stamps[1:] > out[0][0] + 0.2) & (stamps[1:] < t_int)]
    pick = [
        int(np.argmin(np.abs(stamps - t))) for t in (out[0][0] - 0.5, out[0][0] + 0.5, out[0][0] + 1.0, t_int + 0.05)
    ]
    pick.append(int(np.argmax(opening[: pick[-1]])))
    save_sheet([rgb(images[i][1]) for i in pick], "pipecat_classic.png")
    stopped = motion[stamps[1:] > t_int + 0.12]
    print(
        f"\nclassic in pipecat: {len(images)} frames at {fps:.1f} fps, speech {len(played) / 2 / rate:.2f} s played, "
        f"mouth change/frame speaking {speaking.mean():.4f} vs after the interruption {stopped.mean():.4f} "
        f"(max {stopped.max():.4f})"
    )
    # the renderer's speed is the benchmarks' business (this machine's load decides it); here: enough frames to judge
    assert len(speaking) >= 10 and len(stopped) >= 10
    assert speaking.mean() > 5 * stopped.mean(), "the mouth moves while speaking and is still after the interrupt"
    assert stopped.max() < 0.25 * speaking.max()
