"""WHIP (RFC 9725) and WHEP (draft-ietf-wish-whep) conformance: status codes, headers, content types and media
directions, each MUST / SHOULD that applies to the server, then the media: a WHIP publisher's voice reaches its
session, and WHEP viewers of one session share one render.

RFC 9725 sections: 4.2 (POST offer -> 201 + Location + answer, DELETE -> 200), 4.3.1/4.3.2 (PATCH trickle:
``application/trickle-ice-sdpfrag`` -> 204, unsupported restarts -> 422, If-Match -> 412, no PATCH support -> 405),
4.4 (``recvonly`` answers to a ``sendonly`` publisher), 4.5 (bearer token -> 401 + WWW-Authenticate), 4.6 (ICE servers
in ``Link: rel="ice-server"``), 4.7 (503 + Retry-After on load); the endpoint and session URLs answer 405 to the
methods they do not define.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import numpy as np
import pytest
from aiortc import RTCPeerConnection
from multidict import CIMultiDict

from engine.config import ConfigError
from streaming.testing import burst_signal
from streaming.transports.webrtc import ServerConfig
from streaming.transports.webrtc.client import ArrayAudioTrack
from streaming.transports.webrtc.config import IceServer

from .serving import NO_STUN, SDP, Served, apply_answer, directions, player, publisher, serve, wait_for, watch_video

pytestmark = pytest.mark.timeout(120)
TOKEN = "sesame"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
POST_SDP = {**AUTH, "Content-Type": SDP}
TRICKLE = "application/trickle-ice-sdpfrag"


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    server, info = await serve(ServerConfig(token=TOKEN, max_sessions=2, max_viewers=3))
    yield info
    await server.close()


async def post(
    http: aiohttp.ClientSession, url: str, sdp: str | bytes, headers: dict | None = None
) -> tuple[int, CIMultiDict[str], str]:
    """POST an SDP offer: status, headers (``_links``: every Link value) and body."""
    async with http.post(url, data=sdp, headers=headers or POST_SDP) as resp:
        out: CIMultiDict[str] = CIMultiDict(resp.headers)
        out["_links"] = "\n".join(resp.headers.getall("Link", []))
        return resp.status, out, await resp.text()


def links(headers: CIMultiDict[str]) -> list[str]:
    return [link for link in headers["_links"].split("\n") if link]


# --- WHIP ---------------------------------------------------------------------------------------------------


async def test_whip_publisher_gets_recvonly_answer_location_etag_and_a_watch_link(served: Served) -> None:
    pc = await publisher()
    async with aiohttp.ClientSession() as http:
        status, headers, answer = await post(http, f"{served.url}/whip", pc.localDescription.sdp)
        assert status == 201, answer
        assert headers["Content-Type"].startswith(SDP)
        assert headers["Location"].startswith("/whip/") and headers["ETag"].startswith('"')
        assert headers["Accept-Patch"] == TRICKLE
        # RFC 9725 section 4.2: the endpoint answers a sendonly publisher recvonly; it sends nothing back
        assert directions(answer) == {"audio": "recvonly", "video": "recvonly"}
        assert "a=setup:actpass" not in answer and "a=ice-ufrag:" in answer and "a=fingerprint:" in answer
        # the server does not trickle: every candidate of its own is in the answer, and it says so
        assert "a=candidate:" in answer and "a=end-of-candidates" in answer and "typ srflx" not in answer
        session_id = headers["Location"].rsplit("/", 1)[1]
        assert f'</whep/{session_id}>; rel="whep"' in links(headers)
        assert not [link for link in links(headers) if "ice-server" in link], "no ICE servers unless configured"
        await apply_answer(pc, answer)
        assert served.server.hosted[session_id].owner.role == "whip"

        # the session resource: 405 for what it does not define, DELETE 200 then 404
        for method in ("GET", "POST", "PUT"):
            async with http.request(method, f"{served.url}{headers['Location']}", headers=AUTH) as resp:
                assert resp.status == 405, method
                assert "DELETE" in resp.headers["Allow"] and "PATCH" in resp.headers["Allow"]
        async with http.delete(f"{served.url}{headers['Location']}") as resp:
            assert resp.status == 401 and resp.headers["WWW-Authenticate"] == "Bearer"
        async with http.delete(f"{served.url}{headers['Location']}", headers=AUTH) as resp:
            assert resp.status == 200
        assert not served.peers and served.factory.sessions[0].closed
        async with http.delete(f"{served.url}{headers['Location']}", headers=AUTH) as resp:
            assert resp.status == 404
    await pc.close()


async def test_whip_accepts_an_audio_only_publisher_and_refuses_what_is_not_one(served: Served) -> None:
    async with aiohttp.ClientSession() as http:
        pc = await publisher(video=False)
        status, headers, answer = await post(http, f"{served.url}/whip", pc.localDescription.sdp)
        assert status == 201 and directions(answer) == {"audio": "recvonly"}
        await pc.close()
        async with http.delete(f"{served.url}{headers['Location']}", headers=AUTH) as resp:
            assert resp.status == 200

        viewer = await player()  # a player's offer is not a publisher's: the error names WHEP
        status, _, text = await post(http, f"{served.url}/whip", viewer.localDescription.sdp)
        assert status == 400 and "recvonly" in text and "/whep" in text
        await viewer.close()
        camera_only = await publisher(audio_line=False)
        status, _, text = await post(http, f"{served.url}/whip", camera_only.localDescription.sdp)
        assert status == 400 and "audio" in text
        await camera_only.close()

        sdp = (await publisher()).localDescription.sdp
        for headers, body, expected in (
            ({**AUTH, "Content-Type": "text/plain"}, sdp, 415),
            ({**AUTH}, sdp.encode(), 415),  # no content type at all
            ({"Content-Type": SDP}, sdp, 401),
            ({"Content-Type": SDP, "Authorization": "Bearer nope"}, sdp, 401),
            (POST_SDP, "v=0\r\nthis is not sdp", 400),
            (POST_SDP, "hello", 400),
            (POST_SDP, sdp.encode() + b"\xff\xfe", 400),  # invalid UTF-8
            (POST_SDP, b"v=0\r\n" + b"a=x\r\n" * 60_000, 413),
        ):
            async with http.post(f"{served.url}/whip", data=body, headers=headers) as resp:
                text = await resp.text()
                assert resp.status == expected, (resp.status, text[:200])
                assert text, "every refusal names its reason"
                if expected == 401:
                    assert resp.headers["WWW-Authenticate"] == "Bearer"
        for method in ("GET", "HEAD", "PUT", "DELETE", "PATCH"):  # the endpoint only takes POST (and OPTIONS)
            async with http.request(method, f"{served.url}/whip", headers=AUTH) as resp:
                assert resp.status == 405 and "POST" in resp.headers["Allow"], method
    assert not served.peers and all(s.closed for s in served.factory.sessions)


async def test_whip_trickle_ice_patch(served: Served) -> None:
    pc = await publisher()
    offer = pc.localDescription.sdp
    # the candidates go in a PATCH instead of the offer (a trickling publisher sends them as it gathers)
    lines = offer.splitlines()
    candidates = [line for line in lines if line.startswith("a=candidate:")]
    assert candidates
    stripped = (
        "\r\n".join(line for line in lines if not line.startswith(("a=candidate:", "a=end-of-candidates"))) + "\r\n"
    )
    ufrag = next(line for line in lines if line.startswith("a=ice-ufrag:"))
    pwd = next(line for line in lines if line.startswith("a=ice-pwd:"))
    mid = next(line for line in lines if line.startswith("a=mid:"))
    async with aiohttp.ClientSession() as http:
        status, headers, answer = await post(http, f"{served.url}/whip", stripped)
        assert status == 201
        resource = f"{served.url}{headers['Location']}"
        peer = served.peers[headers["Location"].rsplit("/", 1)[1]]

        def remote_hosts() -> list[str]:
            return [
                c.type
                for t in peer.pc.getTransceivers()[:1]
                for c in t.receiver.transport.transport.getRemoteCandidates()
            ]

        assert remote_hosts() == []
        fragment = "\r\n".join([ufrag, pwd, "m=audio 9 UDP/TLS/RTP/SAVPF 0", mid, *candidates[:1]]) + "\r\n"
        trickle = {**AUTH, "Content-Type": TRICKLE, "If-Match": headers["ETag"]}
        async with http.patch(resource, data=fragment, headers=trickle) as resp:
            assert resp.status == 204, await resp.text()
        assert remote_hosts() == ["host"], "the trickled candidate reached the ICE agent"
        rest = "\r\n".join([ufrag, pwd, "m=audio 9 UDP/TLS/RTP/SAVPF 0", mid, *candidates[1:], "a=end-of-candidates"])
        async with http.patch(resource, data=rest + "\r\n", headers={**AUTH, "Content-Type": TRICKLE}) as resp:
            assert resp.status == 204  # If-Match is optional for a trickle
        assert len(remote_hosts()) == len(candidates)

        refusals = (
            ({**trickle, "If-Match": "*"}, fragment, 422),  # an ICE restart: not supported, trickle is
            ({**trickle, "If-Match": '"stale"'}, fragment, 412),
            ({**trickle}, fragment.replace(ufrag, "a=ice-ufrag:other"), 422),  # new credentials = a restart
            ({**trickle, "Content-Type": "application/sdp"}, fragment, 415),
            ({**trickle}, "a=candidate:1 2", 400),
            ({**trickle}, b"a=candidate:\xff", 400),
            ({"Content-Type": TRICKLE}, fragment, 401),
        )
        for headers_, body, expected in refusals:
            async with http.patch(resource, data=body, headers=headers_) as resp:
                assert resp.status == expected, (expected, await resp.text())
        async with http.patch(f"{served.url}/whip/nobody", data=fragment, headers=trickle) as resp:
            assert resp.status == 404
        await apply_answer(pc, answer)
        await wait_for(lambda: pc.connectionState == "connected", 10.0)
        async with http.delete(resource, headers=AUTH) as resp:
            assert resp.status == 200
    await pc.close()


async def test_capacity_is_503_with_retry_after_and_bad_offers_stay_400(served: Served) -> None:
    pcs = [await publisher(video=False) for _ in range(3)]
    async with aiohttp.ClientSession() as http:
        for pc in pcs[:2]:
            assert (await post(http, f"{served.url}/whip", pc.localDescription.sdp))[0] == 201
        status, headers, _ = await post(http, f"{served.url}/whip", pcs[2].localDescription.sdp)
        assert status == 503 and headers["Retry-After"] == "5"
        # a refusal for the offer itself comes first: a full server still says what is wrong with it
        status, _, _ = await post(http, f"{served.url}/whip", "v=0\r\nbroken")
        assert status == 400
    for pc in pcs:
        await pc.close()


async def test_ice_servers_are_handed_out_in_link_headers() -> None:
    ice = (IceServer.parse("stun:stun.example.net:3478"), IceServer.parse('turn:u:p"w@turn.example.net?transport=tcp'))
    server, served = await serve(ServerConfig(token=TOKEN, ice_servers=ice))
    try:
        async with aiohttp.ClientSession() as http:
            pc = await publisher(video=False)
            status, headers, _ = await post(http, f"{served.url}/whip", pc.localDescription.sdp)
            assert status == 201
            given = links(headers)
            assert '<stun:stun.example.net:3478>; rel="ice-server"' in given
            assert (
                '<turn:turn.example.net?transport=tcp>; rel="ice-server"; username="u"; credential="p\\"w"; '
                'credential-type="password"'
            ) in given
            async with http.options(f"{served.url}/whip", headers=AUTH) as resp:
                assert resp.status == 204 and resp.headers["Accept-Post"] == SDP
                assert len(resp.headers.getall("Link")) == 2
            # a CORS preflight carries no token: it learns nothing about TURN credentials
            preflight = {"Origin": "http://player.example", "Access-Control-Request-Method": "POST"}
            async with http.options(f"{served.url}/whip", headers=preflight) as resp:
                assert resp.status == 204 and "Link" not in resp.headers
                assert resp.headers["Access-Control-Allow-Origin"] == "*"
                assert "Authorization" in resp.headers["Access-Control-Allow-Headers"]
                assert "Location" in resp.headers["Access-Control-Expose-Headers"]
            await pc.close()
    finally:
        await server.close()


def test_ice_server_urls_are_validated() -> None:
    assert IceServer.parse("turn:alice:s3cr:et@turn.example.com:3478?transport=udp") == IceServer(
        "turn:turn.example.com:3478?transport=udp", "alice", "s3cr:et"
    )
    for bad in (
        "stun.example.com",
        "http://x",
        "turn:turn.example.com",
        "stun:u:p@h",
        "turns:h?transport=udp",
        "stun:h:0",
    ):
        with pytest.raises(ConfigError):
            IceServer.parse(bad)


# --- WHEP ---------------------------------------------------------------------------------------------------


async def test_whep_player_gets_sendonly_avatar_of_a_new_session(served: Served) -> None:
    pc = await player()
    watch = watch_video(pc)
    async with aiohttp.ClientSession() as http:
        status, headers, answer = await post(http, f"{served.url}/whep", pc.localDescription.sdp)
        assert status == 201, answer
        assert headers["Content-Type"].startswith(SDP) and headers["ETag"]
        assert headers["Location"].startswith("/whep/resource/")
        assert directions(answer) == {"video": "sendonly", "audio": "sendonly"}
        await apply_answer(pc, answer)
        await wait_for(lambda: watch.frames >= 25, 15.0)
        # the session it opened takes PCM over the websocket, by the resource id
        resource_id = headers["Location"].rsplit("/", 1)[1]
        async with http.ws_connect(f"{served.url}/ws?session={resource_id}", headers=AUTH) as ws:
            await ws.send_bytes(np.zeros(1600, "<i2").tobytes())
            await ws.send_str('{"emotion": "happy"}')
            assert (await ws.receive_json(timeout=5))["type"] == "ack"
        assert served.factory.sessions[0].pushed_samples == 1600

        publisher_offer = await publisher()  # a publisher's offer is no player's
        status, _, text = await post(http, f"{served.url}/whep", publisher_offer.localDescription.sdp)
        assert status == 400 and "/whip" in text
        await publisher_offer.close()
        for method in ("GET", "POST", "PUT"):
            async with http.request(method, f"{served.url}{headers['Location']}", headers=AUTH) as resp:
                assert resp.status == 405
        async with http.delete(f"{served.url}{headers['Location']}", headers=AUTH) as resp:
            assert resp.status == 200
        async with http.delete(f"{served.url}{headers['Location']}", headers=AUTH) as resp:
            assert resp.status == 404
        assert served.factory.sessions[0].closed, "the player that opened the session took it along"
    await watch.stop()
    await pc.close()


async def test_whip_voice_reaches_whep_viewers_and_one_session_renders_once(served: Served) -> None:
    """A publisher's tone bursts drive one session; three WHEP viewers get every frame of it, each showing the
    bursts (the fake session turns red while the audio it echoes is loud), and the session renders each frame once."""
    voice = ArrayAudioTrack(burst_signal(40.0), 48_000)  # longer than the test: bursts all along
    pub = await publisher(voice, video=False)
    async with aiohttp.ClientSession() as http:
        status, headers, answer = await post(http, f"{served.url}/whip", pub.localDescription.sdp)
        assert status == 201
        await apply_answer(pub, answer)
        watch_url = next(link for link in links(headers) if 'rel="whep"' in link).split(">")[0][1:]
        viewers, watches, locations = [], [], []
        for _ in range(3):
            pc = await player()
            watches.append(watch_video(pc))
            status, vheaders, vanswer = await post(http, f"{served.url}{watch_url}", pc.localDescription.sdp)
            assert status == 201, vanswer
            assert directions(vanswer) == {"video": "sendonly", "audio": "sendonly"}
            await apply_answer(pc, vanswer)
            viewers.append(pc)
            locations.append(vheaders["Location"])
        extra = await player()  # max_viewers=3
        status, vheaders, _ = await post(http, f"{served.url}{watch_url}", extra.localDescription.sdp)
        assert status == 503 and vheaders["Retry-After"]
        await extra.close()
        async with http.post(
            f"{served.url}/whep/nosuchsession", data=extra.localDescription.sdp, headers=POST_SDP
        ) as r:
            assert r.status == 404

        await wait_for(lambda: all(w.frames > 0 for w in watches), 15.0)
        session = served.factory.sessions[0]
        t0, frames0, rendered0 = time.monotonic(), [w.frames for w in watches], session._frame
        await asyncio.sleep(6.0)
        elapsed = time.monotonic() - t0
        received = [w.frames - f for w, f in zip(watches, frames0, strict=True)]
        rendered = session._frame - rendered0
        print(f"\nrendered {rendered} frames in {elapsed:.1f} s; viewers received {received}")
        assert len(served.factory.sessions) == 1
        assert rendered <= 1.1 * elapsed * session.fps, "one render for all viewers"
        assert all(r >= 0.85 * rendered for r in received), "every viewer gets (nearly) every frame"
        for watch in watches:  # the publisher's bursts show in every viewer's picture
            red = np.asarray(watch.red[-int(5 * session.fps) :])
            assert (red > 128).mean() > 0.1 and (red < 128).mean() > 0.1, red
        assert session.pushed_samples > 16_000 * 5

        async with http.get(f"{served.url}/sessions") as resp:
            assert resp.status == 401
        async with http.get(f"{served.url}/sessions", headers=AUTH) as resp:
            listing = (await resp.json())["sessions"]
        sid = headers["Location"].rsplit("/", 1)[1]
        assert [(e["id"], e["opened_by"], e["viewers"], e["whep"]) for e in listing] == [(sid, "whip", 3, watch_url)]
        async with http.get(f"{served.url}/metrics", headers=AUTH) as resp:
            text = await resp.text()
        assert "avatar_viewers_active 3.0" in text and "avatar_sessions_active 1.0" in text
        assert f'avatar_session_viewers{{session="{session.id}"}} 3.0' in text
        # a viewer leaving leaves the session; the publisher leaving ends it for every viewer
        async with http.delete(f"{served.url}{locations[0]}", headers=AUTH) as resp:
            assert resp.status == 200
        assert not session.closed and len(served.peers) == 3
        async with http.delete(f"{served.url}{headers['Location']}", headers=AUTH) as resp:
            assert resp.status == 200
        await wait_for(lambda: not served.peers, 5.0)
        assert session.closed
    for watch in watches:
        await watch.stop()
    for pc in [pub, *viewers]:
        await pc.close()


async def test_the_page_session_can_be_watched_over_whep(served: Served) -> None:
    """``/offer`` answers with ``session``: WHEP viewers of that id see the page's avatar."""
    page = RTCPeerConnection(NO_STUN)
    page.addTransceiver("video", direction="recvonly")
    await page.setLocalDescription(await page.createOffer())
    async with aiohttp.ClientSession() as http:
        offer = {"sdp": page.localDescription.sdp, "type": "offer"}
        async with http.post(f"{served.url}/offer", json=offer, headers=AUTH) as resp:
            assert resp.status == 200
            body = await resp.json()
        await apply_answer(page, body["sdp"])
        viewer = await player(audio=False)
        watch = watch_video(viewer)
        status, _, answer = await post(http, f"{served.url}/whep/{body['session']}", viewer.localDescription.sdp)
        assert status == 201 and directions(answer) == {"video": "sendonly"}
        await apply_answer(viewer, answer)
        await wait_for(lambda: watch.frames >= 10, 15.0)
        assert len(served.factory.sessions) == 1
    await watch.stop()
    await viewer.close()
    await page.close()
