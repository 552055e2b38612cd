"""WHIP and WHEP with clients no one here wrote: Debian's ``whip-client`` (GStreamer webrtcbin) publishes a voice,
headless Chromium watches over WHEP (``whep_player.html``: RTCPeerConnection + fetch, on another origin).

What counts is what they do to the avatar: the fake session shows red while the audio it was given is loud, so a
tone that goes on and off must make the picture go red and back; the real classic runtime must open the mouth.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import wave
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from engine.avatar.default import SIZE, default_landmarks
from streaming.factory import open_engine_factory
from streaming.measure.browser import open_page
from streaming.measure.sync import mouth_box
from streaming.pipelines import RuntimeConfig
from streaming.testing import FakeFactory, burst_signal
from streaming.transports.webrtc import ServerConfig
from streaming.transports.webrtc.client import ArrayAudioTrack

from .independent import (
    CAMERA,
    TONE_BURSTS,
    WhipClient,
    player_page,
    player_state,
    wait_player,
    wav_pipeline,
    whip_client_env,
)
from .serving import Served, apply_answer, publisher, serve, wait_for

pytestmark = pytest.mark.timeout(240)
TOKEN = "sesame"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def write_wav(path: Path, pcm: np.ndarray, rate: int) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def loudness(frames: np.ndarray, audio: np.ndarray, half_window_s: float) -> np.ndarray:
    """For each video frame (column 0: ms on the page clock), the loudest received-audio reading within
    ``half_window_s`` of it (the audio arrives with the picture, on the same clock)."""
    out = np.zeros(len(frames))
    for k, t in enumerate(frames[:, 0]):
        near = audio[np.abs(audio[:, 0] - t) <= 1000.0 * half_window_s, 1]
        out[k] = near.max() if near.size else np.nan
    return out


def av_agreement(frames: np.ndarray, audio: np.ndarray) -> tuple[float, float]:
    """The audio shift (ms) at which red frames best match loud audio, and the share of frames that match then."""
    red = frames[:, 1] > 128
    best = (0.0, 0.0)
    for lag in np.arange(-500.0, 501.0, 20.0):
        loud = np.interp(frames[:, 0] + lag, audio[:, 0], audio[:, 1]) > 0.1
        score = float((red == loud).mean())
        if score > best[1]:
            best = (float(lag), score)
    return best


def red_toggles(red: np.ndarray) -> tuple[float, float]:
    """Share of frames that are red (the audio was loud) and that are not."""
    return float((red > 128).mean()), float((red < 128).mean())


async def whip_session(served: Served, timeout: float = 20.0) -> str:
    """The id of the session the WHIP publisher opened."""
    await wait_for(lambda: any(p.role == "whip" for p in served.peers.values()), timeout)
    return next(pid for pid, p in served.peers.items() if p.role == "whip")


@pytest.mark.parametrize("trickle, camera", [(True, True), (False, False)], ids=["trickle+camera", "audio-only"])
async def test_whip_client_tone_drives_the_session_and_delete_ends_it(
    tmp_path: Path, trickle: bool, camera: bool
) -> None:
    env = whip_client_env(tmp_path / "whip")
    server, served = await serve(ServerConfig(token=TOKEN, max_sessions=1))
    client = await WhipClient.start(
        f"{served.url}/whip", env, TONE_BURSTS, CAMERA if camera else None, token=TOKEN, trickle=trickle
    )
    try:
        sid = await whip_session(served)
        peer = served.peers[sid]
        await wait_for(lambda: peer.pc.connectionState == "connected", 15.0)
        session = served.factory.sessions[0]
        # what the session makes of the voice, read where every viewer reads it: its fan-out
        view = served.server.hosted[sid].fanout.subscribe()
        red: list[float] = []
        t0, pushed0 = time.monotonic(), session.pushed_samples
        while time.monotonic() - t0 < 5.0:
            frame = await asyncio.wait_for(view.next_video(), 2.0)
            assert frame is not None
            red.append(float(frame.rgb[..., 0].mean()))
        elapsed = time.monotonic() - t0
        pushed = session.pushed_samples - pushed0
        loud, quiet = red_toggles(np.asarray(red))
        print(f"\nwhip-client ({'trickle' if trickle else 'no trickle'}, camera {camera}): {pushed / 16_000:.2f} s "
              f"of audio in {elapsed:.2f} s, {len(red)} frames, red {loud:.2f} / not {quiet:.2f}")  # fmt: skip
        assert pushed >= 0.8 * 16_000 * elapsed, "the publisher's audio reaches the session in real time"
        assert 0.2 < loud < 0.8 and 0.2 < quiet < 0.8, "the tone's on/off shows in the picture"
        if camera:
            assert peer.snapshot()["mic_frames"] > 0
    finally:
        rc = await client.stop()
        print(client.log[-1500:])
    try:
        assert rc == 0, client.log
        assert "Disconnecting from server" in client.log and "[ERR]" not in client.log
        await wait_for(lambda: not served.peers, 5.0)
        assert peer.closed_reason == "ended by the client (WHIP DELETE)"
        assert session.closed and served.server.active == 0
    finally:
        await server.close()


@pytest.mark.browser
async def test_chromium_whep_player_watches_a_session(tmp_path: Path) -> None:
    """Chromium POSTs a recvonly offer to /whep from another origin, decodes the avatar of a new session (fed PCM
    bursts over the websocket), and DELETEs the resource."""
    server, served = await serve(ServerConfig(token=TOKEN), FakeFactory(size=128))
    wav = write_wav(tmp_path / "silence.wav", np.zeros(16_000, np.float32), 16_000)  # Chromium's unused mic
    try:
        async with player_page(f"{served.url}/whep", TOKEN, tmp_path / "profile", wav) as page:
            state = await wait_player(page)
            assert state["status"] == 201 and state["contentType"] == "application/sdp", state
            assert state["location"].startswith("/whep/resource/") and state["etag"]
            rid = state["location"].rsplit("/", 1)[1]
            async with aiohttp.ClientSession() as http, http.ws_connect(
                f"{served.url}/ws?session={rid}", headers={"Authorization": f"Bearer {TOKEN}"}
            ) as ws:  # fmt: skip
                pcm = (burst_signal(10.0, 16_000) * 32767).astype("<i2")
                t0 = time.monotonic()
                for k in range(0, pcm.size, 320):  # 20 ms blocks in real time
                    await ws.send_bytes(pcm[k : k + 320].tobytes())
                    await asyncio.sleep(max(0.0, t0 + (k + 320) / 16_000 - time.monotonic()))
            state = await player_state(page)
            frames = np.asarray(state["frames"])
            video = state["stats"]["video"]
            decoded_fps = (frames[-1, 0] - frames[-26, 0]) and 25_000 / (frames[-1, 0] - frames[-26, 0])
            loud, quiet = red_toggles(frames[-200:, 1])
            print(f"\nchromium WHEP: {video}, audio {state['stats'].get('audio')}, {len(frames)} frames shown, "
                  f"last 25 at {decoded_fps:.1f} fps, red {loud:.2f} / not {quiet:.2f}")  # fmt: skip
            assert video["framesDecoded"] >= 200 and video["frameWidth"] == 128
            assert decoded_fps >= 20.0
            assert state["stats"]["audio"]["packetsReceived"] > 50 * 5, "the synced audio arrives too"
            assert 0.1 < loud < 0.9 and 0.1 < quiet < 0.9, "the bursts show in what Chromium decodes"
            assert served.factory.sessions[0].pushed_samples == pcm.size
            # the synced audio carries the bursts, and picture and sound go together: frames are red while the sound
            # heard with them is loud (chance agreement is about 0.5; page timers under load blur the rest)
            audio = np.asarray(state["audio"])
            assert (audio[:, 1] > 0.1).mean() > 0.2 and (audio[:, 1] < 0.02).mean() > 0.2, "bursts heard"
            lag_ms, agreement = av_agreement(frames, audio)
            print(f"red frames match loud audio in {agreement:.0%} of frames with the audio shifted {lag_ms:+.0f} ms")
            assert agreement > 0.65 and abs(lag_ms) <= 300
            await page.evaluate("window.stop()")
            await wait_for(lambda: not served.peers, 5.0)
            assert (await player_state(page))["deleted"] == 200 and served.factory.sessions[0].closed
    finally:
        await server.close()


@pytest.mark.browser
async def test_the_shipped_watch_page_shows_a_published_session(tmp_path: Path) -> None:
    """``/watch?session=ID`` (the server's own WHEP page) shows the session a WHIP publisher drives."""
    server, served = await serve(ServerConfig(token=TOKEN), FakeFactory(size=96))
    wav = write_wav(tmp_path / "silence.wav", np.zeros(16_000, np.float32), 16_000)
    voice = ArrayAudioTrack(burst_signal(30.0), 48_000)
    pub = await publisher(voice, video=False)
    try:
        async with aiohttp.ClientSession() as http, http.post(
            f"{served.url}/whip", data=pub.localDescription.sdp, headers={**AUTH, "Content-Type": "application/sdp"}
        ) as resp:  # fmt: skip
            assert resp.status == 201
            sid = resp.headers["Location"].rsplit("/", 1)[1]
            await apply_answer(pub, await resp.text())
        async with open_page(f"{served.url}/watch?session={sid}&token={TOKEN}", wav, tmp_path / "profile") as page:
            shown = "(document.getElementById('avatar') || null)?.getVideoPlaybackQuality().totalVideoFrames"
            for _ in range(300):
                if (await page.evaluate(shown) or 0) >= 50:
                    break
                await asyncio.sleep(0.1)
            size = await page.evaluate("[document.getElementById('avatar').videoWidth, "
                                       "document.getElementById('avatar').videoHeight]")  # fmt: skip
            frames = await page.evaluate(shown)
            print(f"\nthe watch page shows {frames} frames at {size}")
            assert frames >= 50 and size == [96, 96]
            hosted = served.server.hosted[sid]
            assert len(hosted.viewers) == 1 and len(served.factory.sessions) == 1
    finally:
        await pub.close()
        await server.close()


@pytest.mark.slow
@pytest.mark.browser
async def test_whip_client_speech_moves_the_classic_mouth_seen_by_chromium(tmp_path: Path) -> None:
    """The real classic runtime: whip-client publishes a WAV (silence, espeak-ng speech, silence), Chromium watches
    the session over WHEP; the mouth box varies while the speech plays, not in the silences around it (the viewer
    may join late on a busy machine: the silence after the speech is always seen)."""
    env = whip_client_env(tmp_path / "whip")
    espeak = subprocess.run(
        ["espeak-ng", "-w", str(tmp_path / "speech.wav"), "Hello there. This avatar talks while you speak to it, "
         "and it stops when you stop. Testing one, two, three, four, five."],
        capture_output=True, check=False,
    )  # fmt: skip
    if espeak.returncode != 0:
        pytest.skip("espeak-ng is not installed")
    with wave.open(str(tmp_path / "speech.wav")) as speech:
        rate = speech.getframerate()
        voice = np.frombuffer(speech.readframes(speech.getnframes()), "<i2").astype(np.float32) / 32768
    lead_s, voice_s, trail_s = 8.0, voice.size / rate, 5.0
    pcm = np.concatenate([np.zeros(int(lead_s * rate), np.float32), voice, np.zeros(int(trail_s * rate), np.float32)])
    wav = write_wav(tmp_path / "publish.wav", pcm, rate)
    factory = await open_engine_factory(RuntimeConfig(mode="classic"))
    server, served = await serve(ServerConfig(token=TOKEN), factory)  # type: ignore[arg-type]
    started = time.time()  # the publisher's file starts playing (live) about now
    client = await WhipClient.start(f"{served.url}/whip", env, wav_pipeline(wav), token=TOKEN)
    try:
        sid = await whip_session(served, 60.0)
        x0, y0, x1, y1 = mouth_box(default_landmarks())
        box = [x0 / SIZE, y0 / SIZE, x1 / SIZE, y1 / SIZE]
        async with player_page(f"{served.url}/whep/{sid}", TOKEN, tmp_path / "profile", wav, box) as page:
            await wait_player(page, 60.0)
            await asyncio.sleep(max(0.0, started + lead_s + voice_s + trail_s - 0.3 - time.time()))
            state = await player_state(page)
        frames = np.asarray(state["frames"])
        print(f"\nchromium saw {len(frames)} frames of the classic avatar; stats {state['stats']}")
        assert state["stats"]["video"]["framesDecoded"] >= 100 and frames[0, 3] == SIZE
        # which frames were shown during the speech, and which in silence: from the synced audio Chromium received
        audio = np.asarray(state["audio"])
        loud_at = audio[audio[:, 1] > 0.02, 0]
        assert loud_at.size, "the speech reached the viewer's audio"
        mouth = frames[:, 2]
        in_speech = (frames[:, 0] > loud_at[0] + 300.0) & (frames[:, 0] < loud_at[-1] - 300.0)
        silent = mouth[loudness(frames, audio, 0.6) < 0.005]
        spoken = mouth[in_speech]
        print(f"speech heard for {(loud_at[-1] - loud_at[0]) / 1000:.1f} s (the WAV's is {voice_s:.1f} s)")
        print(f"mouth darkness: silence {silent.mean():.3f} +- {silent.std():.4f} ({len(silent)} frames), speech "
              f"{spoken.mean():.3f} +- {spoken.std():.4f} ({len(spoken)} frames)")  # fmt: skip
        assert len(silent) >= 10 and len(spoken) >= 50
        assert spoken.std() > 3 * max(silent.std(), 1e-3), "the mouth moves with the speech"
    finally:
        rc = await client.stop()
        await server.close()
    assert rc == 0, client.log
