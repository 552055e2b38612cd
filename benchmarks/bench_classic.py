"""Classic (warp-only) renderer throughput at 512x512 on CPU threads -> benchmarks/results/classic_cpu.json.

    python benchmarks/bench_classic.py [--threads 2] [--batch 1] [--frames 100] [--flow-size 64]

Times drive + render per frame (motion excluded: it is a few hundred scalar ops) after a warm-up, rendering under
``torch.inference_mode()`` as the render worker does (streaming/batching.py). Also reports the process's CPU time
per frame: with several threads it includes OpenMP workers spinning while the main thread runs small ops.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from engine.avatar.default import default_avatar
from engine.motion.classic import ClassicFeatures, ClassicMotion
from engine.render.classic import ClassicRenderer, face_size
from streaming.measure.info import environment, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--flow-size", type=int, default=64)  # the renderer's default
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "classic_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    env = environment()  # at the start: the load average the timings below ran under

    renderer = ClassicRenderer(size=512, flow_size=args.flow_size)
    prepared = renderer.prepare(default_avatar())
    rng = np.random.default_rng(0)
    audio = (0.2 * rng.standard_normal(16000 * 8) * (np.arange(16000 * 8) % 8000 < 5000)).astype(np.float32)
    features = ClassicFeatures()
    rows = np.concatenate([features.push(audio), features.flush()])
    motion = ClassicMotion(face_size=face_size(prepared.source))
    frames = motion.push(rows) + motion.flush()
    params = [f.params for f in frames]

    def step(i: int) -> None:
        batch = [params[(i + j) % len(params)] for j in range(args.batch)]
        kp = torch.cat([renderer.drive(prepared, p) for p in batch])
        with torch.inference_mode():
            renderer.render([prepared] * args.batch, kp)

    for i in range(5):
        step(i)
    times = []
    cpu0 = time.process_time()
    for i in range(args.frames):
        t0 = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t0)
    cpu = (time.process_time() - cpu0) / (args.frames * args.batch)
    per_frame = np.array(times) / args.batch
    result = {
        "benchmark": "classic_render_cpu",
        "environment": env,
        "config": {"size": 512, "flow_size": args.flow_size, "batch": args.batch, "frames": args.frames},
        "ms_per_frame_median": round(float(np.median(per_frame)) * 1000, 2),
        "ms_per_frame_p90": round(float(np.percentile(per_frame, 90)) * 1000, 2),
        "fps_median": round(1.0 / float(np.median(per_frame)), 1),
        "cpu_ms_per_frame": round(cpu * 1000, 2),
        "note": "shared 2-core machine; other jobs may have been running",
    }
    write_result(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
