"""SpeechSync against a real live session (pattern stages, real time): the speech comes back whole, with the frames
it belongs to, markers keep their place after it, and an interrupt forgets it and holds a rest frame."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator

import numpy as np
import pytest

from engine.audio.pcm import SAMPLE_RATE
from streaming.clock import frame_bound
from streaming.transports.speech import Marker, Picture, Speech, SpeechSync
from tests.streaming.transports.agent_doubles import FPS, Stamped, pattern_session, quiet_gc, voice

pytestmark = pytest.mark.timeout(60)
RATE = 24_000


@pytest.fixture(autouse=True)
def _no_gc_pauses() -> Iterator[None]:
    with quiet_gc():
        yield


async def collect(sync: SpeechSync, into: list[Stamped]) -> None:
    async for event in sync:
        into.append(Stamped(time.monotonic(), event))


def push_burst(sync: SpeechSync, pcm: np.ndarray, rate: int = RATE, block_s: float = 0.02, meta: object = None) -> None:
    """What a TTS does: the whole utterance at once, in 20 ms frames."""
    step = int(rate * block_s)
    for i in range(0, pcm.size, step):
        sync.push(pcm[i : i + step], rate, meta)


async def test_speech_comes_back_whole_with_its_frames() -> None:
    session = pattern_session()
    sync = SpeechSync(session)
    log: list[Stamped] = []
    reader = asyncio.create_task(collect(sync, log))
    try:
        await asyncio.sleep(0.5)
        committed = int(session.metrics()["frames_committed"])
        pcm = voice(1.2)
        t_push = time.monotonic()
        push_burst(sync, pcm, meta="utterance")
        sync.mark("stopped")
        assert await sync.drain(5.0)
        await asyncio.sleep(0.2)
    finally:
        await sync.aclose()
        await session.close()
        await reader

    speech = [s for s in log if isinstance(s.item, Speech)]
    out = np.concatenate([s.item.pcm[:, 0] for s in speech])
    assert np.array_equal(out, pcm), "the speech comes back sample for sample, nothing added or lost"
    assert {s.item.sample_rate for s in speech} == {RATE} and {s.item.meta for s in speech} == {"utterance"}
    assert sync.pushed_samples == sync.released_samples == pcm.size

    # it starts with the frame it landed on, one session latency after the push, and is spread over its frames
    first = speech[0]
    assert first.t - t_push == pytest.approx(session.latency_s, abs=0.15)
    pictures = [s for s in log if isinstance(s.item, Picture)]
    landed = frame_bound(committed, FPS) // (SAMPLE_RATE // FPS)
    early = [p.item.frame.frame_index for p in pictures if p.t > first.t and p.item.frame.frame_index < landed - 1]
    late = [p.item.frame.frame_index for p in pictures if p.t < first.t and p.item.frame.frame_index > landed + 1]
    assert not early and not late, "the speech comes out with the frame it landed on (drops aside)"
    duration = speech[-1].t - first.t
    assert duration == pytest.approx(1.2, abs=0.25), "released in real time, frame by frame, not in a burst"

    # the marker comes after the last speech, and only then
    marks = [i for i, s in enumerate(log) if isinstance(s.item, Marker)]
    assert [log[i].item.item for i in marks] == ["stopped"]
    assert marks[0] > log.index(speech[-1])

    # the frames move while the speech plays and not before it
    indices = [p.item.frame.frame_index for p in pictures]
    assert indices == sorted(set(indices)), "frames in order, each once"
    speaking = [p.item.frame.rgb for p in pictures if first.t < p.t < speech[-1].t]
    idle = [p.item.frame.rgb for p in pictures if p.t < first.t - 0.01]
    assert len(idle) >= 3 and len(speaking) >= 20
    idle_change = np.mean([np.abs(a.astype(int) - b).mean() for a, b in itertools.pairwise(idle)])
    speaking_change = np.mean([np.abs(a.astype(int) - b).mean() for a, b in itertools.pairwise(speaking)])
    assert speaking_change > 1.0 > idle_change + 0.5, (speaking_change, idle_change)


async def test_marker_without_speech_in_flight_passes_at_once() -> None:
    session = pattern_session()
    sync = SpeechSync(session)
    log: list[Stamped] = []
    reader = asyncio.create_task(collect(sync, log))
    try:
        t0 = time.monotonic()
        sync.mark("now")
        for _ in range(100):
            if any(isinstance(s.item, Marker) for s in log):
                break
            await asyncio.sleep(0.005)
    finally:
        await sync.aclose()
        await session.close()
        await reader
    marker = next(s for s in log if isinstance(s.item, Marker))
    assert marker.t - t0 < 0.05


async def test_interrupt_forgets_the_speech_and_holds_the_rest_frame() -> None:
    session = pattern_session()
    sync = SpeechSync(session)
    log: list[Stamped] = []
    reader = asyncio.create_task(collect(sync, log))
    try:
        await asyncio.sleep(0.6)  # idle: the rest frame is known
        pcm = voice(3.0)
        push_burst(sync, pcm)
        sync.mark("segment end")
        await asyncio.sleep(1.2)
        t_int = time.monotonic()
        held = sync.interrupt()
        await asyncio.sleep(0.8)
        # speaking again after the interrupt works as before
        again = voice(0.4, seed=3)
        push_burst(sync, again)
        assert await sync.drain(3.0)
        await asyncio.sleep(0.1)
    finally:
        await sync.aclose()
        await session.close()
        await reader

    assert held == ["segment end"], "the waiting marker is handed back, not released"
    speech_after = [s for s in log if isinstance(s.item, Speech) and s.t > t_int]
    released_after = np.concatenate([s.item.pcm[:, 0] for s in speech_after])
    assert np.array_equal(released_after, again), "nothing of the interrupted speech comes out after the interrupt"
    assert sync.released_samples + sync.interrupted_samples == pcm.size + again.size
    assert 0.8 * RATE < sync.released_samples - again.size < 1.6 * RATE  # ~1.2 s - latency had played

    pictures = [s for s in log if isinstance(s.item, Picture)]
    after = [p for p in pictures if p.t > t_int]
    assert after[0].item.rest and after[0].t - t_int < 0.01, "the rest frame is shown at once"
    rest = [p for p in after if p.item.rest]
    fresh = next(p for p in after if not p.item.rest)
    assert all(p.t <= fresh.t for p in rest), "rest frames only until the session's own frames come back"
    assert np.array_equal(rest[0].item.frame.rgb, rest[-1].item.frame.rgb)
    idle_before = next(p for p in pictures if p.t < t_int - 1.2 - 0.1)
    assert np.array_equal(rest[0].item.frame.rgb, idle_before.item.frame.rgb), "the rest frame is an idle frame"
    indices = [p.item.frame.frame_index for p in pictures]
    assert indices == sorted(set(indices))
    gap = [
        b.item.frame.frame_index - a.item.frame.frame_index for a, b in itertools.pairwise(after) if b.t < fresh.t + 0.2
    ]
    assert max(gap) <= 2, "frames keep coming at the session's rate through the recovery"


async def test_overflowing_the_session_buffer_keeps_what_it_kept() -> None:
    session = pattern_session(max_buffer_s=0.5)
    sync = SpeechSync(session)
    log: list[Stamped] = []
    reader = asyncio.create_task(collect(sync, log))
    try:
        pcm = voice(1.0)
        sync.push(pcm, RATE)
        assert await sync.drain(4.0)
    finally:
        await sync.aclose()
        await session.close()
        await reader
    out = np.concatenate([s.item.pcm[:, 0] for s in log if isinstance(s.item, Speech)])
    assert out.size == sync.released_samples
    assert 0.4 * RATE <= out.size <= 0.6 * RATE and np.array_equal(out, pcm[: out.size])
    assert sync.interrupted_samples == pcm.size - out.size


async def test_bad_speech_is_refused_with_the_reason() -> None:
    session = pattern_session()
    sync = SpeechSync(session)
    try:
        with pytest.raises(ValueError, match="int16"):
            sync.push(np.zeros(100, np.float32), RATE)
        with pytest.raises(ValueError, match="sample_rate"):
            sync.push(np.zeros(100, np.int16), 3)
        assert sync.pushed_samples == 0
    finally:
        await sync.aclose()
        await session.close()
