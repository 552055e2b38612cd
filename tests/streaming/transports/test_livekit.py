"""The engine behind LiveKit Agents' avatar contract, run by LiveKit's own classes: ``AvatarRunner`` with its real
``AVSynchronizer`` / ``AudioSource`` / ``VideoSource`` (LiveKit's native library, no server needed for them),
``QueueAudioOutput`` in-process, and ``DataStreamAudioOutput`` -> ``DataStreamAudioReceiver`` for the separate
worker. The room is an in-memory stand-in (tests/streaming/transports/livekit_standin.py): no LiveKit server can
run here, so nothing travels over a network and no subscriber decodes the tracks; what the runner hands the
synchronizer is recorded instead."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

pytest.importorskip("livekit.agents")

from livekit import api, rtc
from livekit.agents.voice.avatar import AudioSegmentEnd, DataStreamAudioOutput
from livekit.agents.voice.io import PlaybackFinishedEvent

from engine.avatar.default import default_landmarks
from streaming.measure.sync import mouth_box, mouth_opening
from streaming.pipelines import RuntimeConfig
from streaming.runtime import Runtime
from streaming.transports.livekit import (
    EngineAvatar,
    EngineVideoGenerator,
    RemoteEngineAvatar,
    WorkerLaunch,
    avatar_token,
    serve_avatar_worker,
)
from tests.streaming.transports.agent_doubles import (
    FPS,
    avatar,
    espeak,
    pattern_runtime,
    pattern_session,
    quiet_gc,
    voice,
)
from tests.streaming.transports.livekit_standin import StandInAgentSession, StandInRoom, join

pytestmark = pytest.mark.timeout(120)
RATE = 24_000
SECRET = "a-secret-of-32-characters-at-least!"  # the token signer wants 32+ characters


@pytest.fixture(autouse=True)
def _no_gc_pauses() -> Iterator[None]:
    with quiet_gc():
        yield


class SyncSpy:
    """Records what every ``AVSynchronizer`` hands its sources (then lets it through)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.log: list[tuple[float, Any]] = []
        original = rtc.AVSynchronizer.push

        async def push(sync: rtc.AVSynchronizer, frame: Any, timestamp: float | None = None) -> None:
            self.log.append((time.monotonic(), frame))
            await original(sync, frame, timestamp)

        monkeypatch.setattr(rtc.AVSynchronizer, "push", push)

    def video(self) -> list[tuple[float, rtc.VideoFrame]]:
        return [(t, f) for t, f in self.log if isinstance(f, rtc.VideoFrame)]

    def audio(self) -> list[tuple[float, rtc.AudioFrame]]:
        return [(t, f) for t, f in self.log if isinstance(f, rtc.AudioFrame)]


def frames(pcm: np.ndarray, rate: int = RATE, ms: int = 20) -> list[rtc.AudioFrame]:
    step = rate * ms // 1000
    return [
        rtc.AudioFrame(pcm[i : i + step].tobytes(), rate, 1, pcm[i : i + step].size) for i in range(0, pcm.size, step)
    ]


def pcm_of(audio: list[tuple[float, rtc.AudioFrame]]) -> np.ndarray:
    parts = [np.frombuffer(f.data, np.int16) for _, f in audio]
    return np.concatenate(parts) if parts else np.zeros(0, np.int16)


def rgb(frame: rtc.VideoFrame) -> np.ndarray:
    return np.frombuffer(frame.data, np.uint8).reshape(frame.height, frame.width, 3)


class Playback:
    """The agent side's playback events (what AgentSession waits for)."""

    def __init__(self, output: Any) -> None:
        self.events: list[tuple[float, str, Any]] = []
        output.on("playback_started", lambda ev: self.events.append((time.monotonic(), "started", ev)))
        output.on("playback_finished", lambda ev: self.events.append((time.monotonic(), "finished", ev)))

    def finished(self) -> list[tuple[float, PlaybackFinishedEvent]]:
        return [(t, ev) for t, kind, ev in self.events if kind == "finished"]

    async def wait_finished(self, count: int, timeout: float = 6.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.finished()) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert len(self.finished()) >= count, f"playback_finished #{count} did not come: {self.events}"


def left_running() -> list[str]:
    return sorted(t.get_name() for t in asyncio.all_tasks() if t is not asyncio.current_task())


async def test_video_generator_contract() -> None:
    """push_audio / AudioSegmentEnd / clear_buffer / the iterator, on their own."""
    session = pattern_session()
    gen = EngineVideoGenerator(session, audio_sample_rate=RATE)
    assert (gen.options.video_width, gen.options.video_height, gen.options.video_fps) == (8, 8, float(FPS))
    out: list[tuple[float, Any]] = []

    async def read() -> None:
        async for item in gen:
            out.append((time.monotonic(), item))

    reader = asyncio.create_task(read())
    try:
        pcm = voice(0.6, 48_000)  # another rate than the runner's: resampled to it, length kept
        for f in frames(pcm, 48_000, ms=10):
            await gen.push_audio(f)
        await gen.push_audio(AudioSegmentEnd())
        await asyncio.sleep(1.2)
        gen.clear_buffer()  # nothing in flight: harmless
    finally:
        await gen.aclose()
        await session.close()
        await reader
    audio = [(t, f) for t, f in out if isinstance(f, rtc.AudioFrame)]
    assert {(f.sample_rate, f.num_channels) for _, f in audio} == {(RATE, 1)}
    assert pcm_of(audio).size == pytest.approx(0.6 * RATE, abs=2), "resampled speech keeps its length"
    ends = [i for i, (_, f) in enumerate(out) if isinstance(f, AudioSegmentEnd)]
    last_audio = max(i for i, (_, f) in enumerate(out) if isinstance(f, rtc.AudioFrame))
    assert len(ends) == 1 and ends[0] > last_audio, "AudioSegmentEnd after the segment's last audio"
    video = [f for _, f in out if isinstance(f, rtc.VideoFrame)]
    assert {(f.width, f.height, f.type) for f in video} == {(8, 8, rtc.VideoBufferType.RGB24)}
    with pytest.raises(ValueError, match="audio_channels"):
        EngineVideoGenerator(session, audio_channels=3)


async def test_in_process_avatar_runner_and_queue_audio_output(monkeypatch: pytest.MonkeyPatch) -> None:
    spy = SyncSpy(monkeypatch)
    runtime = pattern_runtime()
    room = StandInRoom("agent")
    agent = StandInAgentSession()
    avatar_ = EngineAvatar(runtime, avatar=avatar(), audio_sample_rate=RATE)
    try:
        await avatar_.start(agent, room)
        output = agent.output.audio
        assert output is avatar_.audio_output, "the agent's audio now goes to the avatar"
        playback = Playback(output)
        await asyncio.sleep(0.5)

        # one reply, played to the end
        first = voice(1.0, RATE)
        t_reply = time.monotonic()
        for f in frames(first):
            await output.capture_frame(f)
        output.flush()
        await playback.wait_finished(1)
        t_done, done = playback.finished()[0]

        # a second reply, interrupted by the agent (barge-in) after about a second
        second = voice(3.0, RATE, seed=1)
        for f in frames(second):
            await output.capture_frame(f)
        output.flush()
        await asyncio.sleep(1.0)
        t_clear = time.monotonic()
        output.clear_buffer()
        await playback.wait_finished(2)
        assert avatar_.runner is not None
        queued = avatar_.runner._audio_source.queued_duration  # what the track still had to play
        await asyncio.sleep(0.5)
    finally:
        await avatar_.aclose()
        await runtime.aclose()

    assert left_running() == [], "runner, generator, session and render worker all stopped"
    names = sorted(p.name for p in room.local_participant.published)
    assert names == ["avatar_audio", "avatar_video"], "the agent's participant published the avatar's tracks"

    # the first reply: all of it, once, in real time with its frames, then playback_finished
    audio = spy.audio()
    played_first = pcm_of([(t, f) for t, f in audio if t < t_done])
    assert np.array_equal(played_first, first)
    assert not done.interrupted and done.playback_position == pytest.approx(1.0, abs=0.03)
    first_audio = [t for t, _ in audio if t < t_done]
    assert first_audio[0] - t_reply == pytest.approx(0.2, abs=0.15), "one engine latency after the reply came"
    assert first_audio[-1] - first_audio[0] == pytest.approx(1.0, abs=0.25)
    video = spy.video()
    span = video[-1][0] - video[0][0]
    assert (len(video) - 1) / span == pytest.approx(FPS, rel=0.2), "frames at the session's fps, idle included"

    # the interrupted reply: playback_finished(interrupted) at about where it was, no audio after the clear
    t_int, stopped = playback.finished()[1]
    assert stopped.interrupted and 0.5 < stopped.playback_position < 1.2
    assert t_int - t_clear < 0.12
    assert not [t for t, _ in audio if t > t_clear + 0.06], "no stale audio after clear_buffer"
    assert queued < 0.02, "the audio the track had queued was dropped too"
    after = [(t - t_clear, rgb(f)) for t, f in video if t > t_clear]
    idle = rgb(video[0][1])
    assert after[0][0] < 0.12 and np.array_equal(after[0][1], idle), "the mouth is at rest within 120 ms"
    assert max(b[0] - a[0] for a, b in itertools.pairwise(after[:20])) < 4.5 / FPS


def test_worker_token_publishes_on_behalf_of_the_agent() -> None:
    token = avatar_token(room="r1", agent_identity="agent-7", api_key="key", api_secret=SECRET)
    claims = api.TokenVerifier("key", SECRET).verify(token)
    assert claims.identity == "avatar-engine" and claims.kind == "agent"
    assert claims.attributes == {"lk.publish_on_behalf": "agent-7"}
    assert claims.video is not None and claims.video.room == "r1" and claims.video.room_join


async def test_separate_worker_over_data_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    """Agent side (RemoteEngineAvatar -> DataStreamAudioOutput) and worker side (serve_avatar_worker ->
    DataStreamAudioReceiver -> AvatarRunner) in one stand-in room: lk.playback_started, lk.playback_finished and
    lk.clear_buffer go over RPC between them, the audio over a byte stream."""
    spy = SyncSpy(monkeypatch)
    runtime = pattern_runtime()
    agent_room = StandInRoom("agent")
    worker_room: StandInRoom | None = None
    worker: asyncio.Task[None] | None = None
    launched: list[WorkerLaunch] = []

    async def launch(info: WorkerLaunch) -> None:
        nonlocal worker_room, worker
        launched.append(info)
        claims = api.TokenVerifier("key", SECRET).verify(info.token)
        worker_room = StandInRoom(claims.identity, attributes=claims.attributes)
        join(agent_room, worker_room)
        worker = asyncio.create_task(
            serve_avatar_worker(worker_room, runtime, agent_identity="agent", avatar=avatar(), audio_sample_rate=RATE)
        )

    agent = StandInAgentSession()
    remote = RemoteEngineAvatar(launch=launch, url="ws://stand-in", api_key="key", api_secret=SECRET)
    try:
        await remote.start(agent, agent_room)
        await remote.wait_for_join(timeout=10.0)
        output = agent.output.audio
        assert isinstance(output, DataStreamAudioOutput)
        assert worker_room is not None and worker_room.local_participant.attributes == {"lk.publish_on_behalf": "agent"}
        playback = Playback(output)
        await asyncio.sleep(0.3)

        first = voice(0.8, 16_000)  # the TTS's own rate: the worker resamples to its track's
        for f in frames(first, 16_000):
            await output.capture_frame(f)
        output.flush()
        await playback.wait_finished(1)

        second = voice(3.0, 16_000, seed=2)
        for f in frames(second, 16_000):
            await output.capture_frame(f)
        output.flush()
        await asyncio.sleep(1.0)
        t_clear = time.monotonic()
        output.clear_buffer()
        await playback.wait_finished(2)
        await asyncio.sleep(0.3)
        agent_room.leave()  # the agent leaves: the worker stops by itself
        assert worker is not None
        await asyncio.wait_for(worker, 10.0)
    finally:
        await remote.aclose()
        if worker is not None and not worker.done():
            worker.cancel()
        await runtime.aclose()

    assert launched and launched[0].room == "room" and launched[0].url == "ws://stand-in"
    assert left_running() == []
    calls = [method for _, method, _ in (worker_room.local_participant.rpc_calls if worker_room else [])]
    assert calls.count("lk.playback_started") == 2 and calls.count("lk.playback_finished") == 2
    assert [m for _, m, _ in agent_room.local_participant.rpc_calls] == ["lk.clear_buffer"]
    (_, done), (_, stopped) = playback.finished()
    assert not done.interrupted and done.playback_position == pytest.approx(0.8, abs=0.03)
    assert stopped.interrupted and 0.4 < stopped.playback_position < 1.2
    audio = spy.audio()
    assert {(f.sample_rate, f.num_channels) for _, f in audio} == {(RATE, 1)}
    assert pcm_of(audio).size == pytest.approx(0.8 * RATE + stopped.playback_position * RATE, abs=0.05 * RATE)
    assert not [t for t, _ in audio if t > t_clear + 0.06], "no stale audio after lk.clear_buffer"
    names = sorted(p.name for p in (worker_room.local_participant.published if worker_room else []))
    assert names == ["avatar_audio", "avatar_video"], "the worker published the avatar on the agent's behalf"


@pytest.mark.slow
async def test_classic_avatar_in_the_avatar_runner(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine as a user builds it (classic mode, default avatar) behind AvatarRunner: the mouth moves while
    the reply plays and is still within 120 ms of clear_buffer, with no audio after it."""
    spy = SyncSpy(monkeypatch)
    runtime = Runtime.create(RuntimeConfig(mode="classic"))
    room = StandInRoom("agent")
    agent = StandInAgentSession()
    avatar_ = EngineAvatar(runtime)
    try:
        await avatar_.start(agent, room)
        output = agent.output.audio
        playback = Playback(output)
        await asyncio.sleep(1.5)
        reply, rate = espeak("Hello from LiveKit. The avatar speaks until the agent clears its buffer.")
        t_reply = time.monotonic()
        for f in frames(reply, rate):
            await output.capture_frame(f)
        output.flush()
        await asyncio.sleep(2.2)
        t_clear = time.monotonic()
        output.clear_buffer()
        await playback.wait_finished(1)
        await asyncio.sleep(1.5)
    finally:
        await avatar_.aclose()
        await runtime.aclose()
    assert left_running() == []

    video = spy.video()
    stamps = np.array([t for t, _ in video])
    fps = (len(video) - 1) / (stamps[-1] - stamps[0])
    opening = mouth_opening(np.stack([rgb(f) for _, f in video]), mouth_box(default_landmarks()))
    motion = np.abs(np.diff(opening))
    speaking = motion[(stamps[1:] > t_reply + 0.4) & (stamps[1:] < t_clear)]
    stopped = motion[stamps[1:] > t_clear + 0.12]
    audio_after = [t for t, _ in spy.audio() if t > t_clear + 0.06]
    print(
        f"\nclassic behind AvatarRunner: {len(video)} frames at {fps:.1f} fps, mouth change/frame speaking "
        f"{speaking.mean():.4f} vs after clear_buffer {stopped.mean():.4f} (max {stopped.max():.4f})"
    )
    assert {(f.width, f.height) for _, f in video} == {(512, 512)}
    assert len(speaking) >= 10 and len(stopped) >= 10 and not audio_after  # speed: the benchmarks' business
    assert playback.finished()[0][1].interrupted
    assert speaking.mean() > 5 * stopped.mean() and stopped.max() < 0.25 * speaking.max()
