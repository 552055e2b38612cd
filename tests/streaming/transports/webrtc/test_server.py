"""The WebRTC server against a deterministic session double: media both ways, controls, limits, teardown."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import numpy as np
import pytest
from aiortc import RTCPeerConnection

from engine.config import ConfigError
from streaming.pipelines import CLASSIC_BANNER
from streaming.testing import FakeFactory, burst_signal
from streaming.transports.webrtc import ServerConfig
from streaming.transports.webrtc.client import ArrayAudioTrack, AvatarClient, ClientError

from .serving import Served, serve, wait_for

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    server, info = await serve(ServerConfig(token="sesame", max_sessions=1))
    yield info
    await server.close()
    assert info.factory.closed, "the factory is closed with the app"


async def test_wav_stream_controls_metrics_and_teardown(served: Served) -> None:
    mic = ArrayAudioTrack(np.repeat(burst_signal(14.0)[:, None], 2, axis=1), 48_000)  # browsers send 48 k stereo
    client = AvatarClient(served.url, mic, token="sesame")
    info = await client.connect()
    assert info["banner"] == CLASSIC_BANNER and info["mode"] == "classic"
    await wait_for(lambda: client.report.video_frames > 0, 10.0)
    frames0, t0 = client.report.video_frames, time.monotonic()

    # controls over the data channel: valid ones acked with the new state, invalid ones answered, session lives
    ack = await client.control(emotion="happy", intensity=0.7, id=1)
    assert ack == {
        "type": "ack",
        "state": {**ack["state"], "emotion": "happy", "intensity": 0.7},
        "interrupted": False,
        "id": 1,
    }
    for bad in ({"emotion": "bored"}, {"intensity": float("nan")}, {"volume": 3}, {"interrupt": "yes"}, {}):
        reply = await client.control(**bad)
        assert reply["type"] == "error" and reply["message"], bad
    ack = await client.control(interrupt=True)
    assert ack["type"] == "ack" and ack["interrupted"]
    session = served.factory.sessions[0]
    assert session.interrupts == 1 and session.control_state.emotion == "happy"
    reply = await client.control(blink=False)  # in the schema, but not one this session honours: refused, with why
    assert reply["type"] == "error" and "blink: not supported" in reply["message"]
    client.channel.send("{not json")
    reply = await asyncio.wait_for(client._replies.get(), 5)
    assert reply["type"] == "error" and "JSON" in reply["message"]

    async with aiohttp.ClientSession() as http:
        async with http.get(f"{served.url}/metrics") as resp:
            assert resp.status == 401
        async with http.get(f"{served.url}/metrics", headers=client.headers()) as resp:
            assert resp.status == 200
            text = await resp.text()
        assert "avatar_sessions_active 1.0" in text
        assert f'avatar_video_fps{{session="{session.id}"}}' in text
        assert f'avatar_session_latency_ms{{session="{session.id}"}} 200.0' in text

    await asyncio.sleep(max(0.0, 10.0 - (time.monotonic() - t0)))
    received = client.report.video_frames - frames0
    elapsed = time.monotonic() - t0
    report = client.finish_report()
    await client.close()
    freed = await wait_for(lambda: not served.peers and session.closed, 5.0)

    expected = elapsed * session.fps
    print(
        f"\nreceived {received} frames in {elapsed:.2f} s (expected {expected:.0f}), "
        f"client fps {report.video_fps:.2f}, "
        f"audio {report.audio_seconds:.2f} s, A/V offset {report.av_offset_ms} ms (corr {report.av_correlation}), "
        f"stats {report.last_stats.get('fps')}, freed after {freed:.2f} s"
    )
    assert received >= 0.95 * expected
    assert report.video_size == (session.size, session.size)
    assert report.audio_seconds >= 0.9 * elapsed
    assert session.pushed_samples >= 0.9 * elapsed * 16_000, "the microphone reached the session"
    assert report.last_stats["type"] == "stats" and report.last_stats["fps"] > 20
    # the page pattern turns red when the echoed sound is loud: picture and sound must line up on arrival
    assert report.av_correlation is not None and report.av_correlation > 0.3
    # aiortc's receiver holds 4 audio packets (80 ms) before playing them, so the sound arrives a little late
    assert report.av_offset_ms is not None and -120 <= report.av_offset_ms <= 40


async def test_returned_audio_is_the_delayed_input(served: Served) -> None:
    chunks: list[np.ndarray] = []
    mic = ArrayAudioTrack(burst_signal(6.0), 48_000)
    client = AvatarClient(served.url, mic, token="sesame", audio_sinks=[lambda pcm, rate: chunks.append(pcm)])
    await client.connect()
    await asyncio.sleep(5.0)
    await client.close()
    audio = np.concatenate(chunks).astype(np.float32) / 32768.0
    tone = np.abs(np.fft.rfft(audio[:, 0]))
    freqs = np.fft.rfftfreq(audio.shape[0], 1 / 48_000)
    assert abs(freqs[np.argmax(tone)] - 220.0) < 5.0, "the 220 Hz bursts come back"


async def test_rejections(served: Served) -> None:
    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    offer = {"sdp": pc.localDescription.sdp, "type": "offer"}
    auth = {"Authorization": "Bearer sesame"}
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic sesame"}):
            async with http.post(f"{served.url}/offer", json=offer, headers=headers) as resp:
                assert resp.status == 401 and resp.headers["WWW-Authenticate"] == "Bearer"
        async with http.post(f"{served.url}/offer", data="{oops", headers=auth) as resp:
            assert resp.status == 400 and "JSON" in await resp.text()
        async with http.post(f"{served.url}/offer", json={"sdp": 3, "type": "offer"}, headers=auth) as resp:
            assert resp.status == 400
        async with http.post(
            f"{served.url}/offer", json={"sdp": "v=0\r\nnonsense", "type": "offer"}, headers=auth
        ) as r:
            assert r.status == 400 and "SDP" in await r.text()
        audio_only = pc.localDescription.sdp.replace("m=video", "m=audio")
        async with http.post(f"{served.url}/offer", json={"sdp": audio_only, "type": "offer"}, headers=auth) as r:
            assert r.status == 400
        async with http.post(f"{served.url}/offer", data=b"x" * 300_000, headers=auth) as resp:
            assert resp.status == 413, "bodies are bounded"
        assert not served.peers and all(s.closed for s in served.factory.sessions)
        async with http.post(f"{served.url}/offer", json=offer, headers=auth) as resp:
            assert resp.status == 200
            session_id = (await resp.json())["session"]
        async with http.post(f"{served.url}/offer", json=offer, headers=auth) as resp:
            assert resp.status == 503 and resp.headers["Retry-After"] == "5"
        async with http.get(f"{served.url}/health") as resp:
            health = await resp.json()
            assert health["sessions"] == 1 and health["max_sessions"] == 1 and health["banner"] == CLASSIC_BANNER
        # the client never completes ICE: the slot must not stay taken
    await pc.close()
    assert session_id in served.peers


async def test_unanswered_connection_is_freed() -> None:
    server, served = await serve(ServerConfig(connect_timeout_s=1.0))
    try:
        pc = RTCPeerConnection()
        pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        async with aiohttp.ClientSession() as http:
            offer = {"sdp": pc.localDescription.sdp, "type": "offer"}
            async with http.post(f"{served.url}/offer", json=offer) as resp:
                assert resp.status == 200
        await pc.close()  # before ever applying the answer: the server never hears from it
        await wait_for(lambda: not served.peers, 3.0)
        assert served.factory.sessions[0].closed
    finally:
        await server.close()


async def test_websocket_ingest(served: Served) -> None:
    client = AvatarClient(served.url, None, token="sesame")  # receive-only peer: audio comes over the websocket
    await client.connect()
    await wait_for(lambda: client.report.video_frames > 0, 10.0)
    session = served.factory.sessions[0]
    async with aiohttp.ClientSession() as http:
        for url, status in (
            (f"/ws?session={client.session_id}", 401),
            (f"/ws?session={session.id}&token=sesame", 404),  # the session's name is not its address
        ):
            with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                await http.ws_connect(served.url + url)
            assert err.value.status == status
        async with http.ws_connect(f"{served.url}/ws?session={client.session_id}", headers=client.headers()) as ws:
            tone = (0.3 * np.sin(np.arange(16_000) * 2 * np.pi * 220 / 16_000) * 32767).astype("<i2")
            await ws.send_bytes(tone.tobytes())
            await ws.send_bytes(b"\x01\x02\x03")
            reply = await ws.receive_json(timeout=5)
            assert reply["type"] == "error" and "PCM16" in reply["message"]
            assert session.pushed_samples == 16_000
            await ws.send_str('{"emotion": "sad"}')
            assert (await ws.receive_json(timeout=5))["state"]["emotion"] == "sad"
            await ws.send_str("[1, 2]")
            assert (await ws.receive_json(timeout=5))["type"] == "error"
            await ws.send_str('{"head_pose": "fixed", "id": "p"}')
            reply = await ws.receive_json(timeout=5)
            assert reply["type"] == "ack" and reply["id"] == "p"
        frames = client.report.video_frames
        await asyncio.sleep(0.5)
        assert client.report.video_frames > frames, "bad websocket input did not stop the session"
    await client.close()


def test_config_is_validated() -> None:

    for bad in ({"max_sessions": 0}, {"token": ""}, {"video_codecs": ("AV1",)}, {"liveness_timeout_s": 0}):
        with pytest.raises(ConfigError):
            ServerConfig(**bad)  # type: ignore[arg-type]


async def test_h264_only_client_and_codec_mismatch() -> None:
    server, served = await serve(ServerConfig(video_codecs=("H264",)))
    try:
        frames: list[tuple[int, int]] = []
        client = AvatarClient(served.url, None, video_sinks=[lambda rgb: frames.append(rgb.shape[:2])])
        await client.connect(video_codec="H264")
        await wait_for(lambda: len(frames) >= 10, 15.0)
        assert "H264" in client.pc.remoteDescription.sdp and "VP8" not in client.pc.remoteDescription.sdp
        await client.close()

        client = AvatarClient(served.url, None)
        with pytest.raises(ClientError, match="400"):
            await client.connect(video_codec="VP8")
        await client.close()
        assert not served.peers
    finally:
        await server.close()


async def test_session_that_cannot_open_is_a_500_and_frees_the_slot() -> None:
    class Broken(FakeFactory):
        async def open_session(self):  # type: ignore[no-untyped-def]
            raise AttributeError("engine bug")

    server, served = await serve(ServerConfig(max_sessions=1), Broken())
    try:
        pc = RTCPeerConnection()
        pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        offer = {"sdp": pc.localDescription.sdp, "type": "offer"}
        async with aiohttp.ClientSession() as http:
            for _ in range(2):  # the second is not a 503: the failed attempt gave its slot back
                async with http.post(f"{served.url}/offer", json=offer) as resp:
                    assert resp.status == 500 and "could not open a session" in await resp.text()
        await pc.close()
    finally:
        await server.close()
