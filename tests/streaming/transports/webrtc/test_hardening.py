"""The server under hostile or careless clients: malformed input on every interface gets a 4xx or an error reply
and leaves the session working, capacity admits exactly what it has, no STUN server unless configured, and client
disconnects stay out of the error log."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable

import aiohttp
import pytest
from aioice import stun
from aiortc import RTCPeerConnection

from streaming.api import LiveSession
from streaming.testing import FakeFactory
from streaming.transports.webrtc import ServerConfig
from streaming.transports.webrtc.client import AvatarClient
from streaming.transports.webrtc.config import IceServer
from streaming.transports.webrtc.peer import rtc_configuration

from .serving import NO_STUN, SDP, Served, player, publisher, serve, wait_for

pytestmark = pytest.mark.timeout(120)
TOKEN = "sesame"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DEEP = "[" * 100_000 + "]" * 100_000  # CPython's json recursion limit is ~1000 levels
DEEP_CONTROL = "[" * 5_000 + "]" * 5_000  # within a control message's 16 KiB


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    server, info = await serve(ServerConfig(token=TOKEN, max_sessions=1, ws_max_message=64 * 1024))
    yield info
    await server.close()


async def post_status(url: str, path: str, body: str | bytes, content_type: str) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{url}{path}", data=body, headers={"Content-Type": content_type}) as resp,
    ):
        return resp.status


async def reply_on(client: AvatarClient, message: str | bytes) -> dict:
    """Send a raw data-channel message and wait for the server's answer to it."""
    client.channel.send(message)
    while True:
        reply = await asyncio.wait_for(client._replies.get(), 5.0)
        if reply.get("type") in ("ack", "error"):
            return reply


async def test_malformed_input_on_every_interface_is_refused_and_the_session_goes_on(served: Served) -> None:
    page = RTCPeerConnection(NO_STUN)
    page.addTransceiver("video", direction="recvonly")
    await page.setLocalDescription(await page.createOffer())
    sdp = page.localDescription.sdp
    async with aiohttp.ClientSession(headers=AUTH) as http:
        # HTTP: /offer (JSON) and /whip (SDP): each failure a 4xx that names the problem
        for body, status, words in (
            (DEEP, 400, "levels deep"),
            ('{"sdp": ' + DEEP[:4000] + ', "type": "offer"}', 400, "levels deep"),
            (b'{"sdp": "\xff\xfe", "type": "offer"}', 400, "UTF-8"),
            (b"x" * 300_000, 413, ""),
            ("[1, 2]", 400, "JSON object"),
            (json.dumps({"sdp": sdp, "type": "offer", "debug": True}), 400, "'debug'"),
            (json.dumps({"sdp": 3, "type": "offer"}), 400, "'sdp' must be a string"),
            (json.dumps({"sdp": sdp, "type": "answer"}), 400, '"offer"'),
            ('{"sdp": "x", "sdp": "y", "type": "offer"}', 400, "twice"),
            ('{"sdp": NaN, "type": "offer"}', 400, "NaN"),
        ):
            async with http.post(f"{served.url}/offer", data=body) as resp:
                text = await resp.text()
                assert resp.status == status and words in text, (resp.status, text[:300])
        for body, status in ((sdp.encode() + b"\xc3\x28", 400), (b"v=0\r\n" + b"x" * 300_000, 413)):
            async with http.post(f"{served.url}/whip", data=body, headers={"Content-Type": SDP}) as resp:
                assert resp.status == status, await resp.text()
        assert not served.peers and all(s.closed for s in served.factory.sessions)

    # the data channel and the websocket of one live session
    client = AvatarClient(served.url, None, token=TOKEN)
    await client.connect()
    await wait_for(lambda: client.report.video_frames > 0, 10.0)
    for bad, words in (
        (DEEP_CONTROL, "levels deep"),
        (b"\xff\xfe{}", "UTF-8"),
        ("x" * 20_000, "too large"),
        ('{"emotion": "happy", "emotion": "sad"}', "twice"),
        ("[]", "JSON object"),
    ):
        reply = await reply_on(client, bad)
        assert reply["type"] == "error" and words in reply["message"], reply
        ack = await client.control(emotion="sad", id="after")
        assert ack["type"] == "ack" and ack["id"] == "after", "the channel still answers a valid control"

    async with aiohttp.ClientSession(headers=AUTH) as http:
        ws_url = f"{served.url}/ws?session={client.session_id}"
        async with http.ws_connect(ws_url) as ws:
            for bad, words in ((DEEP_CONTROL, "levels deep"), ("y" * 20_000, "too large"), ("{", "JSON")):
                await ws.send_str(bad)
                reply = await ws.receive_json(timeout=5)
                assert reply["type"] == "error" and words in reply["message"], reply
                await ws.send_str('{"emotion": "happy", "id": 7}')
                ack = await ws.receive_json(timeout=5)
                assert ack["type"] == "ack" and ack["id"] == 7 and ack["state"]["emotion"] == "happy", ack
            await ws.send_bytes(b"\x00" * (64 * 1024 + 2))  # beyond ws_max_message: the socket closes (1009)
            msg = await ws.receive(timeout=5)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
            assert ws.close_code == 1009
        async with http.ws_connect(ws_url) as ws:  # the session itself goes on: a new socket is answered
            await ws.send_str('{"emotion": "happy", "id": 8}')
            reply = await ws.receive_json(timeout=5)
            assert reply["type"] == "ack" and reply["id"] == 8 and reply["state"]["emotion"] == "happy"
    frames = client.report.video_frames
    await asyncio.sleep(0.5)
    assert client.report.video_frames > frames and len(served.peers) == 1, "the session kept streaming"
    await client.close()


class SlowFactory(FakeFactory):
    """Opening a session takes a while (as building a real one does): admission races show."""

    async def open_session(self) -> LiveSession:
        await asyncio.sleep(0.3)
        return await super().open_session()


async def test_a_burst_of_valid_offers_gets_exactly_the_capacity() -> None:
    server, served = await serve(ServerConfig(max_sessions=2), SlowFactory())
    try:
        pcs = [await player() for _ in range(3)] + [await publisher(video=False) for _ in range(3)]

        def offer(k: int, pc: RTCPeerConnection) -> Awaitable[int]:
            if k < 3:
                body = json.dumps({"sdp": pc.localDescription.sdp, "type": "offer"})
                return post_status(served.url, "/offer", body, "application/json")
            return post_status(served.url, "/whip", pc.localDescription.sdp, SDP)

        statuses = await asyncio.gather(*(offer(k, pc) for k, pc in enumerate(pcs)))
        print(f"\n6 concurrent valid offers, capacity 2: {statuses}")
        assert sum(s in (200, 201) for s in statuses) == 2 and statuses.count(503) == 4, statuses
        assert served.server.active == 2 and len(served.server.hosted) == 2
        for pc in pcs:
            await pc.close()
        # nobody ever connected: the connect timeout frees the two slots
        await asyncio.gather(*(p.close("test") for p in list(served.peers.values())))
        assert served.server.active == 0
        pc = await publisher(video=False)
        status = await post_status(served.url, "/whip", pc.localDescription.sdp, SDP)
        assert status == 201
        await pc.close()
    finally:
        await server.close()


async def test_garbage_offers_are_400_never_503_and_do_not_block_a_valid_one() -> None:
    server, served = await serve(ServerConfig(max_sessions=1), SlowFactory())
    try:
        good = await player()
        sdp = good.localDescription.sdp
        no_ice = "\r\n".join(line for line in sdp.splitlines() if not line.startswith("a=ice-ufrag")) + "\r\n"
        garbage: list[tuple[str, str | bytes, str]] = [
            ("/offer", "{oops", "application/json"),
            ("/offer", DEEP, "application/json"),
            ("/offer", json.dumps({"sdp": "v=0\r\nm=video", "type": "offer"}), "application/json"),
            ("/offer", json.dumps({"sdp": sdp.replace("m=video", "m=audio"), "type": "offer"}), "application/json"),
            ("/offer", json.dumps({"sdp": no_ice, "type": "offer"}), "application/json"),
            ("/whip", b"v=0\r\n\xff", SDP),
            ("/whip", sdp, SDP),  # a player's offer is no publisher's
            ("/whep", "v=0\r\nm=audio 9 x", SDP),
            ("/whep", no_ice, SDP),
            ("/whip", "hello", "text/plain"),
        ] * 3

        async def valid() -> int:
            await asyncio.sleep(0.01)  # in the middle of the garbage
            return await post_status(
                served.url, "/offer", json.dumps({"sdp": sdp, "type": "offer"}), "application/json"
            )

        *statuses, ok = await asyncio.gather(*(post_status(served.url, *g) for g in garbage), valid())
        print(f"\n30 garbage offers: {sorted(set(statuses))}; the valid one: {ok}")
        assert ok == 200
        assert 503 not in statuses and all(400 <= s < 500 for s in statuses), statuses
        assert statuses.count(415) == 3
        await good.close()
    finally:
        await server.close()


class FakeStun(asyncio.DatagramProtocol):
    """A STUN server on loopback that tells every asker it is 203.0.113.7:40000 (a documentation address)."""

    MAPPED = ("203.0.113.7", 40000)

    def __init__(self) -> None:
        self.requests = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        request = stun.parse_message(data)
        self.requests += 1
        response = stun.Message(
            message_method=stun.Method.BINDING,
            message_class=stun.Class.RESPONSE,
            transaction_id=request.transaction_id,
        )
        response.attributes["XOR-MAPPED-ADDRESS"] = self.MAPPED
        assert self.transport is not None
        self.transport.sendto(bytes(response), addr)


async def test_no_stun_server_is_contacted_unless_one_is_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    looked_up: list[str] = []
    loop = asyncio.get_running_loop()
    transport, fake = await loop.create_datagram_endpoint(FakeStun, local_addr=("0.0.0.0", 0))
    port = transport.get_extra_info("sockname")[1]

    def gethostbyname(name: str) -> str:  # aioice resolves the STUN server this way; nothing leaves the machine
        looked_up.append(name)
        if name == "stun.test":
            return "127.0.0.1"
        raise socket.gaierror(f"{name}: no network in this test")

    monkeypatch.setattr(socket, "gethostbyname", gethostbyname)

    async def answer_of(config: ServerConfig) -> str:
        server, served = await serve(config)
        try:
            pc = await player()
            async with aiohttp.ClientSession() as http:
                body = {"sdp": pc.localDescription.sdp, "type": "offer"}
                async with http.post(f"{served.url}/offer", json=body) as resp:
                    assert resp.status == 200
                    answer: str = (await resp.json())["sdp"]
            await pc.close()
            return answer
        finally:
            await server.close()

    # the control: aiortc's own default configuration asks Google's STUN server for every peer connection
    assert rtc_configuration(ServerConfig()).iceServers == []
    probe = RTCPeerConnection()
    probe.addTransceiver("video")
    await probe.setLocalDescription(await probe.createOffer())
    await probe.close()
    assert looked_up == ["stun.l.google.com"]
    looked_up.clear()

    answer = await answer_of(ServerConfig())
    assert looked_up == [] and fake.requests == 0
    assert "typ srflx" not in answer and "typ host" in answer

    answer = await answer_of(ServerConfig(ice_servers=(IceServer(f"stun:stun.test:{port}"),)))
    assert looked_up == ["stun.test"] and fake.requests >= 1
    assert "203.0.113.7 40000 typ srflx" in answer, "the configured STUN server's answer is a candidate"
    transport.close()


async def test_client_disconnects_stay_out_of_the_error_log(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    client = AvatarClient(served.url, None, token=TOKEN)
    await client.connect()
    for _ in range(3):  # hang up while the server is answering a stream of bad audio messages
        async with aiohttp.ClientSession(headers=AUTH) as http:
            ws = await http.ws_connect(f"{served.url}/ws?session={client.session_id}")
            for _ in range(300):
                await ws.send_bytes(b"\x01\x02\x03")
            assert ws._response is not None and ws._response.connection is not None
            ws._response.connection.transport.abort()  # type: ignore[union-attr]
        await asyncio.sleep(0.3)
    for path in ("/offer", "/whip"):  # and mid-upload
        _, writer = await asyncio.open_connection("127.0.0.1", int(served.url.rsplit(":", 1)[1]))
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: {SDP}\r\n"
        writer.write(f"{head}Content-Length: 100000\r\n\r\n".encode() + b"v=0\r\n" * 100)
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.transport.abort()
    await asyncio.sleep(0.5)
    await client.close()
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING and not r.name.startswith(("aioice", "aiortc"))]
    assert not errors, [f"{r.name}: {r.getMessage()}" for r in errors]
    assert any("closed by the client" in r.getMessage() for r in caplog.records)


async def test_a_handler_bug_is_a_500_logged_once_by_the_server(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(FakeFactory):
        def describe(self):  # type: ignore[no-untyped-def]
            raise KeyError("engine bug")

    caplog.set_level(logging.ERROR)
    server, served = await serve(ServerConfig(), Broken())
    try:
        async with aiohttp.ClientSession() as http, http.get(f"{served.url}/health") as resp:
            assert resp.status == 500 and "internal server error" in await resp.text()
    finally:
        await server.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.name for r in errors] == ["streaming.transports.webrtc.app"], [r.getMessage() for r in errors]
