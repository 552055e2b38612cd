"""The front door over two in-process replicas (each a whole single server with a FakeFactory): placement by
headroom, 503 when full, later requests reach the owner, aggregated /health, /sessions and /metrics, a lost
replica. No Ray: the Ray application only supplies the replica list."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from engine.config import ConfigError
from streaming.cluster.drain import drain
from streaming.cluster.frontdoor import FrontDoor, FrontDoorConfig, ReplicaRef, create_front_door_app, static_directory
from streaming.cluster.metrics import merge_metrics
from streaming.transports.webrtc import ServerConfig

from ..transports.webrtc.serving import SDP, Served, apply_answer, player, serve, wait_for, watch_video

pytestmark = pytest.mark.timeout(60)
TOKEN = "sesame"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
POST_SDP = {**AUTH, "Content-Type": SDP}


@dataclass
class Cluster:
    url: str
    door: FrontDoor
    replicas: dict[str, Served]
    servers: dict[str, TestServer]

    def hosted(self) -> dict[str, int]:
        return {name: len(r.server.hosted) for name, r in self.replicas.items()}


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    servers: dict[str, TestServer] = {}
    replicas: dict[str, Served] = {}
    for name in ("a", "b"):
        servers[name], replicas[name] = await serve(ServerConfig(token=TOKEN, max_sessions=2))
    refs = [ReplicaRef(name, served.url) for name, served in replicas.items()]
    door = FrontDoor(static_directory(refs), FrontDoorConfig(token=TOKEN, poll_interval_s=0.2, retry_after_s=7))
    front = TestServer(create_front_door_app(door), host="127.0.0.1", port=0)
    await front.start_server()
    yield Cluster(str(front.make_url("")).rstrip("/"), door, replicas, servers)
    await front.close()
    for server in servers.values():
        await server.close()


async def open_whep(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, str], str, object]:
    pc = await player()
    async with http.post(f"{url}/whep", data=pc.localDescription.sdp, headers=POST_SDP) as resp:
        return resp.status, dict(resp.headers), await resp.text(), pc


async def test_sessions_spread_full_is_503_and_later_requests_reach_the_owner(cluster: Cluster) -> None:
    pcs = []
    watches = []
    async with aiohttp.ClientSession() as http:
        locations = []
        for _ in range(4):
            status, headers, answer, pc = await open_whep(http, cluster.url)
            assert status == 201, answer
            pcs.append(pc)
            locations.append(headers["Location"])
            # the answer is the replica's own SDP: its candidates, so media goes straight to that replica
            assert "a=candidate:" in answer
            watches.append(watch_video(pc))  # type: ignore[arg-type]
            await apply_answer(pc, answer)  # type: ignore[arg-type]
        assert cluster.hosted() == {"a": 2, "b": 2}

        status, headers, text, extra = await open_whep(http, cluster.url)
        assert status == 503 and headers["Retry-After"] == "7" and "4 session slots of 2 replica(s)" in text
        # without the token it is 401 first, as from one server
        sdp = extra.localDescription.sdp  # type: ignore[attr-defined]
        async with http.post(f"{cluster.url}/whep", data=sdp, headers={"Content-Type": SDP}) as resp:
            assert resp.status == 401 and resp.headers["WWW-Authenticate"] == "Bearer"
        await extra.close()  # type: ignore[attr-defined]

        # media flows between the player and its replica
        await wait_for(lambda: min(w.frames for w in watches) >= 3, 20)
        for watch in watches:
            await watch.stop()

        owners = {loc: cluster.door.owners[loc.rsplit("/", 1)[1]] for loc in locations}
        first = locations[0]
        owner = owners[first]
        other = "b" if owner == "a" else "a"
        sid = first.rsplit("/", 1)[1]

        # the websocket ingest reaches the owner (its control reply comes back through the relay)
        async with http.ws_connect(f"{cluster.url}/ws?session={sid}&token={TOKEN}") as ws:
            await ws.send_str(json.dumps({"emotion": "happy"}))
            reply = json.loads((await ws.receive(timeout=10)).data)
            assert reply["type"] == "ack", reply
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"{cluster.url}/ws?session={sid}", headers={"Authorization": "Bearer no"})
        assert refused.value.status == 401
        # (unknown ids are 404 before any relay)
        async with http.get(f"{cluster.url}/ws?session=nope", headers=AUTH) as resp:
            assert resp.status == 404 and "nope" in await resp.text()

        # a WHEP viewer of that session is placed on its owner, not by headroom
        viewer = await player()
        async with http.post(f"{cluster.url}/whep/{sid}", data=viewer.localDescription.sdp, headers=POST_SDP) as resp:
            assert resp.status == 201, await resp.text()
            viewer_id = resp.headers["Location"].rsplit("/", 1)[1]
        assert viewer_id in cluster.replicas[owner].peers and cluster.door.owners[viewer_id] == owner
        await viewer.close()

        # DELETE reaches the owner: its session ends there, the other replica keeps both of its own
        async with http.delete(f"{cluster.url}{first}", headers=AUTH) as resp:
            assert resp.status == 200, await resp.text()
        assert cluster.hosted() == {owner: 1, other: 2}
        async with http.delete(f"{cluster.url}{first}", headers=AUTH) as resp:
            assert resp.status == 404

        # the freed slot takes the next session
        await asyncio.sleep(0.5)  # a poll: the front door sees the freed slot
        status, headers, answer, pc = await open_whep(http, cluster.url)
        assert status == 201 and cluster.door.owners[headers["Location"].rsplit("/", 1)[1]] == owner
        pcs.append(pc)

        # aggregated views
        async with http.get(f"{cluster.url}/health") as resp:
            health = await resp.json()
        assert health["sessions"] == 4 and health["max_sessions"] == 4 and health["mode"] == "classic"
        assert sorted(r["name"] for r in health["replicas"]) == ["a", "b"]
        assert all(r["render_load"] >= 0 for r in health["replicas"]) and "render" not in health
        async with http.get(f"{cluster.url}/sessions") as resp:
            assert resp.status == 401
        async with http.get(f"{cluster.url}/sessions", headers=AUTH) as resp:
            listed = (await resp.json())["sessions"]
        assert sorted(s["replica"] for s in listed) == ["a", "a", "b", "b"]
        async with http.get(f"{cluster.url}/metrics", headers=AUTH) as resp:
            text = await resp.text()
        assert 'avatar_sessions_active{replica="a"} 2.0' in text and 'avatar_sessions_active{replica="b"} 2.0' in text
        assert "avatar_cluster_sessions_rejected_total 1.0" in text and "avatar_cluster_replicas 2.0" in text
        assert text.count("# TYPE avatar_sessions_active ") == 1
    for pc in pcs:
        await pc.close()  # type: ignore[attr-defined]


async def test_a_lost_replica_drops_its_ids_and_new_sessions_go_to_the_survivor(cluster: Cluster) -> None:
    async with aiohttp.ClientSession() as http:
        opened = []
        for _ in range(2):
            status, headers, _, pc = await open_whep(http, cluster.url)
            assert status == 201
            opened.append((headers["Location"], pc))
        assert cluster.hosted() == {"a": 1, "b": 1}
        await cluster.servers["b"].close()
        await wait_for(lambda: "b" not in cluster.door.replicas, 5)
        assert cluster.door.counters["replicas_lost_total"] == 1
        on_b = [loc for loc, _ in opened if loc.rsplit("/", 1)[1] not in cluster.replicas["a"].peers]
        async with http.delete(f"{cluster.url}{on_b[0]}", headers=AUTH) as resp:
            assert resp.status == 404
        for _ in range(1):
            status, headers, _, pc = await open_whep(http, cluster.url)
            assert status == 201 and cluster.door.owners[headers["Location"].rsplit("/", 1)[1]] == "a"
            opened.append((headers["Location"], pc))
        status, _, _, pc = await open_whep(http, cluster.url)
        assert status == 503
        opened.append(("", pc))
    for _, pc in opened:
        await pc.close()  # type: ignore[attr-defined]


async def test_ids_of_sessions_that_ended_elsewhere_are_forgotten(cluster: Cluster) -> None:
    cluster.door.config = FrontDoorConfig(token=TOKEN, poll_interval_s=0.2, prune_after_s=0.1)
    async with aiohttp.ClientSession() as http:
        status, headers, _, pc = await open_whep(http, cluster.url)
        assert status == 201
        sid = headers["Location"].rsplit("/", 1)[1]
        owner = cluster.door.owners[sid]
        viewer = await player()
        async with http.post(f"{cluster.url}/whep/{sid}", data=viewer.localDescription.sdp, headers=POST_SDP) as resp:
            viewer_id = resp.headers["Location"].rsplit("/", 1)[1]
        await asyncio.sleep(0.5)
        assert {sid, viewer_id} <= set(cluster.door.owners)  # live: kept across polls
        # the session ends on its replica without passing the front door (a page closing, a timeout)
        async with http.delete(f"{cluster.replicas[owner].url}{headers['Location']}", headers=AUTH) as resp:
            assert resp.status == 200
        await wait_for(lambda: sid not in cluster.door.owners and viewer_id not in cluster.door.owners, 5)
        await viewer.close()
        await pc.close()  # type: ignore[attr-defined]


def test_merge_metrics_labels_every_sample_by_replica_once_per_family() -> None:
    a = "# TYPE avatar_x gauge\navatar_x 1.0\n# TYPE avatar_h histogram\n"
    a += 'avatar_h_bucket{le="0.1"} 2.0\navatar_h_count 2.0\n'
    b = '# TYPE avatar_x gauge\navatar_x 3.0\n# TYPE avatar_y counter\navatar_y_total{session="s"} 4.0\n'
    text = merge_metrics({"a": a, "b": b}, {"replicas": 2})
    lines = text.splitlines()
    assert lines.count("# TYPE avatar_x gauge") == 1
    assert 'avatar_x{replica="a"} 1.0' in lines and 'avatar_x{replica="b"} 3.0' in lines
    assert 'avatar_h_bucket{replica="a",le="0.1"} 2.0' in lines
    assert 'avatar_y_total{replica="b",session="s"} 4.0' in lines
    assert "# TYPE avatar_cluster_replicas gauge" in lines and "avatar_cluster_replicas 2.0" in lines
    # a family's samples follow its TYPE line (what Prometheus requires)
    assert lines.index('avatar_x{replica="b"} 3.0') == lines.index("# TYPE avatar_x gauge") + 2


def test_front_door_config_names_bad_values() -> None:
    with pytest.raises(ConfigError, match="unknown placement policy"):
        FrontDoorConfig(placement="nearest")
    with pytest.raises(ConfigError, match="poll_interval_s"):
        FrontDoorConfig(poll_interval_s=0)


async def test_a_draining_replica_refuses_new_sessions_and_keeps_its_own_until_they_end() -> None:
    server, replica = await serve(ServerConfig(token=TOKEN, max_sessions=2))
    try:
        async with aiohttp.ClientSession() as http:
            status, headers, answer, pc = await open_whep(http, replica.url)
            assert status == 201
            watch = watch_video(pc)  # type: ignore[arg-type]
            await apply_answer(pc, answer)  # type: ignore[arg-type]
            await wait_for(lambda: watch.frames >= 2, 20)
            task = asyncio.create_task(drain(replica.server, timeout_s=20))
            await asyncio.sleep(0.3)
            status, refused, _, other = await open_whep(http, replica.url)
            assert status == 503 and "Retry-After" in refused  # a free slot, but draining: no new session
            await other.close()  # type: ignore[attr-defined]
            before = watch.frames
            await asyncio.sleep(1.0)
            assert watch.frames - before >= 10 and not task.done()  # its own session still streams meanwhile
            async with http.delete(f"{replica.url}{headers['Location']}", headers=AUTH) as resp:
                assert resp.status == 200
            assert await asyncio.wait_for(task, 5) == 0  # the drain ends when its last session does
            await watch.stop()
            await pc.close()  # type: ignore[attr-defined]

            # a session that outlives the timeout is reported, for the caller to close
            server2, replica2 = await serve(ServerConfig(token=TOKEN, max_sessions=2))
            status, _, answer, pc2 = await open_whep(http, replica2.url)
            await apply_answer(pc2, answer)  # type: ignore[arg-type]
            started = time.monotonic()
            assert await drain(replica2.server, timeout_s=0.5) == 1
            assert 0.4 < time.monotonic() - started < 3
            await pc2.close()  # type: ignore[attr-defined]
            await server2.close()
    finally:
        await server.close()
