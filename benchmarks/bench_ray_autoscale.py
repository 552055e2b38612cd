"""Autoscaling on live sessions, end to end on a local Ray: how long from N live sessions to the replicas they ask
for, and from sessions leaving to a replica drained away, with the sessions that stay still streaming.

    python benchmarks/bench_ray_autoscale.py --sessions 2 --max-replicas 2

Starts Ray in this process (``--cpus`` logical CPUs, one per replica), deploys the application with
``min_replicas=1``, ``max_replicas``, ``sessions_per_replica=1`` and short Serve delays, opens ``--sessions``
``engine client`` peers through the front door, waits for the replica count to follow, then closes all but one and
waits for the count to come back down. Records the times (they include a replica's start: Ray worker, engine,
avatar), each step's replica list, and the frames the remaining session received meanwhile; JSON to
``benchmarks/results/ray_autoscale_cpu.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from streaming.cluster.ray_app import ClusterSpec, build_app, run, shutdown
from streaming.measure.info import environment, load_average, write_result
from streaming.pipelines import RuntimeConfig
from streaming.transports.webrtc import ServerConfig
from streaming.transports.webrtc.client import ArrayAudioTrack, AvatarClient

RESULTS = Path(__file__).parent / "results"


async def replicas(http: aiohttp.ClientSession, url: str) -> list[dict[str, Any]]:
    with contextlib.suppress(aiohttp.ClientError, ValueError):
        async with http.get(f"{url}/health") as resp:
            return list((await resp.json()).get("replicas", []))
    return []


async def wait_count(http: aiohttp.ClientSession, url: str, count: int, timeout_s: float) -> tuple[float, list]:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        now = await replicas(http, url)
        if len(now) == count and not any(r["draining"] for r in now):
            return time.monotonic() - start, now
        await asyncio.sleep(0.5)
    raise RuntimeError(f"the replica count did not reach {count} within {timeout_s} s: {await replicas(http, url)}")


async def scenario(args: argparse.Namespace, url: str) -> dict[str, Any]:
    tone = (0.2 * np.sin(2 * np.pi * 220 * np.arange(48_000 * 600) / 48_000)).astype(np.float32)
    clients: list[AvatarClient] = []
    out: dict[str, Any] = {}
    async with aiohttp.ClientSession() as http:
        out["start"] = await replicas(http, url)
        try:
            for _ in range(args.sessions):
                client = AvatarClient(url, ArrayAudioTrack(tone, 48_000))
                await client.connect()
                clients.append(client)
            out["scale_up_s"], out["after_scale_up"] = await wait_count(http, url, args.max_replicas, 300)
            keep = clients[0]
            for client in clients[1:]:
                await client.close()
            frames = keep.report.video_frames
            out["scale_down_s"], out["after_scale_down"] = await wait_count(http, url, 1, 300)
            during = (keep.report.video_frames - frames) / out["scale_down_s"]
            out["kept_session_fps_during_scale_down"] = round(during, 1)
            frames = keep.report.video_frames
            await asyncio.sleep(2.0)
            out["kept_session_frames_2s_after"] = keep.report.video_frames - frames
            out["kept_session_state"] = keep.pc.connectionState
        finally:
            for client in clients:
                await client.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=2)
    parser.add_argument("--max-replicas", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--port", type=int, default=8111)
    parser.add_argument("--out", type=Path, default=RESULTS / "ray_autoscale_cpu.json")
    args = parser.parse_args()
    import ray  # optional dependency

    spec = ClusterSpec(
        min_replicas=1,
        max_replicas=args.max_replicas,
        sessions_per_replica=1,
        num_cpus=1,
        front_host="127.0.0.1",
        front_port=args.port,
        upscale_delay_s=2,
        downscale_delay_s=5,
        look_back_period_s=4,
        drain_timeout_s=10,
    )
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, object_store_memory=80 << 20)
    load = load_average()
    try:
        run(build_app(RuntimeConfig(mode="classic"), None, ServerConfig(max_sessions=args.sessions), spec))
        result = asyncio.run(scenario(args, f"http://127.0.0.1:{args.port}"))
    finally:
        with contextlib.suppress(Exception):
            shutdown()
        ray.shutdown()
    record = {"benchmark": "ray_autoscale", "config": vars(args) | {"out": str(args.out)}, "load_before": load}
    write_result(args.out, record | {"result": result, "environment": environment("cpu")})
    print(
        f"scale up to {args.max_replicas} replicas {result['scale_up_s']:.1f} s after {args.sessions} sessions; "
        f"back to 1 {result['scale_down_s']:.1f} s after they left; the kept session got "
        f"{result['kept_session_fps_during_scale_down']} fps meanwhile, {result['kept_session_frames_2s_after']} "
        f"frames in the 2 s after ({result['kept_session_state']})"
    )


if __name__ == "__main__":
    main()
