"""Unit tests of the server's pieces: clock pacing, audio slotting, control parsing, metrics text."""

from __future__ import annotations

import asyncio
import time

import av
import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamError

from streaming.control import handle_control_text
from streaming.frames import OutputAudio
from streaming.pacing import SessionClock
from streaming.prometheus import render_metrics
from streaming.testing import FakeSession
from streaming.transports.webrtc.config import ServerConfig
from streaming.transports.webrtc.peer import Peer
from streaming.transports.webrtc.tracks import SessionAudioTrack, SessionVideoTrack, TrackStats


async def test_clock_paces_to_pts() -> None:
    clock = SessionClock(margin_s=0.0)
    assert await clock.wait_until(1.0) == 0.0  # the first pts anchors the clock
    start = time.monotonic()
    lateness = await clock.wait_until(1.1)
    assert 0.09 <= time.monotonic() - start <= 0.2 and lateness <= 0.0
    await asyncio.sleep(0.05)
    assert await clock.wait_until(1.1) > 0.04  # now late


class ScriptedAudio(FakeSession):
    """Output audio comes from a queue the test feeds."""

    def __init__(self) -> None:
        super().__init__("scripted")
        self.queue: asyncio.Queue[OutputAudio | None] = asyncio.Queue()

    async def next_audio(self) -> OutputAudio | None:
        return await self.queue.get()


async def test_audio_track_places_chunks_on_the_clock_and_fills_gaps() -> None:
    session = ScriptedAudio()
    ramp = np.linspace(0.1, 0.5, 480, dtype=np.float32)
    session.queue.put_nowait(OutputAudio(ramp, start=160))
    session.queue.put_nowait(OutputAudio(np.full(320, 0.25, np.float32), start=960))
    stats = TrackStats()
    clock = SessionClock(margin_s=0.0)
    await clock.wait_until(0.0)  # video anchored the clock at frame 0
    track = SessionAudioTrack(session, clock, stats)
    frames = [await track.recv() for _ in range(5)]
    assert [f.pts for f in frames] == [0, 320, 640, 960, 1280] and all(f.sample_rate == 16_000 for f in frames)
    pcm = np.concatenate([f.to_ndarray()[0] for f in frames]).astype(np.float32) / 32767
    np.testing.assert_allclose(pcm[:160], 0.0)
    np.testing.assert_allclose(pcm[160:640], ramp, atol=1e-4)
    np.testing.assert_allclose(pcm[640:960], 0.0)  # a gap: silence, the stream does not stall
    np.testing.assert_allclose(pcm[960:1280], 0.25, atol=1e-4)
    assert stats.audio_late_samples == 0
    # a chunk that shows up after part of it was due: the late part is counted and skipped, the rest plays
    session.queue.put_nowait(OutputAudio(np.full(640, -0.5, np.float32), start=1280))
    await asyncio.sleep(0.01)
    frame = await track.recv()
    assert frame.pts == 1600 and stats.audio_late_samples == 320
    np.testing.assert_allclose(frame.to_ndarray()[0] / 32767, -0.5, atol=1e-4)
    session.queue.put_nowait(None)
    await asyncio.sleep(0.01)
    with pytest.raises(MediaStreamError):
        await track.recv()  # the session ended and everything was sent


async def test_video_track_stamps_rtp_pts_and_drops_late_frames() -> None:
    session = FakeSession("v", fps=25, size=16)
    stats = TrackStats()
    track = SessionVideoTrack(session, SessionClock(), stats, max_lag_s=0.05)
    first = await track.recv()
    assert isinstance(first, av.VideoFrame) and first.pts == 0 and (first.width, first.height) == (16, 16)
    time.sleep(0.3)  # the event loop stalls: the frames due meanwhile are too late to show
    second = await track.recv()
    assert second.pts >= 6 * 3600 and stats.video_dropped >= 5
    assert stats.video_sent == 2


class SlowSession(FakeSession):
    """Claims 25 fps but delivers 12.5: the transport must follow it instead of dropping every frame."""

    async def next_video(self):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0.08)
        frame = await super().next_video()
        return frame


async def test_video_track_follows_a_session_that_falls_behind() -> None:
    session = SlowSession("slow", fps=25, size=16)
    session._wait = lambda pts: asyncio.sleep(0)  # type: ignore[method-assign]
    clock = SessionClock()
    stats = TrackStats()
    track = SessionVideoTrack(session, clock, stats, max_lag_s=0.2)
    for _ in range(40):
        await track.recv()
    assert stats.video_sent == 40, "every frame the late session produced was shown"
    assert clock.resyncs >= 1 and stats.video_dropped == 0


async def test_audio_waits_for_the_video_anchor() -> None:
    session = FakeSession("a")
    clock = SessionClock(margin_s=0.0)
    track = SessionAudioTrack(session, clock, TrackStats())
    first = asyncio.ensure_future(track.recv())
    await asyncio.sleep(0.2)
    assert not first.done(), "audio does not start the clock while video is coming"
    await clock.wait_until(10 / 25)  # the first video frame is frame 10
    frame = await asyncio.wait_for(first, 1.0)
    assert frame.pts == 6400  # 0.4 s at 16 kHz: audio starts where the picture starts
    track.stop()


def test_control_text_answers_everything() -> None:
    session = FakeSession("c")
    assert handle_control_text(session, '{"emotion": "happy", "id": "a"}')["id"] == "a"
    assert handle_control_text(session, b"\xff\xfe")["type"] == "error"
    assert "too large" in handle_control_text(session, "x" * 20_000)["message"]
    assert handle_control_text(session, '{"type": "reboot"}')["type"] == "error"
    assert handle_control_text(session, '{"id": [1]}')["type"] == "error"
    reply = handle_control_text(session, '{"interrupt": true}')
    assert reply == {"type": "ack", "state": {}, "interrupted": True} and session.interrupts == 1


def test_metrics_text_is_prometheus_exposition() -> None:
    snap = {
        "session": 'a"b',
        "fps": 25.0,
        "latency_ms": 200.0,
        "send_latency_ms": 3.0,
        "video_sent": 10,
        "video_dropped": 1,
        "audio_frames_sent": 20,
        "audio_late_samples": 0,
        "mic_frames": 5,
        "clock_resyncs": 0,
        "session_metrics": {"render ms/frame": 12.5},
    }
    text = render_metrics({"sessions_active": 1, "sessions_opened_total": 3}, [snap])
    lines = text.splitlines()
    assert "# TYPE avatar_sessions_opened_total counter" in lines
    assert "avatar_sessions_active 1.0" in lines
    assert 'avatar_video_frames_dropped_total{session="a\\"b"} 1.0' in lines
    assert 'avatar_session_render_ms_frame{session="a\\"b"} 12.5' in lines
    samples = [line for line in lines if not line.startswith("#")]
    assert all(len(line.rsplit(" ", 1)) == 2 for line in samples)


async def test_watchdog_forgives_its_own_event_loop_stalls() -> None:

    closed: list[str] = []
    session = FakeSession("w")
    peer = Peer(session, ServerConfig(liveness_timeout_s=2.0), lambda p: closed.append(p.name))
    peer.connected_at = time.monotonic()
    peer.touch()
    peer._spawn(peer._watchdog(), "watchdog")
    await asyncio.sleep(0.3)
    time.sleep(2.5)  # the loop is blocked: the client's packets cannot be read, that is not its fault
    await asyncio.sleep(0.6)
    assert not closed and not peer.closing
    await asyncio.sleep(2.0)  # now real silence from the client
    assert closed == ["w"] and peer.closing and "no activity" in (peer.closed_reason or "")
    await peer.close()
    assert session.closed


class LockstepSession(FakeSession):
    """Like the real session: a frame and its 40 ms of audio are released together, in real time."""

    def __init__(self) -> None:
        super().__init__("lockstep", fps=25, size=16)
        self.audio_q: asyncio.Queue[OutputAudio] = asyncio.Queue()

    async def next_video(self):  # type: ignore[no-untyped-def]
        frame = await super().next_video()
        n = frame.frame_index
        self.audio_q.put_nowait(OutputAudio(np.full(640, 0.1, np.float32), start=n * 640))
        return frame

    async def next_audio(self) -> OutputAudio | None:
        return await self.audio_q.get()


async def test_audio_released_with_its_frame_is_never_late() -> None:
    session = LockstepSession()
    clock = SessionClock()
    stats = TrackStats()
    video = SessionVideoTrack(session, clock, stats, max_lag_s=0.5)
    audio = SessionAudioTrack(session, clock, stats)

    async def pull_video() -> None:
        for _ in range(25):
            await video.recv()

    async def pull_audio() -> list[np.ndarray]:
        return [(await audio.recv()).to_ndarray()[0] for _ in range(48)]

    _, blocks = await asyncio.gather(pull_video(), pull_audio())
    audio.stop()
    # without the anchor margin ~40 % of the slots race their chunk and go out as silence; one frame's worth
    # of slack is left for a scheduling hiccup on a loaded machine
    assert stats.audio_late_samples <= 640
    pcm = np.concatenate(blocks) / 32767
    assert np.mean(np.abs(pcm - 0.1) < 1e-3) >= 0.95
