"""Renderer per-frame compute on CPU: warping W + SPADE decoder G at batch 1 (what runs every frame).

Weights are deterministic random ones (compute time does not depend on their values). Writes
``benchmarks/results/renderer_cpu.json`` with device, commit and config, and prints the fps.

    python benchmarks/bench_renderer.py [--threads 2] [--repeats 20] [--full]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from engine.models import liveportrait
from streaming.measure.info import environment, load_average, write_result

RESULTS = Path(__file__).parent / "results" / "renderer_cpu.json"


def time_preset(preset: str, repeats: int, warmup: int = 3) -> dict[str, Any]:
    nets = liveportrait.build(preset)
    cfg = nets.config
    gen = torch.Generator().manual_seed(0)
    feature = torch.randn(1, *cfg.volume_shape, generator=gen)
    kp_source = torch.rand(1, 21, 3, generator=gen) * 0.8 - 0.4
    kp_driving = kp_source + (torch.rand(1, 21, 3, generator=gen) * 0.1 - 0.05)
    warp_s: list[float] = []
    decode_s: list[float] = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            warped = nets.warping(feature, kp_driving, kp_source)
            t1 = time.perf_counter()
            nets.decoder(warped.out)
            t2 = time.perf_counter()
            if i >= warmup:
                warp_s.append(t1 - t0)
                decode_s.append(t2 - t1)
    total = [w + d for w, d in zip(warp_s, decode_s, strict=True)]
    median = statistics.median(total)
    return {
        "preset": preset,
        "config": dataclasses.asdict(cfg),
        "input_size": cfg.input_size,
        "volume_shape": list(cfg.volume_shape),
        "output_size": cfg.output_size,
        "parameters": {n: sum(p.numel() for p in m.parameters()) for n, m in nets.networks().items()},
        "batch": 1,
        "repeats": repeats,
        "warp_ms_median": round(statistics.median(warp_s) * 1e3, 2),
        "decode_ms_median": round(statistics.median(decode_s) * 1e3, 2),
        "frame_ms_median": round(median * 1e3, 2),
        "frame_ms_min": round(min(total) * 1e3, 2),
        "fps_median": round(1.0 / median, 2),
        # the fastest frame approximates the uncontended speed on a machine shared with other work
        "fps_best": round(1.0 / min(total), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--full", action="store_true", help="also time the full liveportrait preset (slow on CPU)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the untrained-weights warning is expected here
    torch.set_num_threads(args.threads)
    env = environment()  # at the start: the load average the timings below ran under
    runs = [time_preset("tiny", args.repeats)]
    if args.full:
        runs.append(time_preset("liveportrait", max(2, args.repeats // 10), warmup=1))
    result = {
        "benchmark": "renderer warp+decode, batch 1, CPU",
        "environment": env,
        "threads": args.threads,
        # other processes on a shared machine slow every number here; the load average says how busy it was
        "load_average_1min_after": load_average(),
        "note": "deterministic random weights; compute time does not depend on the weight values",
        "runs": runs,
    }
    write_result(args.out, result)
    for run in runs:
        print(
            f"{run['preset']}: warp {run['warp_ms_median']} ms + decode {run['decode_ms_median']} ms = "
            f"{run['frame_ms_median']} ms/frame -> {run['fps_median']} fps median, {run['fps_best']} fps best frame "
            f"({run['input_size']}^2 in, {run['output_size']}^2 out, {args.threads} threads)"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
