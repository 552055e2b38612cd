"""Soak: N sessions at the server's capacity for M minutes, each talking a looped espeak-ng speech WAV; does the
server keep its rate, its memory and its latency, and does a new session still stream at full rate afterwards?

    python benchmarks/bench_soak.py --sessions 2 --minutes 10 --mode classic

``engine serve --webrtc --max-sessions N`` runs in a child process (its memory is the server's alone); N clients
(``streaming.transports.webrtc.client.AvatarClient``, the ``engine client`` peer) connect over ``/offer`` and send
the speech as their microphone. Every 10 s window records the frames each client decoded (fps), the server's RSS,
the latency it reports (``/metrics``: each session's p50 and the latency histogram) and its counters. After the
soak the clients leave and one new session streams for ``--after-s`` seconds.

Verdicts (``results.checks``): frames delivered >= 98 % of N x fps x duration, no 10-s window under 20 fps, RSS
growth < 5 % from the end of the first minute (warm-up: buffers and caches fill) to the end, and the new session
at >= 23 fps. Frames delivered count what the clients decoded, repeats included; ``fresh_fps_per_session`` says
how many of them were new pictures (the renderer's own rate). The 1-minute load average is sampled all along: on a
shared machine it is part of the result. JSON goes to ``benchmarks/results/soak_cpu.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from streaming.measure.info import environment, load_average, write_result
from streaming.transports.webrtc.client import ArrayAudioTrack, AvatarClient

RESULTS = Path(__file__).parent / "results"
WINDOW_S = 10.0
ENGINE = [sys.executable, "-c", "import sys; from streaming.cli import main; sys.exit(main(prog_name='engine'))"]
SPEECH = (
    "The quick brown fox jumps over the lazy dog. A talking head follows the voice it hears, frame by frame. "
    "Now a short pause, and then the sentence starts again, a little slower this time."
)
_BACKGROUND: set[asyncio.Future[None]] = set()
_SAMPLE = re.compile(r"^(avatar_[a-z0-9_]+)(\{[^}]*\})? (\S+)$")


def speech_wav(seconds: float, workdir: Path) -> tuple[np.ndarray, int]:
    """espeak-ng speech with 1 s pauses, looped to ``seconds`` (float32 mono, its rate)."""
    path = workdir / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), SPEECH], check=True, capture_output=True)
    with wave.open(str(path)) as wav:
        rate = wav.getframerate()
        voice = np.frombuffer(wav.readframes(wav.getnframes()), "<i2").astype(np.float32) / 32768.0
    unit = np.concatenate([voice, np.zeros(rate, np.float32)])
    reps = int(np.ceil(seconds * rate / unit.size))
    return np.tile(unit, reps)[: int(seconds * rate)], rate


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def parse_metrics(text: str) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Prometheus text -> (unlabelled samples, samples by metric name and label set)."""
    totals: dict[str, float] = {}
    labelled: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, labels, value = match.groups()
        if labels:
            labelled.setdefault(name, {})[labels] = float(value)
        else:
            totals[name] = float(value)
    return totals, labelled


def histogram_quantile(buckets: dict[str, float], q: float) -> float | None:
    """Upper bound (ms) of the bucket where the ``q`` quantile of a summed latency histogram falls."""
    bounds: dict[float, float] = {}
    for labels, count in buckets.items():
        le = re.search(r'le="([^"]+)"', labels)
        if le:
            bound = float("inf") if le.group(1) == "+Inf" else float(le.group(1))
            bounds[bound] = bounds.get(bound, 0.0) + count
    if not bounds or max(bounds.values()) == 0:
        return None
    total = bounds[max(bounds)]
    for bound in sorted(bounds):
        if bounds[bound] >= q * total:
            return None if bound == float("inf") else round(bound * 1000.0, 1)
    return None


async def start_server(args: argparse.Namespace, home: Path) -> tuple[asyncio.subprocess.Process, str]:
    env = {**os.environ, "AVATAR_ENGINE_HOME": str(home)}
    proc = await asyncio.create_subprocess_exec(
        *ENGINE, "serve", "--webrtc", "--port", "0", "--mode", args.mode, "--max-sessions", str(args.sessions),
        stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    assert proc.stderr is not None
    while True:
        line = (await asyncio.wait_for(proc.stderr.readline(), 300)).decode()
        if not line:
            raise RuntimeError("the server exited before it served")
        found = re.search(r"serving on (http://\S+)", line)
        if found:
            break
    _BACKGROUND.add(asyncio.ensure_future(_drain(proc.stderr)))  # its log must not fill the pipe
    return proc, found.group(1).rstrip("/")


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


async def fetch_metrics(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(f"{url}/metrics") as resp:
        return await resp.text()


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    speech, rate = speech_wav(args.minutes * 60.0 + 30.0, workdir)
    proc, url = await start_server(args, workdir / "home")
    loads: list[float] = []
    windows: list[dict[str, Any]] = []
    try:
        clients = [AvatarClient(url, ArrayAudioTrack(speech, rate)) for _ in range(args.sessions)]
        for client in clients:
            await client.connect()
        fps = 25
        async with aiohttp.ClientSession() as http:
            await asyncio.sleep(2.0)  # the first frames arrive
            start = time.monotonic()
            frames0 = [c.report.video_frames for c in clients]
            last = list(frames0)
            last_rendered = parse_metrics(await fetch_metrics(http, url))[0].get("avatar_frames_rendered_total", 0.0)
            end = start + args.minutes * 60.0
            while time.monotonic() < end:
                await asyncio.sleep(min(WINDOW_S, max(0.0, end - time.monotonic())))
                now = [c.report.video_frames for c in clients]
                elapsed_w = WINDOW_S if not windows else time.monotonic() - windows[-1]["_t"]
                totals, labelled = parse_metrics(await fetch_metrics(http, url))
                latency = list(labelled.get("avatar_latency_ms", {}).values())
                # fresh pictures (the rest of the frames sent repeat the last one: the renderer was late)
                rendered = totals.get("avatar_frames_rendered_total", 0.0)
                fresh = (rendered - last_rendered) / elapsed_w / args.sessions
                last_rendered = rendered
                load = load_average() or 0.0
                loads.append(load)
                windows.append(
                    {
                        "t_s": round(time.monotonic() - start, 1),
                        "_t": time.monotonic(),
                        "fps": [round((n - p) / elapsed_w, 2) for n, p in zip(now, last, strict=True)],
                        "fresh_fps_per_session": round(fresh, 2),
                        "rss_mb": round(rss_mb(proc.pid), 1),
                        "latency_ms": [round(v, 1) for v in latency],
                        "load_1min": load,
                        "counters": {k: v for k, v in totals.items() if k.endswith("_total")},
                    }
                )
                last = now
                print(f"{windows[-1]['t_s']:7.1f} s  fps {windows[-1]['fps']} (fresh {fresh:.1f})  "
                      f"RSS {windows[-1]['rss_mb']} MB  "
                      f"latency {windows[-1]['latency_ms']} ms  load {load}", flush=True)  # fmt: skip
            duration = time.monotonic() - start
            delivered = [c.report.video_frames - f0 for c, f0 in zip(clients, frames0, strict=True)]
            totals, labelled = parse_metrics(await fetch_metrics(http, url))
            p50 = histogram_quantile(labelled.get("avatar_session_latency_seconds_bucket", {}), 0.5)
            p95 = histogram_quantile(labelled.get("avatar_session_latency_seconds_bucket", {}), 0.95)
            for client in clients:
                await client.close()
            closed = time.monotonic()
            while True:  # the server frees the sessions when it sees the clients go
                async with http.get(f"{url}/health") as resp:
                    if (await resp.json())["sessions"] == 0 or time.monotonic() - closed > 30.0:
                        break
                await asyncio.sleep(0.2)
            freed_s = time.monotonic() - closed

            # a new session afterwards
            fresh = AvatarClient(url, ArrayAudioTrack(speech[: int((args.after_s + 5) * rate)], rate))
            await fresh.connect()
            await asyncio.sleep(2.0)
            f0, t0 = fresh.report.video_frames, time.monotonic()
            await asyncio.sleep(args.after_s)
            after_fps = (fresh.report.video_frames - f0) / (time.monotonic() - t0)
            await fresh.close()
            final_totals, _ = parse_metrics(await fetch_metrics(http, url))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 60)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()

    for w in windows:
        del w["_t"]
    expected = duration * fps * args.sessions
    warm = next((w for w in windows if w["t_s"] >= 60.0), windows[0])
    rss_growth = (windows[-1]["rss_mb"] - warm["rss_mb"]) / warm["rss_mb"]
    window_fps = [f for w in windows for f in w["fps"]]
    results = {
        "duration_s": round(duration, 1),
        "frames_delivered": delivered,
        "frames_expected": round(expected),
        "delivered_share": round(sum(delivered) / expected, 4),
        "min_window_fps": min(window_fps, default=0.0),
        "fresh_fps_per_session_mean": round(float(np.mean([w["fresh_fps_per_session"] for w in windows])), 2),
        "rss_mb": {"first": windows[0]["rss_mb"], "after_1_min": warm["rss_mb"], "end": windows[-1]["rss_mb"]},
        "rss_growth_after_warmup": round(rss_growth, 4),
        "latency_p50_ms_histogram": p50,
        "latency_p95_ms_histogram": p95,
        "sessions_freed_after_s": round(freed_s, 2),
        "new_session_fps": round(after_fps, 2),
        "load_average": {
            "min": min(loads, default=0.0),
            "mean": round(float(np.mean(loads)), 2) if loads else 0.0,
            "max": max(loads, default=0.0),
        },
        "server_counters_end": {k: v for k, v in final_totals.items() if k.endswith("_total")},
        "windows": windows,
    }
    results["checks"] = {
        "delivered_ge_98pct": results["delivered_share"] >= 0.98,
        "no_window_under_20fps": results["min_window_fps"] >= 20.0,
        "rss_growth_lt_5pct": rss_growth < 0.05,
        "new_session_full_rate": after_fps >= 23.0,
    }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=2, help="sessions, and the server's --max-sessions")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--after-s", type=float, default=20.0, help="how long the new session streams afterwards")
    parser.add_argument("--mode", default="classic")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    env = environment("cpu")
    results = asyncio.run(soak(args))
    record = {
        "benchmark": "soak",
        "device": env["device"],
        "commit": env["commit"],
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results,
        "environment": env,
    }
    out = args.out or RESULTS / "soak_cpu.json"
    write_result(out, record)
    summary = {k: v for k, v in results.items() if k != "windows"}
    print(summary)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
