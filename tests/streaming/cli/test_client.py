"""``engine client`` against a local server (session double): file streaming, the muxed recording, the video
timeout, bad input in one line, ICE without outside servers, and a client killed mid-stream whose session the
server must free within 5 s."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import wave
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from aiohttp.test_utils import TestServer
from aioice import stun
from click.testing import CliRunner

from engine.motion.control_schema import ControlState
from streaming.api import LiveSession
from streaming.cli import main
from streaming.frames import VideoFrame
from streaming.measure.sync import timed_offset
from streaming.testing import FakeFactory, FakeSession, burst_signal
from streaming.transports.webrtc import ServerConfig, create_app
from streaming.transports.webrtc.app import SERVER_KEY
from streaming.transports.webrtc.client import AvatarClient, ClientError, VirtualCameraSink, ice_servers
from tests.streaming.transports.webrtc.test_client import write_mp3

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


def decode_red_and_sound(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, float]:
    """session.mp4 -> (frame times, red level per frame, mono audio, rate, time of audio[0])."""
    times, red, sound = [], [], []
    t0, rate = 0.0, 0
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            times.append(float(frame.pts * frame.time_base))
            red.append(frame.to_ndarray(format="rgb24")[..., 0].mean() / 255.0)
    with av.open(str(path)) as container:
        for k, audio in enumerate(container.decode(audio=0)):
            if k == 0:
                t0, rate = float(audio.pts * audio.time_base), audio.sample_rate
            sound.append(audio.to_ndarray().mean(axis=0))
    return np.asarray(times), np.asarray(red), np.concatenate(sound), rate, t0


async def test_client_streams_a_file_and_records_one_muxed_mp4(tmp_path: Path) -> None:
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
        assert report["server"]["banner"] is None and report["server"]["mode"] == "classic"
        # the estimate comes with its evidence; the double's picture follows its sound, so it is trusted
        assert report["av_sync"] == "reliable" and report["av_onsets"] >= 5 and report["av_correlation"] >= 0.3
        assert {p.name for p in (tmp_path / "rec").iterdir()} == {"session.mp4", "report.json"}
        assert json.loads((tmp_path / "rec" / "report.json").read_text())["video_frames"] == report["video_frames"]
        # the double turns its frames red while its output sound is loud: in the file they must coincide
        times, red, sound, rate, t0 = decode_red_and_sound(tmp_path / "rec" / "session.mp4")
        assert times.size >= 0.9 * 25 * 5.0 and sound.size / rate >= 5.0
        found = timed_offset(times, red, sound, rate, t0)
        print(f"session.mp4: A/V offset {found.offset_ms:+.1f} ms, correlation {found.correlation:.2f}")
        assert abs(found.offset_ms) <= 40.0 and found.correlation > 0.6
        assert factory.sessions[0].closed
        code, out, err = await run_engine("client", "--url", url, "--token", "bad", "--wav", str(wav))
        assert code != 0 and "401" in err
        # mp3 (what `engine render` accepts) streams too
        mp3 = write_mp3(tmp_path / "tone.mp3", 220.0, 1.5)
        # with controls: sent over the data channel in order, each answer printed (a refusal with the reason)
        code, out, err = await run_engine(
            "client", "--url", url, "--token", "t0k", "--audio", str(mp3),
            "--control", "emotion=happy", "--control", "blink_rate=1.5", "--control", "intensity=0.4",
        )  # fmt: skip
        assert code == 0, err
        report = json.loads(out)
        assert report["video_frames"] > 25 and factory.sessions[-1].pushed_samples >= 1.4 * 16_000
        assert "control emotion=happy: applied" in err and "control intensity=0.4: applied" in err, err
        assert "control blink_rate=1.5 refused: blink_rate: not supported by this session" in err, err
        assert [c["reply"] for c in report["controls"]] == ["ack", "error", "ack"], report["controls"]
        state = factory.sessions[-1].control_state
        assert (state.emotion, state.intensity, state.blink_rate) == ("happy", 0.4, ControlState().blink_rate)
        # a value outside the schema fails before connecting, naming the control
        code, out, err = await run_engine("client", "--url", url, "--audio", str(mp3), "--control", "lip_scale=9")
        assert code != 0 and "--control" in err and "lip_scale" in err, err
    finally:
        await server.close()


class NoVideoSession(FakeSession):
    """Accepts the call, consumes audio, never produces a frame (a stuck renderer)."""

    async def next_video(self) -> VideoFrame | None:
        while not self.closed:
            await asyncio.sleep(0.05)
        return None


class NoVideoFactory(FakeFactory):
    async def open_session(self) -> LiveSession:
        session = NoVideoSession(f"s{len(self.sessions)}")
        self.sessions.append(session)
        return session


async def test_no_video_fails_within_the_timeout(tmp_path: Path) -> None:
    server = TestServer(create_app(NoVideoFactory(), ServerConfig()), host="127.0.0.1", port=0)
    await server.start_server()
    try:
        url = str(server.make_url("")).rstrip("/")
        wav = write_wav(tmp_path / "in.wav", 20.0)
        started = time.monotonic()
        code, out, err = await run_engine(
            "client", "--url", url, "--wav", str(wav), "--video-timeout", "2", "--record", str(tmp_path / "rec")
        )
        took = time.monotonic() - started
        print(f"\nno video: exit {code} after {took:.1f} s: {err.strip()}")
        assert code != 0 and out == ""
        assert err.strip().splitlines()[-1].startswith("Error: no video from") and "within 2 s" in err
        assert "Traceback" not in err and took < 20.0, "it gave up after the timeout, not after the 20 s file"
        assert list((tmp_path / "rec").iterdir()) == [], "no half-written recording is left"
    finally:
        await server.close()


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    wav = write_wav(tmp_path / "x.wav", 0.5)
    for url in ("127.0.0.1:8080", "http://host:port", "http://[::1"):
        result = runner.invoke(main, ["client", "--url", url, "--wav", str(wav)])
        assert result.exit_code == 1, result.output
        assert result.output.startswith("Error: --url") and result.output.count("\n") == 1, result.output
    (tmp_path / "empty.wav").write_bytes(b"")
    result = runner.invoke(main, ["client", "--url", "http://127.0.0.1:9", "--wav", str(tmp_path / "empty.wav")])
    assert result.exit_code == 1 and "empty.wav: the file is empty (0 bytes)" in result.output
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFFjunk")
    result = runner.invoke(main, ["client", "--url", "http://127.0.0.1:9", "--wav", str(bad)])
    assert result.exit_code == 1 and "bad.wav: cannot decode audio" in result.output
    result = runner.invoke(main, ["client", "--url", "http://127.0.0.1:9", "--wav", str(wav)])
    assert result.exit_code == 1 and "cannot reach http://127.0.0.1:9" in result.output
    result = runner.invoke(main, ["client", "--url", "http://127.0.0.1:9"])
    assert result.exit_code == 2 and "--mic or --audio" in result.output
    result = runner.invoke(main, ["client", "--wav", str(wav)])
    assert result.exit_code == 2 and "--url is required" in result.output
    result = runner.invoke(main, ["client", "--url", "http://h:1", "--wav", str(wav), "--ice-server", "turn:h:3478"])
    assert result.exit_code == 1 and "--ice-username and --ice-credential" in result.output
    try:
        VirtualCameraSink(64, 64, 25)
    except ClientError as exc:
        assert "OBS Virtual Camera" in str(exc) and "v4l2loopback" in str(exc)


def test_show_without_a_display_says_so(tmp_path: Path) -> None:
    pytest.importorskip("pygame", reason="pygame is in the [client] extra")
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "SDL_VIDEODRIVER")}
    wav = write_wav(tmp_path / "x.wav", 0.5)
    result = subprocess.run([*ENGINE, "client", "--url", "http://127.0.0.1:9", "--wav", str(wav), "--show"],
                            env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "Error: --show: no display to open a window on (DISPLAY / WAYLAND_DISPLAY is not set); "
        "use --record DIR or --virtual-camera instead"
    )


class StunServer(asyncio.DatagramProtocol):
    """Answers STUN binding requests on 127.0.0.1 with a made-up public address, so a gathered server-reflexive
    candidate is recognisable."""

    MAPPED = ("203.0.113.7", 40000)

    def __init__(self) -> None:
        self.requests = 0
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        request = stun.parse_message(data)
        self.requests += 1
        response = stun.Message(stun.Method.BINDING, stun.Class.RESPONSE, request.transaction_id)
        response.attributes["XOR-MAPPED-ADDRESS"] = self.MAPPED
        self.transport.sendto(bytes(response), addr)


async def gathered_types(client: AvatarClient) -> set[str]:
    client.pc.addTransceiver("video", direction="recvonly")
    await client.pc.setLocalDescription(await client.pc.createOffer())
    sdp = client.pc.localDescription.sdp
    await client.pc.close()
    return {line.split(" typ ")[1].split()[0] for line in sdp.splitlines() if line.startswith("a=candidate:")}


async def test_ice_contacts_no_server_unless_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    looked_up: list[str] = []
    resolve = socket.gethostbyname

    def recording_gethostbyname(host: str) -> str:  # how aioice finds a STUN / TURN server by name
        looked_up.append(host)
        return resolve(host)

    monkeypatch.setattr(socket, "gethostbyname", recording_gethostbyname)
    loop = asyncio.get_running_loop()
    transport, server = await loop.create_datagram_endpoint(StunServer, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    try:
        default = await gathered_types(AvatarClient("http://127.0.0.1:9", None))
        assert default == {"host"}, f"default gathering found {default}"
        assert server.requests == 0 and looked_up == [], f"the default configuration looked up {looked_up}"
        configured = await gathered_types(
            AvatarClient("http://127.0.0.1:9", None, ice=ice_servers([f"stun:127.0.0.1:{port}"]))
        )
        print(f"\ncandidates: default {sorted(default)}, with --ice-server {sorted(configured)}")
        assert "srflx" in configured and server.requests >= 1, "the test's detector sees a STUN server when used"
    finally:
        transport.close()


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
