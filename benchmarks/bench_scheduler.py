"""Streaming motion latency on CPU: audio needed before the first motion frame, and compute per window.

Streams synthetic 16 kHz speech in 20 ms pushes through the log-mel stage and the :class:`WindowScheduler`
(hop 5 frames, lookahead 2, 10 guided DDIM steps by default) for the ``tiny`` and full-size (``logmel``: Ditto's
sizes, log-mel conditioned) denoisers with deterministic random weights (compute does not depend on the values).

* first-frame latency = audio pushed until the first frame came out (ms of audio) + the wall time of that push;
* per-window compute = wall time of each push that ran a window (one window per 200 ms of audio);
* real-time factor = hop duration / median window time (>= 1 keeps up with live audio).

Writes ``benchmarks/results/scheduler_cpu.json`` (device, load average, commit, config)::

    python benchmarks/bench_scheduler.py [--threads 2] [--steps 10] [--seconds 4] [--presets tiny logmel]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.audio import LogMelFeatures
from engine.motion import lmdm
from engine.motion.scheduler import SchedulerConfig, SourceCondition, WindowScheduler
from streaming.measure.info import environment, load_average, write_result

RESULTS = Path(__file__).parent / "results" / "scheduler_cpu.json"
PUSH_MS = 20


def _speech(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    phase = 2 * np.pi * np.cumsum(140 + 30 * np.sin(2 * np.pi * 0.7 * t)) / 16000
    env = np.clip(np.sin(2 * np.pi * 4 * t), 0, None)
    return (sum(np.sin(k * phase) / k for k in range(1, 6)) * env * 0.2).astype(np.float32)


def run(preset: str, config: SchedulerConfig, seconds: float) -> dict[str, Any]:
    mel = LogMelFeatures()
    den = lmdm.build(preset, cond_dim=lmdm.logmel_cond_dim())
    sched = WindowScheduler(den, mel.silence(), torch.zeros(265), SourceCondition(sc=(0.0,) * 63), config)
    audio = _speech(seconds)
    step = 16000 * PUSH_MS // 1000
    with torch.inference_mode():  # warm-up: one window, then back to a fresh stream
        sched.push(np.tile(mel.silence(), (config.first_frame_rows, 1)))
    sched.reset()
    first_frame: dict[str, float] | None = None
    window_ms: list[float] = []
    frames = 0
    for i in range(0, audio.shape[0], step):
        start = time.perf_counter()
        out = sched.push(mel.push(audio[i : i + step]))
        elapsed = (time.perf_counter() - start) * 1e3
        if out:
            window_ms.append(elapsed)
            if first_frame is None:
                audio_ms = (i + step) / 16.0
                first_frame = {
                    "audio_ms": round(audio_ms, 1),
                    "compute_ms": round(elapsed, 1),
                    "total_ms": round(audio_ms + elapsed, 1),
                }
        frames += len(out)
    frames += len(sched.push(mel.flush())) + len(sched.flush())
    hop_ms = config.hop * 1000 / 25
    median = statistics.median(window_ms)
    return {
        "preset": preset,
        "denoiser": dataclasses.asdict(den.config),
        "parameters": sum(p.numel() for p in den.parameters()),
        "frames": frames,
        "expected_frames": int(np.ceil(audio.shape[0] / 640)),
        "first_frame": first_frame,
        "first_frame_audio_floor_ms": config.first_frame_rows * 40 + mel.lookahead_samples / 16.0,
        "window_ms_median": round(median, 2),
        "window_ms_p90": round(float(np.percentile(window_ms, 90)), 2),
        "window_ms_min": round(min(window_ms), 2),
        "windows": len(window_ms),
        "realtime_factor": round(hop_ms / median, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--hop", type=int, default=5)
    parser.add_argument("--lookahead", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--presets", nargs="+", default=["tiny", "logmel"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    config = SchedulerConfig(hop=args.hop, lookahead=args.lookahead, steps=args.steps)
    results = []
    env = environment()  # at the start: the load average the timings below ran under
    for threads in args.threads:
        torch.set_num_threads(threads)
        for preset in args.presets:
            r = {"threads": threads, **run(preset, config, args.seconds)}
            results.append(r)
            ff = r["first_frame"]
            print(
                f"{preset:>6} x{threads} threads: first frame after {ff['audio_ms']:.0f} ms audio + "
                f"{ff['compute_ms']:.0f} ms compute = {ff['total_ms']:.0f} ms; window median "
                f"{r['window_ms_median']:.1f} ms (p90 {r['window_ms_p90']:.1f}, min {r['window_ms_min']:.1f}), "
                f"x{r['realtime_factor']} real time; {r['frames']}/{r['expected_frames']} frames"
            )
    load_after = load_average()
    report = {
        "benchmark": "motion_scheduler_cpu",
        "environment": env,
        # shared machine: a 1-minute load average above the core count inflates every number here
        "load_average_1min_after": load_after,
        "config": {**dataclasses.asdict(config), "push_ms": PUSH_MS, "audio_seconds": args.seconds},
        "weights": "deterministic random (timing only; compute does not depend on values)",
        "results": results,
    }
    write_result(args.out, report)
    print(f"load average {env['load_average_1min']} -> {load_after} on {os.cpu_count()} cores; wrote {args.out}")


if __name__ == "__main__":
    main()
