"""Motion diffusion compute time per window: one 80-frame LMDM window, S guided DDIM steps, on CPU.

Runs the ``tiny`` and full ``ditto`` sizes with deterministic random weights (compute time does not depend on the
weight values) and writes ``benchmarks/results/motion_cpu.json`` with device, commit and config.

    python benchmarks/bench_motion.py [--threads 2 [1 ...]] [--steps 10] [--repeats 5]

On a shared machine (load average above the core count) 2 threads can be far slower than 1: OpenMP workers
spin while waiting for a core. The JSON records the load average so such runs can be recognised.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from engine.motion import lmdm
from engine.motion.samplers import DDIMSampler, guided_denoise, sample
from engine.motion.schedule import cosine_alphas_cumprod
from streaming.measure.info import environment, load_average, write_result

RESULTS = Path(__file__).parent / "results" / "motion_cpu.json"
FPS = 25


def time_window(preset: str, steps: int, repeats: int, warmup: int = 1) -> dict[str, Any]:
    den = lmdm.build(preset)
    c = den.config
    g = torch.Generator().manual_seed(0)
    cond_frame = torch.randn(1, c.motion_dim, generator=g)
    cond = torch.randn(1, c.seq_len, c.cond_dim, generator=g)
    sampler = DDIMSampler(cosine_alphas_cumprod(), eta=1.0)
    sampler.set_timesteps(steps)
    noises = [torch.randn(1, c.seq_len, c.motion_dim, generator=g) for _ in range(sampler.noise_steps)]

    def window() -> None:
        x_T = torch.randn(1, c.seq_len, c.motion_dim, generator=g)
        sample(lambda x, t: guided_denoise(den, x, cond_frame, cond, t, 2.0), sampler, x_T, noises)

    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            window()
        for _ in range(repeats):
            start = time.perf_counter()
            window()
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {
        "preset": preset,
        "config": {k: getattr(c, k) for k in c.__dataclass_fields__},
        "parameters": sum(p.numel() for p in den.parameters()),
        "steps": steps,
        "guidance": "batched cond+uncond, w=2",
        "window_frames": c.seq_len,
        "window_ms_median": round(median * 1e3, 2),
        "window_ms_min": round(min(times) * 1e3, 2),
        "window_ms_all": [round(t * 1e3, 2) for t in times],
        # a window covers 80 frames of which (80 - overlap) are new: at overlap 10 that is 2.8 s of audio
        "realtime_factor_overlap10": round((c.seq_len - 10) / FPS / median, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[2], help="torch intra-op thread counts to run")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--presets", nargs="+", default=["tiny", "ditto"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    env = environment()  # at the start: the load average the timings below ran under
    results = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        results += [{"threads": threads, **time_window(p, args.steps, args.repeats)} for p in args.presets]
    load_after = load_average()
    report = {
        "benchmark": "motion_window_cpu",
        "environment": env,
        # the machine may be shared: a 1-minute load average above the core count inflates the medians
        "load_average_1min_after": load_after,
        "weights": "deterministic random (timing only; compute does not depend on values)",
        "results": results,
    }
    write_result(args.out, report)
    for r in results:
        print(
            f"{r['preset']:>6}: {r['parameters'] / 1e6:6.2f}M params, {r['steps']} guided steps per 80-frame window: "
            f"median {r['window_ms_median']:.1f} ms (min {r['window_ms_min']:.1f}), "
            f"x{r['realtime_factor_overlap10']} real time at overlap 10 ({r['threads']} threads)"
        )
    print(f"load average {env['load_average_1min']} -> {load_after} on {os.cpu_count()} cores; wrote {args.out}")


if __name__ == "__main__":
    main()
