"""Fused warping kernels vs the PyTorch paths on a CUDA GPU, per op and for the whole warping module.

For batch 1 and 8, fp32 and fp16, at LivePortrait's sizes (feature [B, 32, 16, 64, 64], compressed [B, 4, 16, 64, 64],
mask logits [B, 22, 16, 64, 64], 21 keypoints), times with CUDA events (median over --repeats after --warmup):

* sparse-motion hourglass input: spec-literal (engine.models.warping_ops), twin (kernels.reference), fused;
* deformation + warp: spec-literal (deformation_from_mask + warp_volume), fused mask_deformation + fused
  grid_sample_3d, fused flow_warp (one kernel);
* grid_sample_3d alone: torch vs fused;
* the whole warping module W (random weights; time does not depend on them) with AVATAR_ENGINE_KERNELS=torch
  ("before") and =fused ("after"), which only differs when engine.models.warping_ops dispatches to kernels.ops.

Writes ``benchmarks/results/kernels_<device>.json`` (device, dtype, ms, commit). Needs a CUDA GPU:

    python benchmarks/bench_kernels.py [--repeats 50] [--warmup 10]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

import kernels
from engine.models import warping_ops
from engine.models.warping import WarpingNetwork
from kernels import ops, reference

RESULTS_DIR = Path(__file__).parent / "results"
BATCHES = (1, 8)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
NUM_KP = 21
VOLUME = (16, 64, 64)


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def time_cuda(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    """Median milliseconds of ``fn`` on the current stream, measured with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return round(statistics.median(times), 4)


@contextmanager
def kernels_env(value: str) -> Iterator[None]:
    previous = os.environ.get("AVATAR_ENGINE_KERNELS")
    os.environ["AVATAR_ENGINE_KERNELS"] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("AVATAR_ENGINE_KERNELS", None)
        else:
            os.environ["AVATAR_ENGINE_KERNELS"] = previous


def bench_case(batch: int, dtype: torch.dtype, repeats: int, warmup: int) -> dict[str, Any]:

    gen = torch.Generator().manual_seed(0)
    device = torch.device("cuda")

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    feature = randn(batch, 32, *VOLUME)
    compressed = randn(batch, 4, *VOLUME)
    mask_logits = randn(batch, NUM_KP + 1, *VOLUME, scale=3.0)
    grid = randn(batch, *VOLUME, 3, scale=0.7)
    kp_source = (torch.rand(batch, NUM_KP, 3, generator=gen) * 0.8 - 0.4).to(device=device, dtype=dtype)
    kp_driving = kp_source + (torch.rand(batch, NUM_KP, 3, generator=gen) * 0.1 - 0.05).to(device, dtype)

    def spec_warp() -> torch.Tensor:
        return warping_ops.warp_volume(feature, warping_ops.deformation_from_mask(mask_logits, kp_driving, kp_source))

    def fused_two_ops() -> torch.Tensor:
        deformation = ops.mask_deformation(mask_logits, kp_driving, kp_source, impl="fused")
        return ops.grid_sample_3d(feature, deformation, impl="fused")

    # The spec-literal functions dispatch CUDA inputs to the kernels unless told otherwise: pin them to torch.
    with torch.inference_mode(), kernels_env("torch"):
        ms: dict[str, float] = {
            "sparse_motion.spec": time_cuda(
                lambda: warping_ops.sparse_motion_input(compressed, kp_driving, kp_source), repeats, warmup
            ),
            "sparse_motion.twin": time_cuda(
                lambda: reference.sparse_motion_features(compressed, kp_driving, kp_source), repeats, warmup
            ),
            "sparse_motion.fused": time_cuda(
                lambda: ops.sparse_motion_features(compressed, kp_driving, kp_source, impl="fused"), repeats, warmup
            ),
            "deform_warp.spec": time_cuda(spec_warp, repeats, warmup),
            "deform_warp.fused_mask_deformation+grid_sample": time_cuda(fused_two_ops, repeats, warmup),
            "deform_warp.fused_flow_warp": time_cuda(
                lambda: ops.flow_warp(feature, mask_logits, kp_driving, kp_source, impl="fused"), repeats, warmup
            ),
            "grid_sample_3d.torch": time_cuda(lambda: reference.grid_sample_3d(feature, grid), repeats, warmup),
            "grid_sample_3d.fused": time_cuda(lambda: ops.grid_sample_3d(feature, grid, impl="fused"), repeats, warmup),
        }
    with torch.inference_mode():
        warping = WarpingNetwork().to(device=device, dtype=dtype).eval()
        for label, setting in (("before_torch", "torch"), ("after_fused", "fused")):
            with kernels_env(setting):
                ms[f"warping_module.{label}"] = time_cuda(
                    lambda: warping(feature, kp_driving, kp_source), repeats, warmup
                )
    # "after" differs from "before" only when warping_ops dispatches CUDA inputs to kernels.ops
    wired = hasattr(warping_ops, "kernel_ops")
    return {"batch": batch, "dtype": str(dtype).removeprefix("torch."), "warping_ops_dispatch": wired, "ms": ms}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(
            "bench_kernels: needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured.", file=sys.stderr
        )
        return 2

    reason = kernels.unavailable_reason()
    if reason is not None:
        print(f"bench_kernels: fused kernels unavailable: {reason}", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name()
    runs = []
    for batch in BATCHES:
        for dtype in DTYPES.values():
            run = bench_case(batch, dtype, args.repeats, args.warmup)
            print(json.dumps(run))
            runs.append(run)
    major, minor = torch.cuda.get_device_capability()
    result = {
        "benchmark": "fused warping kernels vs torch paths (CUDA events, median ms)",
        "device": {
            "name": name,
            "capability": f"{major}.{minor}",
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
        },
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain")),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "volume": list(VOLUME),
        "num_kp": NUM_KP,
        "note": "random weights for the warping module; compute time does not depend on the weight values",
        "runs": runs,
    }
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"kernels_{slug}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
