"""Each stage of the session alone: the audio time line, features, motion (re-indexing, catch-up), the clocks,
the worker thread and the render worker's batching decisions."""

from __future__ import annotations

import asyncio
import math
import threading

import numpy as np
import pytest
import torch

from streaming.batching import BatchConfig, BatchRenderer, RenderJob, WorkerThread
from streaming.clock import FrameSchedule, SimClock, frame_bound, frame_count
from streaming.frames import AudioChunk, EndOfStream
from streaming.stages import AudioTimeline, FeatureRows, FeatureStep, MotionStep
from streaming.testing import MouthMotion, PatternRenderer, RmsFeatures, tiny_avatar


def test_frame_grid_tiles_audio_exactly_for_any_fps() -> None:
    for fps in (24, 25, 30, 60):
        sizes = [frame_bound(n + 1, fps) - frame_bound(n, fps) for n in range(fps)]
        assert sum(sizes) == 16_000  # one second is exactly fps frames, whatever 16000 / fps is
        assert max(sizes) - min(sizes) <= 1
    assert frame_count(16_001, 25) == 26 and frame_count(16_000, 25) == 25 and frame_count(1, 25) == 1


def test_schedule_times() -> None:
    s = FrameSchedule(t0=10.0, fps=25, jitter_s=0.04, latency_s=0.2)
    assert s.live_time(0) == pytest.approx(10.04)
    assert s.commit_time(0) == pytest.approx(10.08)
    assert s.due_time(24) == pytest.approx(11.2)


def test_timeline_live_commits_on_time_with_silence_for_missing_audio() -> None:
    tl = AudioTimeline(25, max_pending=None)
    tl.append(np.ones(1000, np.float32), now=1.0)
    a = tl.commit_live()
    b = tl.commit_live()  # only 360 real samples left: the rest is silence
    c = tl.commit_live()  # nothing came: all silence, no arrival time
    assert (a.index, b.index, c.index) == (0, 1, 2)
    assert a.samples.size == b.samples.size == c.samples.size == 640
    assert np.all(b.samples[:360] == 1) and np.all(b.samples[360:] == 0)
    assert a.arrival == 1.0 and c.arrival is None and np.all(c.samples == 0)
    # the delay line releases each committed frame once, in any order the output asks
    assert tl.release(1).index == 1
    with pytest.raises(KeyError):
        tl.release(1)


def test_timeline_offline_commits_only_complete_frames_then_the_tail() -> None:
    tl = AudioTimeline(25, max_pending=None)
    tl.append(np.ones(700, np.float32), now=0.0)
    assert tl.commit_ready() is not None and tl.commit_ready() is None  # 60 samples wait for more
    tl.end()
    tail = tl.commit_ready()
    assert tail is not None and tail.samples.size == 60 and tl.exhausted
    with pytest.raises(ValueError, match="end_of_stream"):
        tl.append(np.ones(5, np.float32), now=0.0)


def test_timeline_interrupt_and_buffer_bound() -> None:
    tl = AudioTimeline(25, max_pending=1000)
    tl.append(np.ones(1500, np.float32), now=0.0)
    assert tl.pending_samples == 1000 and tl.dropped_samples == 500  # a burst beyond the bound is dropped
    tl.commit_live()
    tl.interrupt()
    assert tl.pending_samples == 0
    assert np.all(tl.release(0).samples == 0)  # committed, not yet played: silenced
    tl.append(np.ones(640, np.float32), now=0.0)
    assert np.all(tl.release(tl.commit_live().index).samples == 1)  # new speech plays again


def test_feature_step_silences_interrupted_audio_and_flushes() -> None:
    step = FeatureStep(RmsFeatures(25))
    loud = AudioChunk(np.ones(640, np.float32), 0)
    (rows,) = step.process(loud, False, 0)
    assert isinstance(rows, FeatureRows) and rows.rows[0, 0] == pytest.approx(1.0)
    (rows,) = step.process(loud, True, 1)  # audio of an interrupted generation: still one row, but silent
    assert isinstance(rows, FeatureRows) and rows.rows[0, 0] == 0.0
    assert step.process(AudioChunk(np.ones(100, np.float32), 1280), False, 1) == []
    out = step.process(EndOfStream(), False, 1)
    assert isinstance(out[0], FeatureRows) and isinstance(out[1], EndOfStream)


def rows(n: int, value: float = 0.1) -> FeatureRows:
    return FeatureRows(np.full((n, 1), value, np.float32))


def test_motion_step_maps_the_stage_numbering_back_onto_the_clock() -> None:
    motion = MouthMotion(lookahead_frames=2)
    step = MotionStep(motion)
    out = step.process(rows(5), False, 0)
    assert [f.motion.frame_index for f in out] == [0, 1, 2]  # type: ignore[union-attr]
    # an interrupt (generation 1): the stage drops rows 3, 4 and reuses their indices for the next rows
    assert step.process(rows(1), False, 1) == []
    assert motion.interrupts == 1
    out = step.process(rows(3), False, 1)
    # rows 5..8 were pushed after the interrupt; the stage calls the first one 3, the session knows it is 5
    assert [f.motion.frame_index for f in out] == [5, 6]  # type: ignore[union-attr]
    # stale rows (queued before an interrupt) are pushed and dropped again, keeping the count
    assert step.process(rows(2), True, 1) == [] and step.rows_in == 11


def test_motion_step_catch_up_skips_the_backlog_at_once() -> None:
    motion = MouthMotion(lookahead_frames=2)
    calls: list[int] = []

    def catch_up(index: int) -> int | None:
        calls.append(index)
        return 20 if index == 9 else None  # row 9's frame is too late; rows up to 20 are committed already

    step = MotionStep(motion, catch_up=catch_up)
    assert len(step.process(rows(5), False, 0)) == 3
    assert step.process(rows(5), False, 0) == []  # rows 5..9: late -> skipped with one interrupt
    assert step.process(rows(11), False, 0) == []  # rows 10..20: inside the skipped backlog, no new interrupt
    assert motion.interrupts == 1 and step.skipped == 16
    out = step.process(rows(4), False, 0)  # rows 21..24: fresh, the stage restarts at the live edge
    assert [f.motion.frame_index for f in out] == [21, 22]  # type: ignore[union-attr]


async def test_sim_clock_orders_sleepers_and_spend_wakes_them() -> None:
    clock = SimClock()
    clock.start()
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, t: float) -> None:
        await clock.sleep_until(t)
        woke.append((name, clock.now()))

    tasks = [asyncio.create_task(sleeper(n, t)) for n, t in (("b", 2.0), ("a", 1.0), ("c", 3.0))]
    await clock.sleep_until(1.5)
    assert woke == [("a", 1.0)]
    clock.spend(1.0)  # synchronous work: time moves, the due sleeper wakes at the next scheduling point
    await asyncio.sleep(0)
    assert woke[-1] == ("b", 2.5)
    await asyncio.gather(*tasks)
    assert woke[-1] == ("c", 3.0)
    with pytest.raises(ValueError):
        clock.spend(-1)
    await clock.aclose()


async def test_worker_thread_runs_calls_off_the_loop_and_exits() -> None:
    worker = WorkerThread("test-worker")
    loop_thread = threading.get_ident()
    assert await worker.run(threading.get_ident) != loop_thread
    with pytest.raises(ZeroDivisionError):
        await worker.run(lambda: 1 / 0)
    assert await worker.run(lambda a, b: a + b, 2, 3) == 5
    await worker.aclose()
    assert "test-worker" not in [t.name for t in threading.enumerate()]


async def test_render_worker_drops_jobs_that_cannot_be_on_time_and_batches_the_rest() -> None:
    clock = SimClock()
    clock.start()
    renderer = PatternRenderer(cost_s=0.01, clock=clock)
    worker = BatchRenderer(renderer, clock, BatchConfig(max_batch=4, threaded=False))
    worker.cost.update(1, 0.01)  # as if measured already: 10 ms a frame
    delivered: list[int] = []
    dropped: list[int] = []
    prepared = renderer.prepare(tiny_avatar())
    slot = worker.register(
        prepared,
        capacity=8,
        live=True,
        deliver=lambda job, rgb, now: delivered.append(job.frame_index),
        drop=lambda job: dropped.append(job.frame_index),
        fail=lambda exc: None,
    )
    kp = torch.zeros(1, 21, 3)
    now = clock.now()
    for i, deadline in enumerate([now - 1, now + 0.005, now + 1, now + 1, now + 1]):
        await slot.submit(RenderJob(i, 0, kp, deadline))
    await clock.sleep_until(now + 0.5)
    assert dropped == [0, 1]  # past, and too soon for even one render: skipped for the fresher ones
    assert delivered == [2, 3, 4] and renderer.calls == [3]  # the rest in one batch
    # jobs that all miss their deadline: the newest is still rendered (the estimate never stops a session)
    for i, deadline in enumerate([now + 0.5, now + 0.5, now + 0.5], start=5):
        await slot.submit(RenderJob(i, 0, kp, deadline))
    await clock.sleep_until(now + 1.0)
    assert dropped[2:] == [5, 6] and delivered[-1] == 7 and worker.late == 1
    # a full live queue drops its oldest job instead of blocking the session
    for i in range(10, 20):
        await slot.submit(RenderJob(i, 0, kp, math.inf))
    assert dropped[-2:] == [10, 11]
    await worker.aclose()
    await clock.aclose()
