"""``engine client`` against a local server (session double): WAV streaming, recording, dependency messages,
and a client killed mid-stream whose session the server must free within 5 s."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np
import pytest
from aiohttp.test_utils import TestServer
from click.testing import CliRunner

from streaming.cli import main
from streaming.testing import FakeFactory, burst_signal
from streaming.transports.webrtc import ServerConfig, create_app
from streaming.transports.webrtc.app import SERVER_KEY
from streaming.transports.webrtc.client import ClientError, VirtualCameraSink

pytestmark = pytest.mark.timeout(120)
ENGINE = [sys.executable, "-c", "import sys; from streaming.cli import main; sys.exit(main(prog_name='engine'))"]


def write_wav(path: Path, seconds: float, rate: int = 16_000) -> Path:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes((burst_signal(seconds, rate) * 32767).astype("<i2").tobytes())
    return path


async def run_engine(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *ENGINE, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_client_streams_wav_and_records(tmp_path: Path) -> None:
    factory = FakeFactory()
    server = TestServer(create_app(factory, ServerConfig(token="t0k")), host="127.0.0.1", port=0)
    await server.start_server()
    try:
        wav = write_wav(tmp_path / "in.wav", 5.0)
        url = str(server.make_url("")).rstrip("/")
        code, out, err = await run_engine(
            "client", "--url", url, "--token", "t0k", "--wav", str(wav), "--record", str(tmp_path / "rec")
        )
        assert code == 0, err
        report = json.loads(out)
        print(f"\nclient report: {report}")
        assert report["video_frames"] >= 0.9 * 25 * 5.0
        assert 23.0 <= report["video_fps"] <= 27.0
        assert report["audio_seconds"] >= 5.0
        assert report["server"]["banner"] and report["server"]["mode"] == "classic"
        assert "classic mode" in err, "the banner is shown to the user"
        assert {p.name for p in (tmp_path / "rec").iterdir()} == {"video.mp4", "audio.wav", "report.json"}
        with wave.open(str(tmp_path / "rec" / "audio.wav")) as rec:
            assert rec.getframerate() == 48_000 and rec.getnframes() >= 5 * 48_000
        assert factory.sessions[0].closed
        code, out, err = await run_engine("client", "--url", url, "--token", "bad", "--wav", str(wav))
        assert code != 0 and "401" in err
    finally:
        await server.close()


async def test_killed_client_is_freed_within_5s(tmp_path: Path) -> None:
    factory = FakeFactory()
    app = create_app(factory, ServerConfig())
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    peers = app[SERVER_KEY].peers
    proc = subprocess.Popen(
        [
            *ENGINE,
            "client",
            "--url",
            str(server.make_url("")).rstrip("/"),
            "--wav",
            str(write_wav(tmp_path / "a.wav", 30)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(400):
            if peers and next(iter(peers.values())).stats.video_sent > 25:
                break
            await asyncio.sleep(0.05)
        assert peers, "the client never connected"
        session = factory.sessions[0]
        proc.send_signal(signal.SIGKILL)  # no DTLS close, no goodbye: only silence tells the server
        proc.wait()
        killed = time.monotonic()
        while peers or not session.closed:
            assert time.monotonic() - killed < 5.0, "session not freed within 5 s"
            await asyncio.sleep(0.05)
        print(f"\nkilled client freed after {time.monotonic() - killed:.2f} s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        await server.close()


def test_missing_optional_dependencies_are_named(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["client", "--url", "http://127.0.0.1:9", "--mic"])
    if "sounddevice is unavailable" in result.output or "cannot open the microphone" in result.output:
        assert "avatar-engine[client]" in result.output and "libportaudio2" in result.output
    else:  # pragma: no cover - a machine with PortAudio and a microphone would try to connect instead
        pytest.skip("sounddevice and a microphone are available here")
    assert result.exit_code != 0
    result = runner.invoke(main, ["client", "--url", "http://127.0.0.1:9"])
    assert result.exit_code == 2 and "--mic or --wav" in result.output
    wav = write_wav(tmp_path / "x.wav", 0.5)
    result = runner.invoke(main, ["client", "--url", "http://127.0.0.1:9", "--wav", str(wav), "--show"])
    assert result.exit_code != 0
    assert "opencv-python" in result.output or "cannot reach" in result.output
    try:
        VirtualCameraSink(64, 64, 25)
    except ClientError as exc:
        assert "OBS Virtual Camera" in str(exc) and "v4l2loopback" in str(exc)
    else:  # pragma: no cover
        pytest.skip("a virtual camera exists here")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFFjunk")
    result = runner.invoke(main, ["client", "--url", "http://127.0.0.1:9", "--wav", str(bad)])
    assert result.exit_code != 0 and "cannot read WAV" in result.output
    assert np.isfinite(0.0)
