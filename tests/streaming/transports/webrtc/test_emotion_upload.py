"""``POST /emotions`` on a server built the way ``engine serve`` builds it (classic mode): an uploaded example is
stored and listed, and every malformed upload is refused with a 4xx naming the problem; ``/health``'s schema starts
where a session starts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from engine.motion.classic import ClassicMotionConfig
from streaming.factory import open_engine_factory
from streaming.pipelines import RuntimeConfig
from streaming.session import SessionConfig
from streaming.transports.webrtc import ServerConfig, create_app
from streaming.transports.webrtc.emotions import MAX_NAME_BYTES
from tests.engine.motion.example_media import photo

TOKEN = {"Authorization": "Bearer sesame"}


@pytest.fixture
async def url() -> AsyncIterator[str]:
    factory = await open_engine_factory(RuntimeConfig(mode="classic", session=SessionConfig(realtime=False)))
    server = TestServer(create_app(factory, ServerConfig(token="sesame")), host="127.0.0.1", port=0)
    await server.start_server()
    yield str(server.make_url("")).rstrip("/")
    await server.close()


def _form(name: str, files: dict[str, tuple[str, bytes]]) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("name", name)
    for field, (filename, data) in files.items():
        form.add_field(field, data, filename=filename, content_type="application/octet-stream")
    return form


async def test_upload_stores_a_listed_emotion_and_refuses_bad_uploads(url: str, tmp_path: Path) -> None:
    happy = photo(tmp_path, "happy").read_bytes()
    neutral = photo(tmp_path, "neutral").read_bytes()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/emotions") as resp:
            assert resp.status == 200 and (await resp.json())["stored_emotions"] == []
        bad = [  # (form or body, status, words of the message)
            (_form("happy", {"example": ("a.png", happy)}), 401, None),  # no token
            (b'{"name": "happy"}', 415, "multipart/form-data"),
            (_form("gleeful", {"example": ("a.png", happy)}), 400, "unknown emotion 'gleeful'"),
            (_form("h" * (MAX_NAME_BYTES + 1), {"example": ("a.png", happy)}), 413, "name is too large"),
            (_form("happy", {"neutral": ("n.png", neutral)}), 400, "example: no file uploaded"),
            (_form("happy", {"example": ("a.exe", happy)}), 415, "not a photo or clip"),
            (_form("happy", {"example": ("a.png", b"")}), 400, "the file is empty"),
            (_form("happy", {"example": ("a.png", b"not a png")}), 400, "example (a.png): not a supported image"),
        ]
        for i, (body, status, words) in enumerate(bad):
            headers = {} if status == 401 else TOKEN
            async with http.post(f"{url}/emotions", data=body, headers=headers) as resp:
                assert resp.status == status, (i, await resp.text())
                if words is not None:
                    reply = await resp.json()
                    assert reply["type"] == "error" and words in reply["message"], (i, reply)
        form = _form("happy", {"example": ("happy.png", happy), "neutral": ("neutral.png", neutral)})
        async with http.post(f"{url}/emotions", data=form, headers=TOKEN) as resp:
            reply = await resp.json()
            assert resp.status == 200 and reply["type"] == "ok" and "mesh" in reply["spaces"], reply
        async with http.get(f"{url}/emotions") as resp:
            assert (await resp.json())["stored_emotions"] == ["happy"]
        async with http.get(f"{url}/health") as resp:
            health = await resp.json()
        assert "happy" in health["stored_emotions"]
        # the page's widgets start where a session starts: classic motion's own smoothing and blink rate
        schema = health["control_schema"]
        assert schema["smoothing"]["default"] == "none" and schema["blink_rate"]["default"] == pytest.approx(
            1 / ClassicMotionConfig().blink_every_s
        ), schema
