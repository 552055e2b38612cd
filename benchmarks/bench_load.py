"""Live sessions under CPU load: N sessions of the real runtime (as ``engine serve`` builds it) talk in real time
while K CPU-burning processes run for a while; what each session delivered, and how fast it recovered.

    python benchmarks/bench_load.py --sessions 2 --burners 4 --seconds 30 --load-from 5 --load-s 15

Per session: new pictures per second (on time in their own slot, and late ones shown one or more slots after),
the longest gap between new pictures, latency p50 / p95 of the on-time frames, the share of slots that repeated
the last picture, and the recovery time: from the end of the load until a whole second shows a new picture in
at least 95 % of its slots. JSON (device, commit, config) goes to ``benchmarks/results/load_<device>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import multiprocessing
import time
from pathlib import Path
from typing import Any

import numpy as np

from engine.audio.pcm import SAMPLE_RATE
from export.backends import BackendConfig
from streaming.frames import VideoFrame
from streaming.measure.info import environment, load_average, write_result
from streaming.pipelines import RuntimeConfig
from streaming.runtime import Runtime

RESULTS = Path(__file__).parent / "results"


def burn(until: float) -> None:
    """Busy-loop one core until ``until`` (monotonic seconds)."""
    x = 0
    while time.monotonic() < until:
        x += 1


def speech_like(seconds: float, seed: int) -> np.ndarray:
    """Voiced bursts with pauses (a stand-in for speech whose loud/quiet edges move the mouth)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    gate = (np.sin(2 * np.pi * 1.3 * t + rng.uniform(0, 6)) > -0.2).astype(np.float32)
    voice = np.sin(2 * np.pi * 140 * t) + 0.5 * np.sin(2 * np.pi * 280 * t) + 0.1 * rng.standard_normal(t.size)
    return (0.3 * gate * voice).astype(np.float32)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    config = RuntimeConfig(
        mode=args.mode,
        motion=args.motion,
        backend=BackendConfig("eager", args.device),
        motion_batching=args.motion_batching,
    )
    runtime = Runtime.create(config)
    sessions = [await runtime.open_session(None) for _ in range(args.sessions)]
    shown: dict[str, list[tuple[float, VideoFrame]]] = {s.id: [] for s in sessions}
    start = time.monotonic()
    load_start, load_end = start + args.load_from, start + args.load_from + args.load_s

    async def speak(session: Any, seed: int) -> None:
        audio = speech_like(args.seconds + 1.0, seed)
        step = SAMPLE_RATE // 50
        for k, i in enumerate(range(0, audio.size, step)):
            await asyncio.sleep(max(0.0, start + (k + 1) * 0.02 - time.monotonic()))
            session.push_audio(audio[i : i + step], SAMPLE_RATE)

    async def watch(session: Any) -> None:
        while (frame := await session.next_video()) is not None:
            shown[session.id].append((time.monotonic() - start, frame))

    async def drain(session: Any) -> None:
        while await session.next_audio() is not None:
            pass

    tasks = [asyncio.create_task(c) for s in sessions for c in (watch(s), drain(s))]
    tasks += [asyncio.create_task(speak(s, k)) for k, s in enumerate(sessions)]
    burners: list[multiprocessing.Process] = []
    loads: list[float] = []
    try:
        while time.monotonic() < start + args.seconds:
            now = time.monotonic()
            if not burners and now >= load_start and args.burners:
                burners = [multiprocessing.Process(target=burn, args=(load_end,)) for _ in range(args.burners)]
                for p in burners:
                    p.start()
            loads.append(load_average() or 0.0)
            await asyncio.sleep(0.5)
        metrics = {s.id: s.metrics() for s in sessions}
    finally:
        for p in burners:
            p.join(timeout=max(0.0, load_end - time.monotonic()) + 5)
            if p.is_alive():
                p.terminate()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await runtime.aclose()
    fps = runtime.config.session.fps
    per_session = {sid: summarise(frames, metrics[sid], fps, args, load_end - start) for sid, frames in shown.items()}
    return {"sessions": per_session, "load_average_max": round(max(loads, default=0.0), 2)}


def summarise(
    frames: list[tuple[float, VideoFrame]], metrics: dict[str, float], fps: int, args: argparse.Namespace, end: float
) -> dict[str, Any]:
    new = [t for t, f in frames if not f.repeated]
    on_time = [t for t, f in frames if not f.repeated and f.lag == 0]
    load = (args.load_from, args.load_from + args.load_s)

    def rate(times: list[float], a: float, b: float) -> float:
        return round(sum(a <= t < b for t in times) / max(b - a, 1e-9), 2)

    recovery: float | None = None
    if args.burners:
        for k in itertools.count():
            a = end + 0.1 * k
            if a + 1.0 > args.seconds:
                break
            slots = [f for t, f in frames if a <= t < a + 1.0]
            if slots and sum(not f.repeated for f in slots) >= 0.95 * fps:
                recovery = round(a - end, 2)
                break
    gaps = [b - a for a, b in itertools.pairwise(new)]
    return {
        "new_pictures_fps": {
            "before": rate(new, 1.0, load[0]),
            "load": rate(new, *load),
            "after": rate(new, end + 1.0, args.seconds),
        },
        "on_time_fps": {
            "before": rate(on_time, 1.0, load[0]),
            "load": rate(on_time, *load),
            "after": rate(on_time, end + 1.0, args.seconds),
        },
        "longest_gap_s": round(max(gaps, default=float("inf")), 3),
        "repeated_share": round(sum(f.repeated for _, f in frames) / max(len(frames), 1), 3),
        "latency_p50_ms": round(metrics["latency_p50_ms"], 1),
        "latency_p95_ms": round(metrics["latency_p95_ms"], 1),
        "latency_budget_ms": round(metrics["latency_budget_ms"], 1),
        "recovery_s": recovery,
        "frames": len(frames),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=2)
    parser.add_argument("--burners", type=int, default=4, help="CPU-burning processes during the load")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--load-from", type=float, default=5.0)
    parser.add_argument("--load-s", type=float, default=15.0)
    parser.add_argument("--mode", default="classic")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--motion", default="auto", help="motion generator (auto: the renderer's)")
    parser.add_argument("--motion-batching", default="auto", help="auto | on | off (ditto motion)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.load_from + args.load_s + 3.0 > args.seconds:
        parser.error("--seconds must leave at least 3 s after the load to measure the recovery")
    env = environment(args.device)
    result = asyncio.run(run(args))
    record = {
        "benchmark": "load",
        "device": env["device"],
        "commit": env["commit"],
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": result,
        "environment": env,
    }
    out = args.out or RESULTS / f"load_{args.device.split(':')[0]}.json"
    write_result(out, record)
    for sid, r in result["sessions"].items():
        print(sid, r)
    print(f"load average max {result['load_average_max']}; wrote {out}")


if __name__ == "__main__":
    main()
