"""``engine client`` as a person uses it, on a desktop without hardware (see tests/streaming/cli/desktop.py):
the microphone through PulseAudio and PortAudio, the window under Xvfb with its keys, the avatar's sound played
through the same audio server in sync with the window.

Each test starts its own PulseAudio / Xvfb and the client as a subprocess, exactly as a user runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import av
import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from PIL import Image

from engine.media import load_audio, write_wav
from streaming.factory import open_engine_factory
from streaming.measure.sync import default_mouth_box, mouth_opening, timed_offset
from streaming.pipelines import RuntimeConfig
from streaming.session import SessionConfig
from streaming.testing import FakeFactory
from streaming.transports.webrtc import ServerConfig, create_app
from streaming.transports.webrtc.app import SERVER_KEY
from tests.streaming.cli.desktop import MonitorRecorder, Pulse, need, pulse_server, screenshot, xvfb
from tests.streaming.cli.test_client import NoVideoFactory, decode_red_and_sound

pytestmark = pytest.mark.timeout(120)
ENGINE = [sys.executable, "-c", "import sys; from streaming.cli import main; sys.exit(main(prog_name='engine'))"]


SERVERS: dict[str, web.Application] = {}  # url -> app, to see what the server got


@contextlib.asynccontextmanager
async def serving(factory: object) -> AsyncIterator[str]:
    app = create_app(factory, ServerConfig())  # type: ignore[arg-type]
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    url = str(server.make_url("")).rstrip("/")
    SERVERS[url] = app
    try:
        yield url
    finally:
        SERVERS.pop(url, None)
        await server.close()


async def microphone_streaming(url: str, timeout: float = 40.0) -> None:
    """Wait until the server receives the client's microphone (the client takes seconds to start)."""
    peers = SERVERS[url][SERVER_KEY].peers
    deadline = time.monotonic() + timeout
    while not any(peer.stats.mic_frames > 10 for peer in peers.values()):
        assert time.monotonic() < deadline, "the client's microphone never reached the server"
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def classic_engine() -> AsyncIterator[str]:
    """The real engine (classic mode, default avatar) in this process. Its render budget is raised to 12 frames:
    on a busy 2-core machine the default budget drops most frames to stay live, and these tests look at what a
    frame shows, not at how fast it came."""
    factory = await open_engine_factory(RuntimeConfig(mode="classic", session=SessionConfig(compute_frames=12)))
    async with serving(factory) as url:
        yield url


async def engine_client(env: dict[str, str], *args: str, timeout: float = 90.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *ENGINE, "client", *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out.decode(), err.decode()


def speech_with_pause(tmp: Path) -> tuple[Path, list[tuple[float, float]]]:
    """Two spoken sentences (espeak-ng) with 0.6 s of silence before, 1.5 s between and 1 s after
    -> (wav, the two speech spans in seconds)."""
    need("espeak-ng")
    parts = []
    for k, text in enumerate(("Hello, I am the avatar and I can hear you.", "Now I speak again after a pause.")):
        subprocess.run(["espeak-ng", "-w", str(tmp / f"s{k}.wav"), text], check=True, timeout=30)
        parts.append(load_audio(tmp / f"s{k}.wav"))
    rate = parts[0][1]
    gaps = (0.6, 1.5, 1.0)
    pieces, spans, t = [], [], 0.0
    for gap, (pcm, _) in zip(gaps, [*parts, (np.zeros((0, 1)), rate)], strict=True):
        pieces += [np.zeros((round(gap * rate), 1)), pcm]
        t += gap
        if pcm.size:
            spans.append((t, t + pcm.shape[0] / rate))
            t += pcm.shape[0] / rate
    write_wav(tmp / "speech.wav", np.concatenate(pieces), rate)
    return tmp / "speech.wav", spans


def longest_run(flags: np.ndarray) -> int:
    best = run = 0
    for flag in flags:
        run = run + 1 if flag else 0
        best = max(best, run)
    return best


def frame_rms(audio: np.ndarray, rate: int, t0: float, times: np.ndarray, fps: int = 25) -> np.ndarray:
    """Loudness of ``audio`` (starting at ``t0``) over each frame's 1 / fps slot."""
    out = np.zeros(times.size)
    for i, t in enumerate(times):
        seg = audio[max(round((t - t0) * rate), 0) : max(round((t - t0 + 1 / fps) * rate), 0)]
        out[i] = np.sqrt(np.mean(seg**2)) if seg.size else 0.0
    return out


async def speak_into_mic(pulse: Pulse, url: str, tmp: Path, *extra: str) -> tuple[dict, list[tuple[float, float]]]:
    """``engine client --mic`` while a speech file is played into the microphone -> (report, speech spans)."""
    wav, spans = speech_with_pause(tmp)
    seconds = spans[-1][1] + 1.0
    proc = asyncio.create_task(
        engine_client(pulse.env, "--url", url, "--mic", "--mic-device", "pulse", "--duration", str(seconds + 5.0),
                      "--video-timeout", "30", "--record", str(tmp / "rec"), *extra)
    )  # fmt: skip
    await microphone_streaming(url)  # the speaker starts once the client listens
    feed = pulse.play_into_mic(wav)
    code, out, err = await proc
    feed.wait(10)
    assert code == 0, err
    return json.loads(out), spans


def test_devices_are_listed_and_a_missing_input_is_explained(tmp_path: Path) -> None:
    with pulse_server(tmp_path / "pa") as pulse:
        listing = pulse.run(*ENGINE, "client", "--list-devices", timeout=60)
        assert listing.returncode == 0, listing.stderr
        print(f"\n{listing.stdout}")
        assert re.search(r"^<.*\b\d+\s+default \(ALSA\): \d+ in", listing.stdout, re.M), "the default input is marked"
        assert re.search(r"\bpulse \(ALSA\): [1-9]\d* in, [1-9]\d* out", listing.stdout), "PortAudio reaches pulse"
        wrong = pulse.run(*ENGINE, "client", "--url", "http://127.0.0.1:9", "--mic", "--mic-device", "nothere",
                          timeout=60)  # fmt: skip
        assert wrong.returncode == 1
        assert "--mic-device 'nothere': no input device matches" in wrong.stderr and "available inputs:" in wrong.stderr
    # no sound server and no sound card: PortAudio sees nothing, and the user is told so in one line
    gone = {**pulse.env, "PULSE_SERVER": f"unix:{tmp_path / 'no-such-socket'}"}
    none = subprocess.run([*ENGINE, "client", "--url", "http://127.0.0.1:9", "--mic"], env=gone,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert none.returncode == 1 and "Traceback" not in none.stderr
    assert "Error: no audio input device exists" in none.stderr and "PulseAudio" in none.stderr


async def test_microphone_without_video_fails_within_the_timeout(tmp_path: Path) -> None:
    with pulse_server(tmp_path / "pa") as pulse:
        async with serving(NoVideoFactory()) as url:
            started = time.monotonic()
            code, out, err = await engine_client(pulse.env, "--url", url, "--mic", "--video-timeout", "2")
            took = time.monotonic() - started
            session = SERVERS.get(url)
    print(f"\nmic, no video: exit {code} after {took:.1f} s: {err.strip()}")
    assert session is not None and code == 1 and out == "" and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("Error: no video from") and took < 30.0


async def test_microphone_through_pulseaudio_drives_the_stream(tmp_path: Path) -> None:
    """Speech played into a PulseAudio source reaches the server through sounddevice / PortAudio, and what comes
    back follows it: the double's frames turn red exactly while its echoed sound is loud, dark in the pause."""
    factory = FakeFactory(size=64)
    with pulse_server(tmp_path / "pa") as pulse:
        async with serving(factory) as url:
            report, spans = await speak_into_mic(pulse, url, tmp_path)
    session = factory.sessions[0]
    print(f"\nmic report: frames {report['video_frames']}, server mic frames {report['last_stats'].get('mic_frames')}")
    assert session.pushed_samples >= 0.9 * (spans[-1][1] + 1.0) * 16_000, "the microphone streamed all along"
    times, red, sound, rate, t0 = decode_red_and_sound(tmp_path / "rec" / "session.mp4")
    loud = frame_rms(sound, rate, t0, times)
    # what came back is the speech that was played into the microphone (the double echoes its input)
    fed, fed_rate = load_audio(tmp_path / "speech.wav")
    fed_loud = frame_rms(fed[:, 0], fed_rate, 0.0, np.arange(0, fed.shape[0] / fed_rate, 0.04))
    match = max(np.corrcoef(fed_loud, loud[k : k + fed_loud.size])[0, 1] for k in range(loud.size - fed_loud.size))
    speaking, silent = loud > 0.25 * loud.max(), loud < 0.01 * loud.max()
    print(f"returned speech vs fed speech: correlation {match:.2f}; frames: {speaking.sum()} speaking, "
          f"{silent.sum()} silent")  # fmt: skip
    assert match > 0.8
    # both sentences and the pause between them came back (1.5 s of silence: at least 25 silent frames in a row)
    first, last = np.flatnonzero(speaking)[[0, -1]]
    assert longest_run(silent[first:last]) >= 25
    assert red[speaking].mean() > 0.6 and red[silent].mean() < 0.2


@pytest.mark.slow
async def test_microphone_moves_the_real_avatars_mouth(tmp_path: Path) -> None:
    """The real classic engine, speech through PulseAudio: the default avatar's mouth (the lip-sync instrument's
    mouth box) opens with the speech it hears and stays closed in the pause."""
    with pulse_server(tmp_path / "pa") as pulse:
        async with classic_engine() as url:
            report, _ = await speak_into_mic(pulse, url, tmp_path)
    print(f"\nreal engine over the mic: {report['video_frames']} frames at {report['video_fps']:.1f} fps")
    times, opening, audio, t0 = [], [], [], None
    rate = 16_000
    with av.open(str(tmp_path / "rec" / "session.mp4")) as container:
        box = None
        for frame in container.decode(video=0):
            rgb = frame.to_ndarray(format="rgb24")
            box = box or default_mouth_box(rgb.shape[1])
            times.append(float(frame.pts * frame.time_base))
            opening.append(float(mouth_opening(rgb[None], box)[0]))
    with av.open(str(tmp_path / "rec" / "session.mp4")) as container:
        for frame in container.decode(audio=0):
            t0 = float(frame.pts * frame.time_base) if t0 is None else t0
            rate = frame.sample_rate
            audio.append(frame.to_ndarray().mean(axis=0))
    assert t0 is not None and len(times) >= 40, f"too few frames to judge: {len(times)}"
    t, op, sound = np.asarray(times), np.asarray(opening), np.concatenate(audio)
    loud = frame_rms(sound, rate, t0, t)
    speaking, quiet = loud > 0.02, loud < 0.002
    closed = np.median(op[quiet])
    print(f"mouth opening: speaking {np.mean(op[speaking] - closed):+.4f}, pause spread {np.std(op[quiet]):.4f}")
    assert speaking.sum() >= 5 and quiet.sum() >= 10, "a busy machine renders few frames, but not this few"
    # the mouth opens while speech is heard and rests while it is not
    assert np.percentile(op[speaking] - closed, 75) > 0.03
    assert np.percentile(np.abs(op[quiet] - closed), 90) < 0.01
    found = timed_offset(t, op, sound, rate, t0)
    print(f"mouth vs returned speech: {found.offset_ms:+.0f} ms, correlation {found.correlation:.2f}")
    assert found.correlation > 0.4 and abs(found.offset_ms) <= 120.0


def window_id(display_env: dict[str, str], pid: int, timeout: float = 40.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = subprocess.run(["xdotool", "search", "--pid", str(pid)], env=display_env, capture_output=True,
                               text=True, timeout=10)  # fmt: skip
        ids = found.stdout.split()
        if ids:
            title = subprocess.run(["xdotool", "getwindowname", ids[-1]], env=display_env, capture_output=True,
                                   text=True, timeout=10).stdout  # fmt: skip
            if "fps" in title:
                return ids[-1]
        time.sleep(0.2)
    raise AssertionError("the client's window never appeared")


async def test_window_shows_the_avatar(tmp_path: Path) -> None:
    """The real engine's default avatar in a window under Xvfb: drawn, alive (the mouth moves), titled."""
    need("xdotool")
    wav, _ = speech_with_pause(tmp_path)
    with xvfb() as display:
        async with classic_engine() as url:
            proc = await asyncio.create_subprocess_exec(
                *ENGINE, "client", "--url", url, "--audio", str(wav), "--show", "--video-timeout", "30",
                env=display.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            try:
                wid = await asyncio.to_thread(window_id, display.env, proc.pid)
                await asyncio.sleep(1.5)  # speech starts 0.6 s into the file
                shots = []
                for _ in range(8):
                    shots.append(await asyncio.to_thread(screenshot, display))
                    await asyncio.sleep(0.35)
                title = subprocess.run(["xdotool", "getwindowname", wid], env=display.env, capture_output=True,
                                       text=True, timeout=10).stdout.strip()  # fmt: skip
                out, err = await asyncio.wait_for(proc.communicate(), 60)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
    assert proc.returncode == 0, err.decode()
    report = json.loads(out)
    print(f"\nwindow title: {title!r}; outputs {report['outputs']}")
    assert re.fullmatch(r"avatar \| \d+\.\d fps \| latency \d+ ms \| neutral \| q quit, space interrupt, e emotion",
                        title), title  # fmt: skip
    assert report["outputs"]["window"]["driver"] == "x11" and report["outputs"]["window"]["shown"] >= 20
    # where the window is: the pixels that are not the black root window
    drawn = np.any(np.stack(shots).max(axis=-1) > 16, axis=0)
    ys, xs = np.nonzero(drawn)
    y0, x0 = ys.min(), xs.min()
    size = report["video_size"][0]
    assert (ys.max() - y0 + 1, xs.max() - x0 + 1) == (size, size), "one window of the stream's size"
    faces = np.stack([s[y0 : y0 + size, x0 : x0 + size] for s in shots])
    Image.fromarray(np.concatenate([faces[0], faces[len(faces) // 2]], axis=1)).save(tmp_path / "window.png")
    assert faces.mean() > 40.0 and faces.std() > 20.0, "a picture, not a blank or black window"
    box = default_mouth_box(size)
    opening = mouth_opening(faces, box)
    print(f"mouth opening across screenshots: {np.round(opening, 3)}")
    assert np.ptp(opening) > 0.02, "the mouth moved between screenshots"


async def test_window_keys_send_the_controls(tmp_path: Path) -> None:
    """e cycles the emotion, space interrupts, q quits: the server's session sees each of them."""
    need("xdotool")
    factory = FakeFactory(size=96)
    wav, _ = speech_with_pause(tmp_path)
    with xvfb() as display:
        async with serving(factory) as url:
            proc = await asyncio.create_subprocess_exec(
                *ENGINE, "client", "--url", url, "--audio", str(wav), "--show", "--duration", "60",
                env=display.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            try:
                wid = await asyncio.to_thread(window_id, display.env, proc.pid)
                session = factory.sessions[0]
                for key in ("e", "e", "space", "i"):
                    subprocess.run(["xdotool", "windowfocus", "--sync", wid, "key", key], env=display.env,
                                   check=True, timeout=10)  # fmt: skip
                    await asyncio.sleep(0.5)
                state, interrupts = session.control_state.as_dict(), session.interrupts
                title = subprocess.run(["xdotool", "getwindowname", wid], env=display.env, capture_output=True,
                                       text=True, timeout=10).stdout.strip()  # fmt: skip
                quit_at = time.monotonic()
                subprocess.run(["xdotool", "windowfocus", "--sync", wid, "key", "q"], env=display.env, check=True,
                               timeout=10)  # fmt: skip
                out, err = await asyncio.wait_for(proc.communicate(), 30)
                quit_s = time.monotonic() - quit_at
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
    print(f"\nafter e, e, space, i: emotion {state['emotion']}, {interrupts} interrupts; title {title!r}; "
          f"q quit in {quit_s:.1f} s")  # fmt: skip
    assert state["emotion"] == "surprised", "neutral -> sad -> surprised"
    assert interrupts == 2
    assert "| surprised |" in title
    assert proc.returncode == 0 and quit_s < 10.0, err.decode()
    assert json.loads(out)["controls_acked"] == 4


async def test_audio_out_plays_in_sync_with_the_window(tmp_path: Path) -> None:
    """--show --audio-out: the sound captured from PulseAudio's sink and the frames as the window put them on
    screen line up within 40 ms (lip-sync instrument; the double's frames are red while its sound is loud)."""
    need("xdotool")
    factory = FakeFactory(size=64)
    wav, spans = speech_with_pause(tmp_path)
    with pulse_server(tmp_path / "pa") as pulse, xvfb() as display:
        env = {**pulse.env, "DISPLAY": display.name}
        async with serving(factory) as url:
            capture = MonitorRecorder(pulse)
            capture.start()  # before the client: the sink runs in 10 ms steps while someone listens closely
            try:
                code, out, err = await engine_client(
                    env, "--url", url, "--audio", str(wav), "--show", "--audio-out", "default",
                    "--record", str(tmp_path / "rec"), "--timeline", str(tmp_path / "timeline.json"),
                )  # fmt: skip
            finally:
                heard = capture.stop()
    assert code == 0, err
    report = json.loads(out)
    print(f"\noutputs: {report['outputs']}")
    assert report["outputs"]["audio_out"]["played_s"] >= spans[-1][1]
    timeline = json.loads((tmp_path / "timeline.json").read_text())
    times, red, *_ = decode_red_and_sound(tmp_path / "rec" / "session.mp4")
    red_at = {round(t * 25): r for t, r in zip(times, red, strict=True)}
    shown = [(s["at"], red_at[round(s["pts"] * 25)]) for s in timeline["shown"] if round(s["pts"] * 25) in red_at]
    assert len(shown) >= 0.8 * 25 * spans[-1][1]
    shown_t, shown_red = np.array(shown).T
    level = np.sqrt(np.mean(heard.audio[(heard.audio != 0)] ** 2)) if np.any(heard.audio) else 0.0
    assert level > 0.02, "the avatar's sound came out of the audio server"
    found = timed_offset(shown_t, shown_red, heard.audio, heard.rate, heard.t0)
    held = report["outputs"]["window"]["hold_ms"]
    print(f"window vs speaker: {found.offset_ms:+.1f} ms (correlation {found.correlation:.2f}, jitter "
          f"{found.jitter_ms:.0f} ms), frames held {held:.0f} ms for their sound")  # fmt: skip
    assert found.correlation > 0.6
    assert abs(found.offset_ms) <= 40.0
