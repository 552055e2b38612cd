"""The GPU suite: one command on a lent GPU, within a time budget, with only torch, numpy and the project.

    python benchmarks/gpu_suite.py --out benchmarks/results/          # on a GPU: the CUDA tests, then timings
    python benchmarks/gpu_suite.py --dry-run --out /tmp/suite         # on a CPU: every step once, tiny, seconds

Steps (each records what it measured, or why it was skipped):

1. ``cuda_tests``: ``pytest -m cuda`` over the kernel and backend tests.
2. ``kernels``: the fused kernels against the standard PyTorch ops: max error and median time (CUDA events),
   fp32 / bf16 / fp16, batch 1 and 8, at LivePortrait's volume size.
3. ``warp_decode``: the full-size warping network + decoder (512^2 frames; deterministic random weights: the
   pictures are noise, the time is the real one) per call and per frame, for each precision and variant (eager
   with the standard ops, eager with the fused kernels, eager fused + CUDA graphs) at batch 1-16; and last
   (``warp_decode_compile``) torch.compile (reduce-overhead) in bf16 at batch 1 and 8, as far as the budget goes.
4. ``worker``: aggregate frames/s of 1, 4, 8, 16 simulated live sessions (25 fps each) through the real render
   worker (``streaming.batching.BatchRenderer``, threaded, real clock) on the best variant: on-time share, batch.
5. ``lmdm``: one Ditto-size motion-diffusion window (80 frames, 10 DDIM steps, guidance in one batch of 2); and
   ``sessions``: the windows of 1, 4, 8, 16 sessions due together, one thread each as in live sessions, with their
   steps shared (``engine.motion.shared_denoiser``, what ``--motion-batching`` turns on) and without.
6. ``memory``: peak GPU memory.

Writes ``gpu_suite_<device>.json`` (device, commit, config, results, skipped) and a PNG plot of ms/frame.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import kernels
from engine.keypoints import NUM_KP
from engine.models import liveportrait
from engine.models.warping_ops import FUSED, STANDARD
from engine.motion import lmdm
from engine.motion.samplers import DDIMSampler, guided_denoise, sample
from engine.motion.schedule import cosine_alphas_cumprod
from engine.motion.shared_denoiser import SharedDenoiser
from engine.render.base import PreparedAvatar
from engine.render.neural import NeuralRenderer
from export.backends import BackendConfig, DenoiserRuntime, RendererRuntime, get_backend
from streaming.batching import BatchConfig, BatchRenderer, RenderJob
from streaming.clock import MonotonicClock
from streaming.measure.info import environment, write_result
from streaming.testing import tiny_avatar

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Skip(Exception):
    """A step that cannot run here; the message says why."""


def timed(fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device) -> float:
    """Median milliseconds of ``fn`` (CUDA events on a GPU, wall clock on a CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000.0)
    return round(statistics.median(times), 4)


# --- steps ------------------------------------------------------------------------------------------------


def step_cuda_tests(args: argparse.Namespace) -> dict[str, Any]:
    if not torch.cuda.is_available():
        raise Skip("no CUDA device")
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "tests/kernels"]
    command += ["tests/export/backends"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=args.tests_timeout_s)
    tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr.strip()[-300:]
    return {"returncode": done.returncode, "summary": tail, "output_tail": done.stdout[-3000:]}


def step_kernels(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        raise Skip("the fused kernels run on CUDA only (their CPU path is the twin the standard ops are)")
    if not kernels.available():
        raise Skip(f"kernels unavailable: {kernels.unavailable_reason()}")
    out: dict[str, Any] = {}
    d, h, w = 16, 64, 64
    for name, dtype in DTYPES.items():
        for batch in (1, 8):
            gen = torch.Generator().manual_seed(0)

            def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
                return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)  # noqa: B023

            feature = randn(batch, 32, d, h, w)
            compressed = randn(batch, 4, d, h, w)
            mask = randn(batch, NUM_KP + 1, d, h, w, scale=3.0)
            kp_s = (torch.rand(batch, NUM_KP, 3, generator=gen) * 0.8 - 0.4).to(device)
            kp_d = kp_s + (torch.rand(batch, NUM_KP, 3, generator=gen) * 0.1 - 0.05).to(device)
            with torch.inference_mode():
                rows = {}
                for op, args_ in (
                    ("sparse_motion", (compressed, kp_d.to(dtype), kp_s.to(dtype))),
                    ("warp", (feature, mask, kp_d.to(dtype), kp_s.to(dtype))),
                ):
                    std = getattr(STANDARD, op)
                    fused = getattr(FUSED, op)
                    a, b = std(*args_), fused(*args_)
                    a0 = a[0] if isinstance(a, tuple) else a
                    b0 = b[0] if isinstance(b, tuple) else b
                    err = float((a0.float() - b0.float()).abs().max())
                    t_std = timed(lambda f=std, x=args_: f(*x), args.repeats, args.warmup, device)
                    t_fused = timed(lambda f=fused, x=args_: f(*x), args.repeats, args.warmup, device)
                    rows[op] = {
                        "max_abs_err": err,
                        "standard_ms": t_std,
                        "fused_ms": t_fused,
                        "speedup": round(t_std / t_fused, 2) if t_fused else None,
                    }
            out[f"{name}_b{batch}"] = rows
    return out


def _renderer(nets: liveportrait.LivePortraitNets, config: BackendConfig) -> NeuralRenderer:
    return NeuralRenderer(RendererRuntime(nets, get_backend(config)))


def _prepared(renderer: NeuralRenderer) -> PreparedAvatar:
    avatar = tiny_avatar("suite")
    crop = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    return renderer.prepare(avatar.__class__(avatar.name, avatar.content_hash, crop, crop, avatar.crop_to_image))


def _variants(device: torch.device, compiled: bool) -> dict[str, dict[str, Any]]:
    if compiled:
        return {"compile-standard": {"name": "compile", "options": {"kernels": "standard"}}}
    if device.type != "cuda":
        return {"eager-standard": {"name": "eager", "options": {"kernels": "standard"}}}
    return {
        "eager-standard": {"name": "eager", "options": {"kernels": "standard", "cuda_graphs": False}},
        "eager-fused": {"name": "eager", "options": {"kernels": "fused", "cuda_graphs": False}},
        "eager-fused-graphs": {"name": "eager", "options": {"kernels": "fused", "cuda_graphs": True}},
    }


def step_warp_decode(
    args: argparse.Namespace,
    device: torch.device,
    nets: liveportrait.LivePortraitNets,
    deadline: float,
    compiled: bool = False,
) -> dict[str, Any]:
    if compiled and (device.type != "cuda" or args.dry_run):
        raise Skip("torch.compile is timed on a GPU only (minutes of compilation on a CPU)")
    out: dict[str, Any] = {}
    dtypes = ["fp32"] if device.type != "cuda" else list(DTYPES)
    for variant, spec in _variants(device, compiled).items():
        for dtype in dtypes:
            if spec["name"] == "compile" and dtype != "bf16":
                continue  # compiling takes minutes per shape: the precision a GPU serves in by default
            if time.monotonic() > deadline:
                out[f"{variant}/{dtype}"] = {"skipped": "time budget spent"}
                continue
            try:
                renderer = _renderer(nets, BackendConfig(spec["name"], str(device), dtype, spec["options"]))
                prepared = _prepared(renderer)
                rows: dict[str, Any] = {}
                for batch in args.batches:
                    if spec["name"] == "compile" and batch not in (1, 8):
                        continue
                    kp = renderer.drive(prepared, prepared.source.params).expand(batch, -1, -1).contiguous()
                    many = [prepared] * batch
                    with torch.inference_mode():
                        ms = timed(lambda r=renderer, m=many, k=kp: r.render(m, k), args.repeats, args.warmup, device)
                    rows[str(batch)] = {"ms_per_call": ms, "ms_per_frame": round(ms / batch, 4)}
                    rows[str(batch)]["frames_per_s"] = round(1000.0 * batch / ms, 1)
                out[f"{variant}/{dtype}"] = rows
            except Exception as exc:  # a variant that cannot run here is a result, not a crash of the suite
                out[f"{variant}/{dtype}"] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return out


async def _worker_run(renderer: NeuralRenderer, sessions: int, seconds: float) -> dict[str, Any]:
    clock = MonotonicClock()
    worker = BatchRenderer(renderer, clock, BatchConfig(max_batch=16))
    prepared = _prepared(renderer)
    kp = renderer.drive(prepared, prepared.source.params)
    delivered: list[tuple[int, float, float]] = []  # (session, deadline, done)
    slots = [
        worker.register(
            prepared,
            capacity=32,
            live=True,
            deliver=lambda job, rgb, now, k=k: delivered.append((k, job.deadline, now)),
            drop=lambda job: None,
            fail=lambda exc: None,
        )
        for k in range(sessions)
    ]
    start = clock.now()
    n = 0
    while clock.now() < start + seconds:
        due = start + (n + 1) / 25.0
        await clock.sleep_until(due - 0.08)  # a session submits a frame 80 ms before it is due (2 frames budget)
        for slot in slots:
            slot.push_live(RenderJob(n, 0, kp, due))
        n += 1
    await asyncio.sleep(0.5)
    stats = worker.stats()
    await worker.aclose()
    on_time = sum(done <= deadline for _, deadline, done in delivered)
    expected = n * sessions
    return {
        "sessions": sessions,
        "frames_per_s": round(len(delivered) / seconds, 1),
        "on_time_share": round(on_time / max(expected, 1), 3),
        "mean_batch": round(stats["render_batch_mean"], 2),
        "call_ms": round(stats["render_call_ms"], 2),
        "cost_overhead_ms": round(stats["render_overhead_ms"], 2),
        "cost_per_frame_ms": round(stats["render_per_frame_ms"], 3),
    }


def step_worker(
    args: argparse.Namespace, device: torch.device, nets: liveportrait.LivePortraitNets, deadline: float
) -> dict[str, Any]:
    dtype = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    renderer = _renderer(nets, BackendConfig("eager", str(device), dtype))
    out: dict[str, Any] = {"backend": f"eager/{dtype}/{renderer.networks.backend.warp_ops.name}"}  # type: ignore[attr-defined]
    for sessions in args.sessions:
        if time.monotonic() > deadline:
            out[str(sessions)] = {"skipped": "time budget spent"}
            continue
        out[str(sessions)] = asyncio.run(_worker_run(renderer, sessions, args.worker_s))
    return out


def step_lmdm(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    preset = "tiny" if args.dry_run else "ditto"
    out: dict[str, Any] = {"preset": preset}
    denoiser = lmdm.build(preset).eval()
    c = denoiser.config
    sampler = DDIMSampler(cosine_alphas_cumprod(), eta=1.0)
    sampler.set_timesteps(10)
    for dtype in ["fp32", "bf16"] if device.type == "cuda" else ["fp32"]:
        for graphs in [False, True] if device.type == "cuda" else [False]:
            options = {"cuda_graphs": graphs} if device.type == "cuda" else {}
            runtime = DenoiserRuntime(denoiser, get_backend(BackendConfig("eager", str(device), dtype, options)))
            gen = torch.Generator(device).manual_seed(0)
            x_t = torch.randn(1, c.seq_len, c.motion_dim, generator=gen, device=device)
            cond_frame = torch.zeros(1, c.motion_dim, device=device)
            cond = torch.randn(1, c.seq_len, c.cond_dim, generator=gen, device=device)

            def window(
                rt: DenoiserRuntime = runtime,
                x_t: torch.Tensor = x_t,
                cond_frame: torch.Tensor = cond_frame,
                cond: torch.Tensor = cond,
                gen: torch.Generator = gen,
            ) -> torch.Tensor:
                def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                    return guided_denoise(rt, x, cond_frame, cond, t, 2.0)

                return sample(denoise, sampler, x_t, generator=gen)

            with torch.inference_mode():
                ms = timed(window, max(3, args.repeats // 5), 1, device)
            out[f"{dtype}{'-graphs' if graphs else ''}"] = {"ms_per_window": ms, "frames_per_window": c.seq_len}
    dtype = "bf16" if device.type == "cuda" else "fp32"
    runtime = DenoiserRuntime(denoiser, get_backend(BackendConfig("eager", str(device), dtype)))
    out["sessions"] = {
        str(n): {
            mode: _concurrent_windows(runtime, sampler, n, mode == "shared", device) for mode in ("alone", "shared")
        }
        for n in args.sessions
    }
    return out


def _concurrent_windows(
    runtime: DenoiserRuntime, sampler: DDIMSampler, sessions: int, shared: bool, device: torch.device
) -> dict[str, float]:
    """Wall time for ``sessions`` threads to run one window each, all starting together (median of 3)."""
    c = runtime.config
    denoiser: Any = SharedDenoiser(runtime) if shared else runtime
    gen = torch.Generator(device).manual_seed(0)
    cond = torch.randn(1, c.seq_len, c.cond_dim, generator=gen, device=device)
    cond_frame = torch.zeros(1, c.motion_dim, device=device)

    def window(start: threading.Barrier) -> None:
        start.wait()
        x_t = torch.randn(1, c.seq_len, c.motion_dim, device=device)
        with torch.inference_mode():
            sample(lambda x, t: guided_denoise(denoiser, x, cond_frame, cond, t, 2.0), sampler, x_t)
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()

    walls = []
    for _ in range(3):
        start = threading.Barrier(sessions + 1)
        threads = [threading.Thread(target=window, args=(start,)) for _ in range(sessions)]
        for t in threads:
            t.start()
        start.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        walls.append(time.perf_counter() - t0)
    ms = 1000.0 * statistics.median(walls)
    stats = denoiser.stats.requests_per_call if shared else 1.0
    return {"ms_all_windows": round(ms, 2), "ms_per_window": round(ms / sessions, 2), "steps_per_call": round(stats, 2)}


# --- the suite ----------------------------------------------------------------------------------------------


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, rows in [*results.get("warp_decode", {}).items(), *results.get("warp_decode_compile", {}).items()]:
        if not isinstance(rows, dict) or "error" in rows or "skipped" in rows:
            continue
        batches = sorted(int(b) for b in rows)
        ax.plot(batches, [rows[str(b)]["ms_per_frame"] for b in batches], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (frames per call)")
    ax.set_ylabel("ms per frame (warp + decode, 512x512)")
    ax.set_title(results.get("device", ""))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--dry-run", action="store_true", help="tiny networks, one repeat: checks that it all runs")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting new measurements after this")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--worker-s", type=float, default=4.0)
    parser.add_argument("--tests-timeout-s", type=float, default=240.0)
    parser.add_argument("--skip", nargs="*", default=[], help="steps to leave out")
    args = parser.parse_args()
    if args.dry_run:
        args.repeats, args.warmup, args.batches, args.sessions, args.worker_s = 1, 0, [1, 2], [1, 2], 0.5
    started = time.monotonic()
    deadline = started + args.budget_s
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    env = environment(str(device))
    results: dict[str, Any] = {"device": env["device"]}
    skipped: dict[str, str] = {}
    steps: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    nets_box: dict[str, liveportrait.LivePortraitNets] = {}

    def nets() -> liveportrait.LivePortraitNets:
        if "nets" not in nets_box:
            nets_box["nets"] = liveportrait.build("tiny" if args.dry_run else "liveportrait")
        return nets_box["nets"]

    steps = [
        ("cuda_tests", lambda: step_cuda_tests(args)),
        ("kernels", lambda: step_kernels(args, device)),
        ("warp_decode", lambda: step_warp_decode(args, device, nets(), deadline)),
        ("worker", lambda: step_worker(args, device, nets(), deadline)),
        ("lmdm", lambda: step_lmdm(args, device)),
        # last: compiling takes minutes per shape, and the budget may be spent by then
        ("warp_decode_compile", lambda: step_warp_decode(args, device, nets(), deadline, compiled=True)),
    ]
    for name, run in steps:
        if name in args.skip:
            skipped[name] = "--skip"
            continue
        if time.monotonic() > deadline:
            skipped[name] = "time budget spent"
            continue
        t0 = time.monotonic()
        try:
            results[name] = run()
            results[name + "_wall_s"] = round(time.monotonic() - t0, 1)
        except Skip as exc:
            skipped[name] = str(exc)
        except Exception as exc:  # one broken step must not lose the others' numbers
            skipped[name] = f"failed: {type(exc).__name__}: {exc}"[:500]
        print(
            f"[{time.monotonic() - started:6.1f} s] {name}: {'done' if name in results else skipped[name]}", flush=True
        )
    if device.type == "cuda":
        results["memory"] = {"peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    record = {
        "benchmark": "gpu_suite",
        "device": env["device"],
        "commit": env["commit"],
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "kernels": kernels.unavailable_reason() or "available",
        "results": results,
        "skipped": skipped,
        "wall_s": round(time.monotonic() - started, 1),
        "environment": env,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "dry" if args.dry_run else device.type
    path = write_result(args.out / f"gpu_suite_{tag}.json", record)
    try:
        plot({**results, "device": env["device"]}, path.with_suffix(".png"))
    except Exception as exc:
        record["skipped"]["plot"] = f"{type(exc).__name__}: {exc}"
        path.write_text(json.dumps(record, indent=2))
    print(json.dumps({k: v for k, v in record.items() if k != "environment"}, indent=1)[:6000])
    print(f"wrote {path}")
    if math.isfinite(args.budget_s) and os.environ.get("GPU_SUITE_STRICT") and skipped:
        sys.exit(1)


if __name__ == "__main__":
    main()
