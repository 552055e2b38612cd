"""The client's parts without a server: measurements, audio files, the playout clock, the recorder, the virtual
camera up to pyvirtualcam's device call."""

from __future__ import annotations

import asyncio
import time
import wave
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar

import av
import numpy as np
import pytest

from streaming.measure.sync import timed_offset
from streaming.transports.webrtc.client import (
    ClientError,
    check_url,
    count_onsets,
    estimate_av_offset,
    ice_servers,
    judge_av_offset,
    read_audio_file,
)
from streaming.transports.webrtc.frame_queue import MAX_WAIT_FOR_AUDIO_S, FrameQueue
from streaming.transports.webrtc.playout import PlayoutClock
from streaming.transports.webrtc.recorder import SessionRecorder
from streaming.transports.webrtc.virtual_camera import VirtualCameraSink


def bursts(seconds: float, rate: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Times and an on/off gate of bursts with random length and spacing."""
    rng = np.random.default_rng(seed)
    t = np.arange(0, seconds, 1.0 / rate)
    gate = np.zeros_like(t)
    pos = 0.2
    while pos < seconds:
        on = rng.uniform(0.15, 0.5)
        gate[(t >= pos) & (t < pos + on)] = 1.0
        pos += on + rng.uniform(0.2, 0.6)
    return t, gate


@pytest.mark.parametrize("lag_ms", [-120, 0, 80, 200])
def test_av_offset_finds_a_known_lag(lag_ms: int) -> None:
    rng = np.random.default_rng(0)
    audio_t, gate = bursts(12, 50)  # 20 ms audio packets
    env = 0.3 * gate + 0.01 * rng.random(audio_t.size)
    # the picture changes when the loudness changes, lag_ms later, sampled at 25 fps with arrival jitter
    video_t = np.arange(0, 12, 0.04) + rng.uniform(0, 0.005, 300)
    shown = np.interp(video_t - lag_ms / 1000.0, audio_t, gate)
    activity = np.abs(np.diff(shown, prepend=shown[0])) + 0.01 * rng.random(video_t.size)
    found = estimate_av_offset(video_t, activity, audio_t, env)
    assert found is not None
    offset, corr = found
    assert abs(offset * 1000 - lag_ms) <= 30 and corr > 0.3
    onsets = count_onsets(audio_t, env)
    assert onsets == int(np.sum(np.diff(gate) > 0)), "every burst start is an onset"
    assert judge_av_offset(offset, corr, onsets, 25.0, [offset, offset + 0.02]) == "reliable"


def test_av_offset_without_speech_is_unreliable() -> None:
    """Noise and a picture that does not follow it: whatever peak comes out is flagged, with the reasons."""
    rng = np.random.default_rng(1)
    audio_t = np.arange(0, 12, 0.02)
    env = 0.01 * rng.random(audio_t.size)  # no speech onsets, only noise
    video_t = np.arange(0, 12, 0.04)
    found = estimate_av_offset(video_t, rng.random(video_t.size), audio_t, env)
    assert found is not None
    verdict = judge_av_offset(found[0], found[1], count_onsets(audio_t, env), 25.0)
    assert verdict.startswith("unreliable") and "correlation" in verdict
    # strong correlation but halves that disagree, too few frames: each reason is named
    verdict = judge_av_offset(0.1, 0.8, 9, 8.0, [0.38, -0.44])
    assert "fps received" in verdict and "halves of the run disagree (+380 vs -440 ms)" in verdict


def test_av_offset_needs_enough_data() -> None:
    t = np.arange(5) * 0.04
    assert estimate_av_offset(t, np.ones(5), t, np.ones(5)) is None


def write_pcm_wav(path: Path, pcm: np.ndarray, rate: int) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(pcm.shape[1])
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((pcm * 32767).astype("<i2").tobytes())
    return path


def write_mp3(path: Path, tone_hz: float, seconds: float, rate: int = 44_100) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.5 * np.sin(2 * np.pi * tone_hz * t)).astype(np.float32)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libmp3lame", rate=rate, layout="mono")
        for i in range(0, pcm.size, 1152):
            frame = av.AudioFrame.from_ndarray(pcm[None, i : i + 1152], format="fltp", layout="mono")
            frame.sample_rate = rate
            frame.pts, frame.time_base = i, Fraction(1, rate)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def test_audio_files_any_format_and_clear_errors(tmp_path: Path) -> None:
    pcm, rate = read_audio_file(write_pcm_wav(tmp_path / "a.wav", np.array([[0.5, -0.5]] * 10), 44_100))
    assert rate == 44_100 and pcm.shape == (10, 2) and np.allclose(pcm[0], [0.5, -0.5], atol=1e-4)
    pcm, rate = read_audio_file(write_mp3(tmp_path / "tone.mp3", 440.0, 1.0))
    spectrum = np.abs(np.fft.rfft(pcm[:, 0]))
    assert abs(np.argmax(spectrum) * rate / pcm.shape[0] - 440.0) < 5.0, "the mp3's tone came through"
    assert 0.9 <= pcm.shape[0] / rate <= 1.2
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(ClientError, match=r"empty\.wav: the file is empty \(0 bytes\)"):
        read_audio_file(tmp_path / "empty.wav")
    (tmp_path / "bad.wav").write_bytes(b"RIFFjunk")
    with pytest.raises(ClientError, match=r"bad\.wav: cannot decode audio: .+"):
        read_audio_file(tmp_path / "bad.wav")
    with pytest.raises(ClientError, match="not found"):
        read_audio_file(tmp_path / "missing.wav")


@pytest.mark.parametrize(
    ("url", "problem"),
    [("127.0.0.1:8080", "expected http"), ("http://", "expected http"), ("http://host:port", "not a valid URL"),
     ("ftp://host", "expected http"), ("http://[::1", "not a valid URL"), ("http://h:0", "port 0")],
)  # fmt: skip
def test_bad_urls_are_named(url: str, problem: str) -> None:
    with pytest.raises(ClientError, match=problem):
        check_url(url)
    assert check_url("http://127.0.0.1:8080/") == "http://127.0.0.1:8080"


def test_ice_server_urls() -> None:
    assert ice_servers([]) == []
    (stun,) = ice_servers(["stun:stun.example.org:3478"])
    assert stun.urls == "stun:stun.example.org:3478" and stun.username is None
    (turn,) = ice_servers(["turn:turn.example.org:3478?transport=udp"], "u", "p")
    assert (turn.username, turn.credential) == ("u", "p")
    with pytest.raises(ClientError, match="needs --ice-username and --ice-credential"):
        ice_servers(["turn:turn.example.org"])
    with pytest.raises(ClientError, match="expected stun:HOST"):
        ice_servers(["http://stun.example.org"])


def test_frames_wait_for_their_sound() -> None:
    clock = PlayoutClock()
    queue = FrameQueue(clock, lead_s=0.04)
    frame = np.zeros((4, 4, 3), np.uint8)
    queue.put(frame, 1.0, arrival=100.0)
    queue.put(frame + 1, 1.04, arrival=100.0)
    # before any sound was played a frame waits, but not for ever
    assert queue.take_due(100.0 + MAX_WAIT_FOR_AUDIO_S - 0.01) is None
    clock.update(0.9, 100.2)  # pts 0.9 is heard at 100.2: pts 1.0 at 100.3, shown 40 ms earlier (lead)
    assert queue.next_due() == pytest.approx(100.26)
    assert queue.take_due(100.25) is None
    shown = queue.take_due(100.31)  # both are due by now: the newer one is shown, the older one skipped
    assert shown is not None and shown.pts_s == 1.04 and queue.skipped == 1
    clock.update(1.5, 100.8 + 0.001)  # a millisecond of callback jitter moves the mapping only a little
    assert clock.due(1.5) == pytest.approx(100.8 + 0.00005, abs=1e-5)
    clock.update(1.5, 101.8)  # a second off (the device stalled): re-anchored at once
    assert clock.due(1.5) == pytest.approx(101.8)
    no_clock = FrameQueue()
    no_clock.put(frame, 5.0, arrival=7.0)
    assert no_clock.take_due(7.0) is not None, "without played sound a frame is shown when it arrives"


def test_recording_muxes_picture_and_sound_by_timestamps(tmp_path: Path) -> None:
    """Frames and audio handed over out of step (audio first, 140 ms of it before any frame, a lost packet) come
    out of session.mp4 lined up by their pts: the flash of each burst sits on its sound."""
    fps, rate = 25, 48_000
    recorder = SessionRecorder(tmp_path / "rec", fps)
    _, gate = bursts(8.0, rate / 960, seed=3)  # one gate value per 20 ms packet
    rng = np.random.default_rng(0)
    video = []
    for i in range(int(8.0 * fps)):
        loud = gate[min(int(i / fps * 50), gate.size - 1)]
        rgb = np.full((48, 64, 3), 40, np.uint8)
        rgb[..., 0] = 230 if loud else 20
        video.append((i / fps, rgb))
    audio = []
    for k, g in enumerate(gate):
        tone = 0.4 * g * np.sin(2 * np.pi * 300 * (np.arange(960) + 960 * k) / rate)
        pcm = (np.stack([tone, tone], axis=1) * 32767).astype(np.int16) + rng.integers(-30, 30, (960, 2), np.int16)
        audio.append((k * 0.02, pcm))
    del audio[100]  # a lost packet: its slot becomes silence, nothing after it moves
    v = a = 0
    while v < len(video) or a < len(audio):  # audio runs 140 ms ahead of the picture, as aiortc delivers it
        if a < len(audio) and (v >= len(video) or audio[a][0] <= video[v][0] + 0.14):
            recorder.audio(audio[a][1], rate, audio[a][0])
            a += 1
        else:
            recorder.video(video[v][1], video[v][0])
            v += 1
    path = recorder.close()
    assert path == tmp_path / "rec" / "session.mp4" and [p.name for p in (tmp_path / "rec").iterdir()] == [path.name]
    times, red, sound, t0, sr = [], [], [], None, 0
    with av.open(str(path)) as container:
        assert {s.type for s in container.streams} == {"video", "audio"}
        for frame in container.decode(video=0):
            times.append(float(frame.pts * frame.time_base))
            red.append(frame.to_ndarray(format="rgb24")[..., 0].mean())
    with av.open(str(path)) as container:
        for frame in container.decode(audio=0):
            t0 = float(frame.pts * frame.time_base) if t0 is None else t0
            sr = frame.sample_rate
            sound.append(frame.to_ndarray().mean(axis=0))
    assert len(times) == len(video) and t0 is not None
    found = timed_offset(np.asarray(times), np.asarray(red), np.concatenate(sound), sr, t0)
    print(f"\nrecorded A/V offset {found.offset_ms:+.1f} ms, correlation {found.correlation:.2f}")
    assert abs(found.offset_ms) <= 20.0 and found.correlation > 0.8


def test_recording_without_video_fails_and_leaves_nothing(tmp_path: Path) -> None:
    recorder = SessionRecorder(tmp_path / "rec", 25)
    recorder.audio(np.zeros((960, 2), np.int16), 48_000, 0.0)
    with pytest.raises(ClientError, match="no video was received"):
        recorder.close()
    assert list((tmp_path / "rec").iterdir()) == []


class FakeCamera:
    """A pyvirtualcam backend that records what it is sent (registered as backend "test")."""

    instances: ClassVar[list[FakeCamera]] = []
    fail_with: ClassVar[str | None] = None

    def __init__(self, width: int, height: int, fps: float, fourcc: int, device: str | None, **kw: Any) -> None:
        if FakeCamera.fail_with:
            raise RuntimeError(FakeCamera.fail_with)
        self.width, self.height, self.fps, self.fourcc = width, height, fps, fourcc
        self.frames: list[tuple[float, np.ndarray]] = []
        self.closed = False
        FakeCamera.instances.append(self)

    def send(self, frame: np.ndarray) -> None:
        # backends get the packed bytes of the camera's format (RGB here): one flat uint8 array
        assert frame.ndim == 1 and frame.dtype == np.uint8 and frame.flags.c_contiguous
        self.frames.append((time.monotonic(), frame.reshape(self.height, self.width, 3).copy()))

    def close(self) -> None:
        self.closed = True

    def device(self) -> str:
        return "/dev/video-test"

    def native_fourcc(self) -> int | None:
        return self.fourcc


@pytest.fixture
def fake_camera() -> type[FakeCamera]:
    pyvirtualcam = pytest.importorskip("pyvirtualcam", reason="pyvirtualcam is in the [client] extra")
    pyvirtualcam.register_backend("test", FakeCamera)
    FakeCamera.instances.clear()
    FakeCamera.fail_with = None
    return FakeCamera


async def test_virtual_camera_gets_rgb_frames_at_its_fps(fake_camera: type[FakeCamera]) -> None:
    import pyvirtualcam

    clock = PlayoutClock()
    camera = VirtualCameraSink(64, 48, 20, clock, backend="test")
    cam = fake_camera.instances[0]
    assert (cam.width, cam.height, cam.fps) == (64, 48, 20)
    assert cam.fourcc == pyvirtualcam.util.encode_fourcc(pyvirtualcam.PixelFormat.RGB.value)
    stop = asyncio.Event()
    runner = asyncio.create_task(camera.run(stop))
    start = time.monotonic()
    clock.update(0.0, start + 0.1)  # the sound of pts 0 is heard 100 ms from now
    for i in range(10):  # 10 frames in a burst; one of another size (the camera's format is fixed)
        rgb = np.full((96, 128, 3) if i == 5 else (48, 64, 3), i * 20, np.uint8)
        rgb[..., 2] = 7
        camera(rgb, i * 0.05)
    await asyncio.sleep(1.5)  # the frames last 0.5 s: after that the camera keeps getting the last one
    stop.set()
    await runner
    camera.close()
    assert cam.closed
    times = np.array([t for t, _ in cam.frames])
    gaps = np.diff(times)
    print(f"\ncamera: {len(times)} frames, period {gaps.mean() * 1000:.1f} +- {gaps.std() * 1000:.1f} ms")
    assert abs(gaps.mean() - 0.05) < 0.005 and np.percentile(np.abs(gaps - 0.05), 90) < 0.02
    assert all(f.shape == (48, 64, 3) and f.dtype == np.uint8 and f[0, 0, 2] == 7 for _, f in cam.frames)
    # frame i is handed over at its sound's time minus the camera's one-frame delay, not in the arrival burst
    firsts = {}
    for t, f in cam.frames:
        firsts.setdefault(int(f[0, 0, 0]) // 20, t)
    for i in (0, 4, 9):
        expected = start + 0.1 + i * 0.05 - camera.frame_delay_s
        assert abs(firsts[i] - expected) <= 0.06, f"frame {i}: sent {firsts[i] - expected:+.3f} s off"
    assert int(cam.frames[-1][1][0, 0, 0]) == 180, "a stalled stream repeats its last frame"


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ("'v4l2loopback' backend: No v4l2 loopback device found at /dev/video[0-99].", "OBS Virtual Camera"),
        ("'v4l2loopback' backend: Device /dev/video4 could not be opened: Device or resource busy", "is busy"),
        ("'v4l2loopback' backend: Virtual camera device /dev/video0 is not a video output device.", "--camera-device"),
    ],
)
def test_virtual_camera_errors_say_what_to_do(fake_camera: type[FakeCamera], error: str, expected: str) -> None:
    fake_camera.fail_with = error
    with pytest.raises(ClientError, match=expected) as info:
        VirtualCameraSink(64, 64, 25, device="/dev/video4", backend="test")
    assert "\n" not in str(info.value)
