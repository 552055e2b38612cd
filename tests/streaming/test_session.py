"""The streaming session: one clock, exact frame counts, aligned audio, latency, drops, interrupts, batching."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch

from engine.config import ConfigError, from_dict
from engine.keypoints import LIP, MotionParams
from engine.render.base import PreparedAvatar
from streaming.api import ControlError, LiveSession
from streaming.batching import BatchConfig, BatchRenderer, to_rgb_uint8
from streaming.clock import MonotonicClock, SimClock, frame_bound, frame_count
from streaming.frames import OutputAudio, VideoFrame
from streaming.session import Session, SessionConfig
from streaming.testing import MouthMotion, PatternRenderer, RmsFeatures, tiny_avatar

FPS = 25
SR = 16_000


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    """Deterministic "speech": noise under a syllable-rate envelope, so per-frame levels differ."""
    rng = np.random.default_rng(seed)
    n = round(seconds * SR)
    t = np.arange(n) / SR
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t + seed)
    return (0.4 * env * rng.standard_normal(n)).clip(-1, 1).astype(np.float32)


def open_session(worker: BatchRenderer, renderer: PatternRenderer, clock=None, **cfg) -> Session:
    motion = MouthMotion(lookahead_frames=cfg.pop("motion_lookahead", 2))
    prepared = renderer.prepare(tiny_avatar())
    return Session(
        features=RmsFeatures(cfg.get("fps", FPS)),
        motion=motion,
        renderer=renderer,
        prepared=prepared,
        worker=worker,
        config=SessionConfig(**{"offload": False, **cfg}),
        clock=clock,
    )


async def drain(session: Session) -> tuple[list[VideoFrame], list[OutputAudio]]:
    async def video() -> list[VideoFrame]:
        out = []
        while (f := await session.next_video()) is not None:
            out.append(f)
        return out

    async def audio() -> list[OutputAudio]:
        out = []
        while (a := await session.next_audio()) is not None:
            out.append(a)
        return out

    return await asyncio.gather(video(), audio())


def reference_frames(audio: np.ndarray, renderer: PatternRenderer, lookahead: int = 2) -> list[np.ndarray]:
    """The same stages composed by hand, without the session: what frame n must look like."""
    feats = RmsFeatures(FPS)
    motion = MouthMotion(lookahead_frames=lookahead)
    prepared = renderer.prepare(tiny_avatar())
    rows = np.concatenate([feats.push(audio), feats.flush()])
    frames = motion.push(rows) + motion.flush()
    return [to_rgb_uint8(renderer.render([prepared], renderer.drive(prepared, f.params)))[0] for f in frames]


def reference_rgb(renderer: PatternRenderer, prepared, mouth: float) -> np.ndarray:
    """What :class:`MouthMotion` + :class:`PatternRenderer` show for a mouth value (no controls)."""
    exp = torch.zeros(1, 21, 3)
    exp[0, list(LIP), 1] = float(mouth)
    params = MotionParams(torch.ones(1, 1), torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1, 3), exp)
    return to_rgb_uint8(renderer.render([prepared], renderer.drive(prepared, params)))[0]


async def feed_offline(session: Session, audio: np.ndarray, rng: np.random.Generator) -> None:
    i = 0
    while i < audio.size:
        n = int(rng.integers(1, 3000))
        session.push_audio(audio[i : i + n], SR)
        i += n
        await asyncio.sleep(0)
    session.end_of_stream()


def test_session_implements_live_session_protocol() -> None:
    def accepts(_: LiveSession) -> None:
        return None

    async def main() -> None:
        worker = BatchRenderer(PatternRenderer(), MonotonicClock(), BatchConfig(threaded=False))
        s = open_session(worker, PatternRenderer(), realtime=False)
        accepts(s)  # mypy checks the structural match; at run time the attributes must exist
        assert (s.fps, s.size, s.untrained) == (FPS, 8, False) and s.id
        await s.close()
        await worker.aclose()

    asyncio.run(main())


async def test_offline_exact_frames_and_aligned_audio() -> None:
    rng = np.random.default_rng(1)
    audio = speech(2.37, seed=1)
    renderer = PatternRenderer()
    worker = BatchRenderer(renderer, MonotonicClock(), BatchConfig(threaded=False))
    session = open_session(worker, renderer, realtime=False)
    feeder = asyncio.create_task(feed_offline(session, audio, rng))
    video, out_audio = await drain(session)
    await feeder
    expected_n = math.ceil(2.37 * FPS)
    assert expected_n == frame_count(audio.size, FPS)
    assert [f.frame_index for f in video] == list(range(expected_n))
    pts = [f.pts for f in video]
    assert all(b > a for a, b in itertools.pairwise(pts))
    # output audio is the input, frame by frame, starting where each frame starts
    assert [a.start for a in out_audio] == [frame_bound(n, FPS) for n in range(expected_n)]
    np.testing.assert_array_equal(np.concatenate([a.samples for a in out_audio]), audio)
    # frame n shows the motion of audio frame n: identical to the stages composed by hand
    ref = reference_frames(audio, renderer)
    assert len(ref) == expected_n
    for f, r in zip(video, ref, strict=True):
        np.testing.assert_array_equal(f.rgb, r)
    assert len({f.rgb[0, 0, 0] for f in video}) > 10  # the content actually varies with the audio
    await session.close()
    await worker.aclose()


async def test_offline_resampled_stereo_input() -> None:
    renderer = PatternRenderer()
    worker = BatchRenderer(renderer, MonotonicClock(), BatchConfig(threaded=False))
    session = open_session(worker, renderer, realtime=False)
    stereo = (np.tile(speech(1.0, seed=3)[:, None], (1, 2)) * 32767).astype(np.int16)  # 1 s at 16 kHz
    stereo48 = np.repeat(stereo, 3, axis=0)  # 1 s at 48 kHz
    session.push_audio(stereo48[:20000], 48_000)
    session.push_audio(stereo48[20000:], 48_000)
    session.end_of_stream()
    video, audio = await drain(session)
    total = sum(a.samples.size for a in audio)
    assert abs(total - SR) <= 2  # resampled to 16 kHz, nothing lost
    assert len(video) == frame_count(total, FPS)
    with pytest.raises(ValueError, match="after end_of_stream"):
        session.push_audio(np.zeros(10, np.float32), SR)
    await session.close()
    await worker.aclose()


async def test_bad_audio_is_rejected() -> None:
    renderer = PatternRenderer()
    worker = BatchRenderer(renderer, MonotonicClock(), BatchConfig(threaded=False))
    session = open_session(worker, renderer, realtime=False)
    with pytest.raises(ValueError, match="sample_rate"):
        session.push_audio(np.zeros(10, np.float32), 0)
    with pytest.raises(ValueError, match="NaN"):
        session.push_audio(np.full(10, np.nan, np.float32), SR)
    with pytest.raises(ValueError, match="dtype"):
        session.push_audio(np.zeros(10, np.uint8), SR)
    await session.close()
    await worker.aclose()


async def live_run(
    *,
    seconds: float,
    cost_s: float = 0.0,
    chunk_ms: tuple[int, int] = (10, 30),
    jitter_ms: float = 0.0,
    seed: int = 0,
    silence_before_s: float = 0.0,
    **cfg,
):
    """Push ``seconds`` of audio in real time on a simulated clock, collect what leaves and when."""
    clock = SimClock()
    clock.start()
    renderer = PatternRenderer(cost_s=cost_s, clock=clock)
    worker = BatchRenderer(renderer, clock, BatchConfig(threaded=False))
    session = open_session(worker, renderer, clock=clock, **cfg)
    audio = speech(seconds, seed=seed)
    rng = np.random.default_rng(seed)
    released: list[tuple[float, VideoFrame]] = []
    audio_out: list[tuple[float, OutputAudio]] = []

    async def push() -> None:
        t = clock.now() + silence_before_s
        i = 0
        while i < audio.size:
            n = min(int(rng.integers(chunk_ms[0], chunk_ms[1] + 1)) * SR // 1000, audio.size - i)
            t += n / SR  # the chunk's last sample exists at t ...
            late = float(rng.uniform(0, jitter_ms)) / 1000.0
            await clock.sleep_until(t + late)  # ... and reaches the session a little later
            session.push_audio(audio[i : i + n], SR)
            i += n
        session.end_of_stream()

    async def video() -> None:
        while (f := await session.next_video()) is not None:
            released.append((clock.now(), f))

    async def aud() -> None:
        while (a := await session.next_audio()) is not None:
            audio_out.append((clock.now(), a))

    await asyncio.gather(push(), video(), aud())
    metrics = session.metrics()
    await session.close()
    await worker.aclose()
    await clock.aclose()
    return session, audio, released, audio_out, metrics


async def test_live_latency_on_simulated_clock() -> None:
    # chunks of 10-25 ms arriving up to 10 ms late: every sample is in before its frame commits (40 ms jitter)
    session, audio, released, audio_out, m = await live_run(
        seconds=3.0, chunk_ms=(10, 25), jitter_ms=10, compute_frames=1, jitter_s=0.04
    )
    budget = session.latency_s
    assert budget == pytest.approx(session.config.jitter_s + (2 + 1) / FPS)
    t0 = session._schedule.t0
    # the first frame leaves exactly one budget after its audio was live; every frame does in steady state
    first_t, first = released[0]
    assert first.frame_index == 0
    assert first_t - t0 == pytest.approx(1 / FPS + budget)
    for t, f in released:
        assert t - (t0 + (f.frame_index + 1) / FPS) == pytest.approx(budget, abs=1e-9)
    assert m["frames_dropped"] == 0
    assert m["latency_p95_ms"] <= budget * 1000 + 1e-6
    assert m["latency_p50_ms"] > 0
    # each frame's audio leaves with it
    times = {a.start: t for t, a in audio_out}
    for t, f in released:
        assert times[frame_bound(f.frame_index, FPS)] == t
    # the input arrived within the jitter budget, so it plays back without a gap, frame-aligned
    out = np.concatenate([a.samples for _, a in audio_out])
    assert out.size == frame_count(audio.size, FPS) * (SR // FPS)
    np.testing.assert_array_equal(out[: audio.size], audio)
    assert len(released) == frame_count(audio.size, FPS)


async def test_live_late_audio_becomes_silence_not_latency() -> None:
    # audio 120 ms late against a 40 ms jitter buffer: the clock does not wait, latency stays at the budget
    session, _audio, released, audio_out, _m = await live_run(seconds=1.0, jitter_ms=0, silence_before_s=0.12)
    t0 = session._schedule.t0
    for t, f in released:
        assert t - (t0 + (f.frame_index + 1) / FPS) == pytest.approx(session.latency_s, abs=1e-9)
    out = np.concatenate([a.samples for _, a in audio_out])
    assert np.all(out[: 2 * SR // FPS] == 0)  # the frames before the audio came are silence (idle)
    assert np.abs(out).max() > 0.1


async def test_slow_renderer_degrades_the_picture_not_the_audio() -> None:
    # rendering costs 1.5 frame periods per frame: the worker cannot keep up; the session shows fresh pictures as
    # often as they come and repeats the last one in between, the audio never skips, latency does not grow
    cost = 1.5 / FPS
    session, audio, released, audio_out, m = await live_run(seconds=4.0, cost_s=cost, compute_frames=2)
    n_frames = int(m["frames_committed"])
    assert n_frames >= frame_count(audio.size, FPS)
    fresh = [f for _, f in released if not f.repeated and f.lag == 0]
    # the renderer makes 2 pictures in 3 slots; stale jobs are skipped for fresher ones, so each picture is at
    # most one slot late: on time for about a third of the slots, one slot late for another third
    assert m["frames_rendered"] >= 0.6 * n_frames and m["frames_skipped"] > 0.2 * n_frames
    assert 0.25 * n_frames < len(fresh) < 0.8 * n_frames
    assert m["frames_repeated"] > 0.2 * n_frames
    # every slot after the first picture has video: the track never waits for a frame
    idx = [f.frame_index for _, f in released]
    assert idx == list(range(idx[0], n_frames)) and idx[0] <= 3
    # latency (measured on fresh frames where they leave the session) does not grow
    lat = session.metrics_.all_latencies()
    assert len(lat) == len(fresh)
    assert max(lat) <= session.latency_s + cost + 1e-9
    assert np.mean(lat[-10:]) <= np.mean(lat[:10]) + cost
    # the audio never skips: every frame's audio leaves, in order
    assert [a.start for _, a in audio_out] == [frame_bound(n, FPS) for n in range(n_frames)]


async def _live_sessions(
    renderer: PatternRenderer, clock: SimClock, worker: BatchRenderer, n: int, **cfg: Any
) -> tuple[list[Session], dict[str, list[tuple[float, VideoFrame]]], list[asyncio.Task[None]]]:
    """``n`` live sessions fed with continuous speech pushed in real time; what each shows, with the time."""
    sessions = [open_session(worker, renderer, clock=clock, **cfg) for _ in range(n)]
    shown: dict[str, list[tuple[float, VideoFrame]]] = {s.id: [] for s in sessions}

    async def show(session: Session) -> None:
        while (f := await session.next_video()) is not None:
            shown[session.id].append((clock.now(), f))

    async def drain_audio(session: Session) -> None:
        while await session.next_audio() is not None:
            pass

    async def speak(session: Session, seed: int) -> None:
        audio = speech(30.0, seed=seed)
        step = SR // 50
        t = clock.now()
        for i in range(0, audio.size, step):
            t += step / SR
            await clock.sleep_until(t)
            session.push_audio(audio[i : i + step], SR)

    tasks = []
    for k, s in enumerate(sessions):
        tasks += [asyncio.create_task(show(s)), asyncio.create_task(drain_audio(s)), asyncio.create_task(speak(s, k))]
    return sessions, shown, tasks


def _fresh_times(
    shown: list[tuple[float, VideoFrame]], start: float, stop: float, on_time: bool = False
) -> list[float]:
    """When a new picture was shown (``on_time``: only those shown in their own slot)."""
    return [t for t, f in shown if not f.repeated and (f.lag == 0 or not on_time) and start <= t < stop]


async def _stop(sessions: list[Session], tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for s in sessions:
        await s.close()


async def test_renderer_slower_than_real_time_for_two_seconds_then_recovers(caplog: pytest.LogCaptureFixture) -> None:
    clock = SimClock()
    clock.start()
    renderer = PatternRenderer(cost_s=0.004, clock=clock)  # 10 % of a frame period: easily real time
    worker = BatchRenderer(renderer, clock, BatchConfig(threaded=False))
    (session,), shown, tasks = await _live_sessions(renderer, clock, worker, 1)
    t0 = clock.now()
    with caplog.at_level(logging.WARNING, logger="streaming.metrics"):
        await clock.sleep_until(t0 + 2.0)
        renderer.cost_s = 2.5 / FPS  # 2.5 frame periods per frame: far slower than real time
        await clock.sleep_until(t0 + 4.0)
        renderer.cost_s = 0.004
        await clock.sleep_until(t0 + 6.0)
    frames = shown[session.id]
    fresh = _fresh_times(frames, t0 + 0.5, t0 + 6.0)
    # the picture kept updating through the slow stretch: no gap over 0.5 s between fresh pictures
    assert max(b - a for a, b in itertools.pairwise(fresh)) <= 0.5
    # and every slot had a picture: the track itself never stalled
    idx = [f.frame_index for _, f in frames]
    assert idx == list(range(idx[0], idx[-1] + 1))
    # full rate, on time, again within 1 s of the load ending
    assert len(_fresh_times(frames, t0 + 5.0, t0 + 6.0, on_time=True)) >= FPS - 1
    # one warning when it degraded, one when it recovered
    lines = [r.getMessage() for r in caplog.records if session.id in r.getMessage()]
    assert any("video degraded" in line or "video stalled" in line for line in lines), lines
    assert any("video recovered" in line for line in lines) and len(lines) <= 3, lines
    assert session.health.state == "ok"
    # a session's end never harms the next one: the next session on the same worker streams at full rate
    await _stop([session], tasks)
    (second,), shown2, tasks2 = await _live_sessions(renderer, clock, worker, 1)
    t1 = clock.now()
    await clock.sleep_until(t1 + 2.0)
    assert len(_fresh_times(shown2[second.id], t1 + 1.0, t1 + 2.0, on_time=True)) >= FPS - 1
    await _stop([second], tasks2)
    await worker.aclose()
    await clock.aclose()


async def test_worker_stalls_of_1_2_s_resume_within_1_s() -> None:
    # a GC pause, swap or a stopped process (kill -STOP) while rendering: 1.2 s lost, three times
    clock = SimClock()
    clock.start()
    renderer = PatternRenderer(cost_s=0.004, clock=clock)
    worker = BatchRenderer(renderer, clock, BatchConfig(threaded=False))
    (session,), shown, tasks = await _live_sessions(renderer, clock, worker, 1)
    t0 = clock.now()
    stalls = []
    for k in range(3):
        await clock.sleep_until(t0 + 1.5 + 3.0 * k)
        renderer.stall(1.2)
        stalls.append(clock.now())
    await clock.sleep_until(t0 + 11.0)
    frames = shown[session.id]
    for at in stalls:
        after = _fresh_times(frames, at + 1.2, at + 3.0)
        assert after and after[0] - (at + 1.2) <= 1.0, (at, after[:3])
        assert len(_fresh_times(frames, at + 2.2, at + 3.0)) >= 0.8 * FPS * 0.8  # full rate again
    # a new session afterwards streams at full rate
    await _stop([session], tasks)
    (second,), shown2, tasks2 = await _live_sessions(renderer, clock, worker, 1)
    t1 = clock.now()
    await clock.sleep_until(t1 + 2.0)
    assert len(_fresh_times(shown2[second.id], t1 + 1.0, t1 + 2.0)) >= FPS - 1
    await _stop([second], tasks2)
    await worker.aclose()
    await clock.aclose()


async def test_gpu_like_cost_batches_eight_sessions_and_keeps_their_frames() -> None:
    # 30 ms per call + 2 ms per frame: one frame per call could never serve 8 x 25 fps; batches must form
    clock = SimClock()
    clock.start()
    renderer = PatternRenderer(cost_s=0.002, call_cost_s=0.030, clock=clock)
    worker = BatchRenderer(renderer, clock, BatchConfig(max_batch=16, threaded=False))
    sessions, shown, tasks = await _live_sessions(renderer, clock, worker, 8, compute_frames=3)
    t0 = clock.now()
    await clock.sleep_until(t0 + 5.0)
    for s in sessions:
        slots = [f for t, f in shown[s.id] if t >= t0 + 1.0]
        kept = sum(not f.repeated for f in slots) / len(slots)
        assert kept >= 0.95, (s.id, kept)
    steady = renderer.calls[len(renderer.calls) // 4 :]
    assert min(steady) > 1 and np.mean(steady) >= 4, steady[:20]
    assert worker.cost.overhead == pytest.approx(0.030, abs=0.005)
    assert worker.cost.per_frame == pytest.approx(0.002, abs=0.001)
    await _stop(sessions, tasks)
    await worker.aclose()
    await clock.aclose()


async def test_cpu_like_cost_shares_the_worker_fairly_and_never_locks() -> None:
    # 40 ms per frame, two sessions: together twice what the renderer can do; both keep about half their frames
    clock = SimClock()
    clock.start()
    renderer = PatternRenderer(cost_s=0.040, clock=clock)
    worker = BatchRenderer(renderer, clock, BatchConfig(threaded=False))
    sessions, shown, tasks = await _live_sessions(renderer, clock, worker, 2)
    t0 = clock.now()
    await clock.sleep_until(t0 + 5.0)
    counts = [len(_fresh_times(shown[s.id], t0 + 1.0, t0 + 5.0)) for s in sessions]
    assert min(counts) >= 0.3 * 4 * FPS and abs(counts[0] - counts[1]) <= 0.25 * max(counts), counts
    for s in sessions:
        assert max(b - a for a, b in itertools.pairwise(_fresh_times(shown[s.id], t0 + 1.0, t0 + 5.0))) <= 0.5
    await _stop(sessions, tasks)
    await worker.aclose()
    await clock.aclose()


async def test_idle_interrupt_and_resume() -> None:
    clock = SimClock()
    clock.start()
    renderer = PatternRenderer()
    worker = BatchRenderer(renderer, clock, BatchConfig(threaded=False))
    session = open_session(worker, renderer, clock=clock)
    motion = session.motion
    assert isinstance(motion, MouthMotion)
    t0 = session._schedule.t0
    frames: list[VideoFrame] = []
    shown_at: list[float] = []
    audio_out: list[OutputAudio] = []

    async def collect() -> None:
        while (f := await session.next_video()) is not None:
            frames.append(f)
            shown_at.append(clock.now())

    async def collect_audio() -> None:
        while (a := await session.next_audio()) is not None:
            audio_out.append(a)

    tasks = [asyncio.create_task(collect()), asyncio.create_task(collect_audio())]
    # 1 s without any audio: the avatar idles, frames keep coming on the clock
    await clock.sleep_until(t0 + 1.0)
    n_idle = len(frames)
    assert n_idle >= int((1.0 - session.latency_s) * FPS) - 1
    idle_rgb = frames[-1].rgb.copy()
    assert all(np.array_equal(f.rgb, idle_rgb) for f in frames)  # silence -> the idle pose, steady
    # speech for 1 s pushed as a burst (TTS): it plays out in real time
    loud = speech(1.0, seed=5) * 2
    session.push_audio(np.clip(loud, -1, 1), SR)
    await clock.sleep_until(t0 + 1.6)
    talking = [f for f in frames[n_idle:] if not np.array_equal(f.rgb, idle_rgb)]
    assert len(talking) > 5
    # barge-in: buffered speech is dropped at once and the face goes back to idle
    interrupted_at = clock.now()
    session.interrupt()
    assert session.metrics()["buffered_s"] == 0
    await clock.sleep_until(t0 + 2.6)
    # speech stops on screen at once: the frames in flight were rendered again with the mouth closing, so within
    # 250 ms the mouth is under 20 % of its speaking level, and no slot is left without a picture (no freeze)
    amplitude = [float(np.abs(f.rgb.astype(np.int16) - idle_rgb).mean()) for f in frames]
    speaking = float(np.median([a for a in amplitude[n_idle:] if a > 0][:20]))
    window = [i for i, t in enumerate(shown_at) if interrupted_at <= t <= interrupted_at + 0.4]
    closed = [i for i in window if shown_at[i] >= interrupted_at + 0.25]
    assert closed and all(amplitude[i] < 0.2 * speaking for i in closed), [amplitude[i] for i in window]
    assert [frames[i].frame_index for i in window] == list(
        range(frames[window[0]].frame_index, frames[window[-1]].frame_index + 1)
    )
    assert len({frames[i].rgb.tobytes() for i in window}) > 1  # the mouth moves while it closes
    after = [f for f in frames if f.frame_index / FPS + 1 / FPS > interrupted_at + session.latency_s + 0.2]
    assert after and all(np.array_equal(f.rgb, idle_rgb) for f in after)
    assert motion.interrupts >= 1
    # the audio after the interrupt is silence, although 0.4 s of speech had been pushed
    late_audio = [a for a in audio_out if a.start / SR > interrupted_at - t0]
    assert late_audio and all(np.all(a.samples == 0) for a in late_audio)
    # resume: speech again moves the mouth, smoothly from idle (first frames ease in)
    session.push_audio(np.clip(loud, -1, 1), SR)
    n_before = len(frames)
    await clock.sleep_until(t0 + 3.4)
    resumed = frames[n_before:]
    assert sum(not np.array_equal(f.rgb, idle_rgb) for f in resumed) > 5
    idx = [f.frame_index for f in frames]
    assert idx == sorted(set(idx))  # strictly increasing pts through idle, interrupt and resume
    # after the interrupt the video is still in sync with the audio: frame n shows the level of audio frame n
    # (the stage reused the dropped indices; the session mapped them back onto its clock)
    by_start = {a.start: a.samples for a in audio_out}
    prepared = renderer.prepare(tiny_avatar())
    checked = 0
    for f in resumed[motion.ease + 1 :]:
        rms = float(np.sqrt(np.mean(by_start[frame_bound(f.frame_index, FPS)].astype(np.float64) ** 2)))
        expected = reference_rgb(renderer, prepared, float(np.float32(rms) * motion.gain))
        np.testing.assert_array_equal(f.rgb, expected)
        checked += 1
    assert checked > 5
    session.end_of_stream()
    await asyncio.gather(*tasks)
    await session.close()
    await worker.aclose()
    await clock.aclose()


async def test_controls_mid_stream() -> None:
    renderer = PatternRenderer()
    worker = BatchRenderer(renderer, MonotonicClock(), BatchConfig(threaded=False))
    session = open_session(worker, renderer, realtime=False)
    audio = speech(2.0, seed=2)
    session.push_audio(audio[: SR // 2], SR)
    first = [await session.next_video() for _ in range(5)]
    state = session.control({"emotion": "happy", "intensity": 0.8})
    assert (state["emotion"], state["intensity"]) == ("happy", 0.8)  # the whole schema's state
    with pytest.raises(ControlError, match=r"lip_scale: not supported by the MouthMotion motion generator"):
        session.control({"lip_scale": 1.5})  # valid in the schema, but this generator cannot do it
    with pytest.raises(ControlError, match="emotion"):
        session.control({"emotion": "furious"})
    with pytest.raises(ControlError, match="intensity"):
        session.control({"intensity": float("nan")})
    with pytest.raises(ControlError, match="unknown"):
        session.control({"volume": 3})
    with pytest.raises(ControlError, match="JSON object"):
        session.control([1, 2])  # type: ignore[arg-type]
    session.push_audio(audio[SR // 2 :], SR)
    session.end_of_stream()
    video, _ = await drain(session)
    frames = [f for f in first if f is not None] + video
    assert [f.frame_index for f in frames] == list(range(50))
    # frames made after the control differ from the no-control reference; earlier ones match it
    ref = reference_frames(audio, renderer)
    changed = [not np.array_equal(f.rgb, r) for f, r in zip(frames, ref, strict=True)]
    assert not any(changed[:5]) and all(changed[-20:])
    # applied once, by the motion stage, as a Control frame (the refused messages never reached it)
    assert [(c.emotion, c.intensity) for c in session.motion.applied] == [("happy", 0.8)]  # type: ignore[attr-defined]
    await session.close()
    await worker.aclose()


async def test_four_sessions_batched_equal_alone() -> None:
    audios = [speech(1.0 + 0.2 * i, seed=10 + i) for i in range(4)]

    async def run(n_sessions: list[int], max_batch: int) -> tuple[dict[int, list[np.ndarray]], list[int]]:
        renderer = PatternRenderer()
        worker = BatchRenderer(renderer, MonotonicClock(), BatchConfig(max_batch=max_batch, threaded=False))
        sessions = {i: open_session(worker, renderer, realtime=False) for i in n_sessions}
        for i, s in sessions.items():
            s.push_audio(audios[i], SR)
            s.end_of_stream()
        results = await asyncio.gather(*(drain(s) for s in sessions.values()))
        for s in sessions.values():
            await s.close()
        await worker.aclose()
        return {i: [f.rgb for f in r[0]] for i, r in zip(sessions, results, strict=True)}, renderer.calls

    alone: dict[int, list[np.ndarray]] = {}
    for i in range(4):
        frames, calls = await run([i], max_batch=4)
        alone.update(frames)
    together, calls = await run([0, 1, 2, 3], max_batch=4)
    assert max(calls) == 4  # frames of several sessions really shared render calls
    for i in range(4):
        assert len(together[i]) == frame_count(audios[i].size, FPS)
        for a, b in zip(alone[i], together[i], strict=True):
            np.testing.assert_array_equal(a, b)


async def test_round_robin_is_fair() -> None:
    # two live sessions on a renderer that can only afford one frame per tick: both get about half
    clock = SimClock()
    clock.start()
    renderer = PatternRenderer(cost_s=1.0 / FPS, clock=clock)
    worker = BatchRenderer(renderer, clock, BatchConfig(max_batch=1, threaded=False))
    sessions = [open_session(worker, renderer, clock=clock) for _ in range(2)]
    await clock.sleep_until(clock.now() + 4.0)
    rendered = [s.metrics()["frames_rendered"] for s in sessions]
    assert min(rendered) > 0 and abs(rendered[0] - rendered[1]) <= 2
    for s in sessions:
        await s.close()
    await worker.aclose()
    await clock.aclose()


async def test_close_leaves_no_task_or_thread() -> None:
    before_threads = set(threading.enumerate())
    renderer = PatternRenderer()
    worker = BatchRenderer(renderer, MonotonicClock(), BatchConfig())
    session = open_session(worker, renderer, offload=True)
    session.push_audio(speech(0.3), SR)
    frame = await asyncio.wait_for(session.next_video(), timeout=10)
    assert frame is not None and frame.rgb.shape == (8, 8, 3)
    names = [t.name for t in threading.enumerate()]
    assert "render-worker" in names and f"{session.id}-stages" in names
    await session.close()
    await session.close()  # idempotent
    assert await session.next_video() is None
    await worker.aclose()
    current = asyncio.current_task()
    assert [t for t in asyncio.all_tasks() if t is not current] == []
    assert set(threading.enumerate()) <= before_threads


def test_config_is_strict() -> None:
    cfg = from_dict(SessionConfig, {"fps": 30, "lookahead_frames": 4})
    assert (cfg.fps, cfg.lookahead_frames) == (30, 4)
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(SessionConfig, {"fsp": 30})
    with pytest.raises(ConfigError, match="fps"):
        from_dict(SessionConfig, {"fps": 0})
    with pytest.raises(ConfigError, match="jitter_s"):
        from_dict(SessionConfig, {"jitter_s": float("nan")})
    with pytest.raises(ConfigError, match="max_batch"):
        from_dict(BatchConfig, {"max_batch": 0})


async def test_lookahead_below_motion_need_is_an_error_and_fps_must_match() -> None:
    renderer = PatternRenderer()
    worker = BatchRenderer(renderer, MonotonicClock(), BatchConfig(threaded=False))
    with pytest.raises(ConfigError, match="lookahead"):
        open_session(worker, renderer, lookahead_frames=1, motion_lookahead=3)
    with pytest.raises(ConfigError, match="fps"):
        Session(
            features=RmsFeatures(30),
            motion=MouthMotion(),
            renderer=renderer,
            prepared=renderer.prepare(tiny_avatar()),
            worker=worker,
            config=SessionConfig(fps=25),
        )
    await worker.aclose()


async def test_configurable_fps_and_lookahead() -> None:
    session, audio, released, _, _m = await live_run(seconds=1.0, fps=30, lookahead_frames=5, compute_frames=1)
    assert session.latency_s == pytest.approx(session.config.jitter_s + 6 / 30)
    # every frame of the audio (and at most the silent one the clock committed before the end came)
    assert 0 <= len([f for _, f in released if not f.repeated]) - frame_count(audio.size, 30) <= 1
    assert released[0][1].fps == 30
    t0 = session._schedule.t0
    assert released[0][0] - t0 == pytest.approx(1 / 30 + session.latency_s)


def test_to_rgb_uint8() -> None:
    x = torch.zeros(2, 3, 4, 4)
    x[1] = 1.0
    out = to_rgb_uint8(x)
    assert out.shape == (2, 4, 4, 3) and out.dtype == np.uint8
    assert out[0].max() == 0 and out[1].min() == 255


class SlowMotion(MouthMotion):
    """Every ``hop`` rows the stage computes a window that takes ``cost_s`` of wall time (a diffusion model on a
    slow CPU, in the session's stage thread): slower than real time on average."""

    def __init__(self, cost_s: float, hop: int = 5) -> None:
        super().__init__(lookahead_frames=hop)
        self.cost_s, self.hop = cost_s, hop

    def push(self, features: np.ndarray) -> list:
        before = self._pushed // self.hop
        out = super().push(features)
        for _ in range(self._pushed // self.hop - before):
            time.sleep(self.cost_s)
        return out


async def test_slow_motion_skips_rows_and_keeps_latency_bounded() -> None:
    # real clock and the real stage thread: a motion stage slower than real time must not block the loop nor let
    # a backlog (latency) build up; it skips to the live edge instead
    clock = MonotonicClock()
    renderer = PatternRenderer()
    worker = BatchRenderer(renderer, clock, BatchConfig())
    motion = SlowMotion(cost_s=0.25)  # 0.25 s per 5 frames (0.2 s of audio)
    session = Session(
        features=RmsFeatures(FPS),
        motion=motion,
        renderer=renderer,
        prepared=renderer.prepare(tiny_avatar()),
        worker=worker,
        # the render budget covers one window's compute, so frames can be on time while the stage keeps up
        config=SessionConfig(offload=True, compute_frames=10),
        clock=clock,
    )
    session.push_audio(speech(4.0), SR)
    frames: list[VideoFrame] = []

    async def collect() -> None:
        while (f := await session.next_video()) is not None:
            frames.append(f)

    task = asyncio.create_task(collect())
    await asyncio.sleep(4.0)
    m = session.metrics()
    assert m["motion_rows_skipped"] > 0  # the stage was behind: rows skipped instead of queued
    assert m["q_features"] + m["q_audio"] < 20  # no backlog builds up in front of it (4 s = 100 frames)
    # fresh frames keep coming after a skip (motion restarts at the live edge; the slots between show the last
    # picture again), and latency does not grow
    idx = [f.frame_index for f in frames if not f.repeated]
    gaps = [b for a, b in itertools.pairwise(idx) if b - a > 2]
    assert gaps and idx[-1] > gaps[0]
    assert sum(f.repeated for f in frames) > 0
    lat = session.metrics_.all_latencies()
    assert max(lat) <= session.latency_s + 0.3  # scheduling noise of a loaded machine, not growth
    session.end_of_stream()
    await task
    await session.close()
    await worker.aclose()


class BrokenRenderer(PatternRenderer):
    def render(self, prepared: Sequence[PreparedAvatar], kp_driving: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("GPU fell off the bus")

    async def render_async(self, prepared: Sequence[PreparedAvatar], kp_driving: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("GPU fell off the bus")


async def test_failures_end_the_session_instead_of_stalling_it() -> None:
    # a renderer that raises ends the sessions of its batch (outputs end, .error says why); the worker lives on
    renderer = BrokenRenderer()
    worker = BatchRenderer(renderer, MonotonicClock(), BatchConfig(threaded=False))
    session = open_session(worker, renderer, realtime=False)
    session.push_audio(speech(0.5), SR)
    session.end_of_stream()
    video, _ = await asyncio.wait_for(drain(session), timeout=10)
    assert video == [] and isinstance(session.error, RuntimeError) and "bus" in str(session.error)
    await session.close()
    # a stage that raises does the same
    good = PatternRenderer()
    worker2 = BatchRenderer(good, MonotonicClock(), BatchConfig(threaded=False))
    other = open_session(worker2, good, realtime=False)

    def broken_push(pcm: np.ndarray) -> np.ndarray:
        raise ValueError("features contain NaN")

    other._features.features.push = broken_push  # type: ignore[method-assign]
    other.push_audio(speech(0.2), SR)
    other.end_of_stream()
    video, _ = await asyncio.wait_for(drain(other), timeout=10)
    assert video == [] and other.error is not None
    await other.close()
    await worker.aclose()
    await worker2.aclose()


async def test_end_is_sticky() -> None:
    renderer = PatternRenderer()
    worker = BatchRenderer(renderer, MonotonicClock(), BatchConfig(threaded=False))
    session = open_session(worker, renderer, realtime=False)
    session.push_audio(speech(0.1), SR)
    session.end_of_stream()
    video, audio = await drain(session)
    assert len(video) == len(audio) == 3
    assert await asyncio.wait_for(session.next_video(), 1) is None
    assert await asyncio.wait_for(session.next_audio(), 1) is None
    await session.close()
    await worker.aclose()
