"""Live-session benchmark: audio pushed in real time (20 ms chunks) through a full session on this machine.

Measures delivered fps, audio-in -> frame-out latency p50/p95, dropped frames and skipped motion rows, per mode
(classic, and neural on the tiny preset with random weights unless weights are imported), and writes
``benchmarks/results/session_cpu.json`` with the device, commit and configuration.

    python benchmarks/bench_session.py --seconds 10 --modes classic,neural,neural:8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from streaming.measure.info import environment, write_result
from streaming.pipelines import RuntimeConfig
from streaming.runtime import Runtime
from streaming.session import SessionConfig

CHUNK_S = 0.02
SR = 16_000


def voice(seconds: float, seed: int = 0) -> np.ndarray:
    """Speech-like test audio: a gliding voiced tone with syllable-rate bursts and pauses (no dataset needed)."""
    t = np.arange(int(seconds * SR)) / SR
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    voiced = sum(np.sin(k * phase) / k for k in range(1, 6))
    syllables = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) * (np.sin(2 * np.pi * 0.25 * t) > -0.5)
    noise = np.random.default_rng(seed).standard_normal(t.size) * 0.02
    return (0.25 * voiced * syllables + noise).astype(np.float32)


async def run_mode(mode: str, seconds: float, session_cfg: SessionConfig) -> dict[str, Any]:
    runtime = Runtime.create(RuntimeConfig(mode=mode, session=session_cfg))
    audio = voice(seconds)
    try:
        session = await runtime.open_session(None)
        frames = 0
        audio_out = 0

        async def read_video() -> None:
            nonlocal frames
            while await session.next_video() is not None:
                frames += 1

        async def read_audio() -> None:
            nonlocal audio_out
            while (a := await session.next_audio()) is not None:
                audio_out += a.samples.size

        readers = [asyncio.create_task(read_video()), asyncio.create_task(read_audio())]
        step = int(CHUNK_S * SR)
        start = time.monotonic()
        for k, i in enumerate(range(0, audio.size, step)):
            await asyncio.sleep(max(0.0, start + (k + 1) * CHUNK_S - time.monotonic()))
            session.push_audio(audio[i : i + step], SR)
        session.end_of_stream()
        await asyncio.gather(*readers)
        wall = time.monotonic() - start
        m = session.metrics()
        lat = np.asarray(session.metrics_.all_latencies()) * 1000.0
        committed = int(m["frames_committed"])
        return {
            "mode": runtime.mode,
            "untrained": runtime.untrained,
            "renderer_size": runtime.renderer.size,
            "audio_s": audio.size / SR,
            "wall_s": round(wall, 3),
            "frames_committed": committed,
            "frames_out": frames,
            "frames_dropped": int(m["frames_dropped"]),
            "motion_rows_skipped": int(m["motion_rows_skipped"]),
            "delivered_fps": round(frames / wall, 2),
            "delivered_ratio": round(frames / max(committed, 1), 3),
            "latency_budget_ms": round(m["latency_budget_ms"], 1),
            "latency_p50_ms": round(float(np.percentile(lat, 50)), 1) if lat.size else None,
            "latency_p95_ms": round(float(np.percentile(lat, 95)), 1) if lat.size else None,
            "render_batch_ms": round(m["render_batch_ms"], 1),
            "audio_out_s": audio_out / SR,
            "lookahead_frames": session.lookahead_frames,
        }
    finally:
        await runtime.aclose()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    env = environment()  # at the start: the load average the sessions below ran under
    results = []
    for item in args.modes.split(","):
        # "mode" or "mode:compute_frames" (a larger render budget: more latency, fewer drops)
        mode, _, budget = item.partition(":")
        session_cfg = SessionConfig(compute_frames=int(budget) if budget else args.compute_frames)
        print(f"{item}: {args.seconds:.0f} s of audio in real time ...", flush=True)
        r = await run_mode(mode, args.seconds, session_cfg)
        r["session_config"] = asdict(session_cfg)
        print(json.dumps(r), flush=True)
        results.append(r)
    return {
        "benchmark": "session_live",
        "environment": env,
        "config": {"seconds": args.seconds, "chunk_s": CHUNK_S, "modes": args.modes},
        "results": results,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--modes", default="classic,neural,neural:8", help="mode[:compute_frames],...")
    parser.add_argument("--compute-frames", type=int, default=2, help="render budget in frames (latency)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "session_cpu.json")
    ns = parser.parse_args()
    report = asyncio.run(main(ns))
    write_result(ns.out, report)
    print(f"wrote {ns.out}")
