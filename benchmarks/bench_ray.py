"""The cost of the front door: N sessions on one single server vs the same N through ``engine serve --ray`` with K
replicas; placement, delivered fps and the time to first frame (the extra hop is on the signalling path only).

    python benchmarks/bench_ray.py --replicas 2 --sessions 2 --seconds 10 --mode classic

Each side runs as a child process (``engine serve --webrtc`` / ``engine serve --ray``, a local Ray cluster that
the child starts and removes); N clients (``AvatarClient``, the ``engine client`` peer) connect over ``/offer``
one after another and send an espeak-ng sentence as their microphone. Per session: ``offer_ms`` (POST /offer
round trip: through the front door it includes the forward to the replica), ``first_frame_ms`` (from sending
the offer to the first decoded frame), ``fps`` (frames decoded per second over the run) and, for Ray, the
replica that took it. JSON goes to ``benchmarks/results/ray_cpu.json`` with the machine's load: on a shared
machine it is part of the result.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from streaming.measure.info import environment, load_average, write_result
from streaming.transports.webrtc.client import ArrayAudioTrack, AvatarClient, read_audio_file

RESULTS = Path(__file__).parent / "results"
ENGINE = [sys.executable, "-c", "import sys; from streaming.cli import main; sys.exit(main(prog_name='engine'))"]
SPEECH = "The front door places each session on the replica with the most room, and the media goes straight there."


def speech(workdir: Path, seconds: float) -> tuple[np.ndarray, int]:
    path = workdir / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), SPEECH], check=True, capture_output=True)
    pcm, rate = read_audio_file(path)
    reps = int(np.ceil(seconds * rate / len(pcm)))
    return np.tile(pcm, (reps,) + (1,) * (pcm.ndim - 1))[: int(seconds * rate)], rate


async def wait_ready(url: str, replicas: int, proc: subprocess.Popen[bytes], timeout_s: float = 300.0) -> float:
    start = time.monotonic()
    async with aiohttp.ClientSession() as http:
        while time.monotonic() - start < timeout_s:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}")
            with contextlib.suppress(aiohttp.ClientError, ValueError):
                async with http.get(f"{url}/health") as resp:
                    health = await resp.json()
                    if resp.status == 200 and len(health.get("replicas", [None])) >= replicas:
                        return time.monotonic() - start
            await asyncio.sleep(0.5)
    raise RuntimeError(f"the server was not ready within {timeout_s} s")


async def run_sessions(url: str, sessions: int, seconds: float, audio: tuple[np.ndarray, int]) -> list[dict[str, Any]]:
    clients: list[AvatarClient] = []
    rows: list[dict[str, Any]] = []
    try:
        for _ in range(sessions):
            client = AvatarClient(url, ArrayAudioTrack(*audio))
            t0 = time.monotonic()
            await client.connect()
            offer_ms = (time.monotonic() - t0) * 1000.0
            clients.append(client)
            await asyncio.wait_for(client.first_video.wait(), 60)
            first_ms = offer_ms + (client.report.first_video_s or 0.0) * 1000.0  # first_video_s: from the answer
            rows.append({"session": client.session_id, "offer_ms": round(offer_ms, 1), "first_frame_ms": first_ms})
        start = [c.report.video_frames for c in clients]
        await asyncio.sleep(seconds)
        for row, client, first in zip(rows, clients, start, strict=True):
            row["fps"] = round((client.report.video_frames - first) / seconds, 2)
            row["first_frame_ms"] = round(row["first_frame_ms"], 1)
        async with aiohttp.ClientSession() as http, http.get(f"{url}/sessions") as resp:
            listed = {s["id"]: s.get("replica") for s in (await resp.json())["sessions"]} if resp.status == 200 else {}
        for row in rows:
            row["replica"] = listed.get(row["session"])
    finally:
        for client in clients:
            await client.close()
    return rows


async def side(name: str, args: argparse.Namespace, port: int, audio: tuple[np.ndarray, int]) -> dict[str, Any]:
    extra = ["--ray", "--replicas", str(args.replicas)] if name == "ray" else ["--webrtc"]
    per_server = args.sessions if name == "single" else args.max_sessions
    cmd = [*ENGINE, "serve", *extra, "--mode", args.mode, "--port", str(port), "--max-sessions", str(per_server)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        ready_s = await wait_ready(url, args.replicas if name == "ray" else 0, proc)
        load_before = load_average()
        rows = await run_sessions(url, args.sessions, args.seconds, audio)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return {
        "ready_s": round(ready_s, 1),
        "load_before": load_before,
        "sessions": rows,
        "mean_fps": round(float(np.mean([r["fps"] for r in rows])), 2),
        "mean_offer_ms": round(float(np.mean([r["offer_ms"] for r in rows])), 1),
        "mean_first_frame_ms": round(float(np.mean([r["first_frame_ms"] for r in rows])), 1),
        "exit_code": proc.returncode,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--sessions", type=int, default=2)
    parser.add_argument("--max-sessions", type=int, default=2, help="per replica")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--mode", default="classic")
    parser.add_argument("--port", type=int, default=8097)
    parser.add_argument("--out", type=Path, default=RESULTS / "ray_cpu.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        audio = speech(Path(tmp), args.seconds + 30.0)
        single = await side("single", args, args.port, audio)
        ray = await side("ray", args, args.port + 1, audio)
    record = {
        "benchmark": "ray",
        "config": vars(args) | {"out": str(args.out)},
        "single": single,
        "ray": ray,
        "hop_cost_ms": {
            "offer": round(ray["mean_offer_ms"] - single["mean_offer_ms"], 1),
            "first_frame": round(ray["mean_first_frame_ms"] - single["mean_first_frame_ms"], 1),
        },
        "environment": environment("cpu"),
    }
    write_result(args.out, record)
    print(f"single: {single['mean_fps']} fps, offer {single['mean_offer_ms']} ms, first frame "
          f"{single['mean_first_frame_ms']} ms")  # fmt: skip
    print(f"ray ({args.replicas} replicas): {ray['mean_fps']} fps, offer {ray['mean_offer_ms']} ms, first frame "
          f"{ray['mean_first_frame_ms']} ms, placement {[r['replica'] for r in ray['sessions']]}")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    asyncio.run(main())
