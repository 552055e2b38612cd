"""Backend benchmark: per-module latency (warm-up, median, p90, p99), frames/s of the per-frame path and peak
memory, for one or more backends on one preset; JSON with device, commit and config, plus a PNG plot.

Frames/s is ``batch / median(warping_decoder)``: the per-frame path is warp + decode (appearance and motion run
once per avatar). Peak memory is the CUDA allocator's peak over a module's load and first call on GPUs; on CPU it
is the process's peak resident set after them (monotonic over the run: it bounds rather than isolates a module).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.models import liveportrait
from engine.motion import lmdm
from export.backends import Backend, BackendConfig, BackendError, Runner, get_backend
from export.graphs import RENDERER_GRAPHS, Graph, build_heads, denoiser_graph, head_graphs, renderer_graphs
from streaming.measure.info import environment, load_average, write_result

DEFAULT_MODULES: tuple[str, ...] = (
    "appearance",
    "motion",
    "warping",
    "decoder",
    "warping_decoder",
    "stitching",
    "lmdm",
    "lip_head",
)
LMDM_PRESET = {"tiny": "tiny", "liveportrait": "ditto"}
BLOCK = 10  # consecutive timed calls of one backend


@dataclass(frozen=True)
class BenchConfig:
    backends: tuple[str, ...] = ("eager", "onnxruntime")
    preset: str = "tiny"
    batch: int = 1
    device: str = "cpu"
    warmup: int = 3
    iters: int = 20
    modules: tuple[str, ...] = DEFAULT_MODULES
    threads: int = field(default_factory=torch.get_num_threads)

    def __post_init__(self) -> None:
        if self.batch < 1 or self.warmup < 0 or self.iters < 1:
            raise ValueError(f"need batch >= 1, warmup >= 0, iters >= 1; got {self.batch}, {self.warmup}, {self.iters}")
        if not self.backends:
            raise ValueError("give at least one backend")


def bench_graphs(preset: str, modules: Sequence[str]) -> dict[str, Graph]:
    """The graphs to time, on deterministic random weights (timings do not depend on the values)."""
    nets = liveportrait.build(preset)
    renderer = [m for m in modules if m in RENDERER_GRAPHS]
    graphs = renderer_graphs(nets, "standard", names=renderer)
    if "lmdm" in modules:
        graphs["lmdm"] = denoiser_graph(lmdm.build(LMDM_PRESET.get(preset, "tiny")))
    heads = [m for m in modules if m.endswith("_head")]
    if heads:
        graphs.update({k: v for k, v in head_graphs(build_heads()).items() if k in heads})
    unknown = [m for m in modules if m not in graphs]
    if unknown:
        raise ValueError(f"unknown module(s) {unknown} to benchmark")
    return {m: graphs[m] for m in modules}


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stats(times_ms: list[float], warmup: int) -> dict[str, Any]:
    ms = np.asarray(times_ms)
    return {
        "median_ms": float(np.median(ms)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "min_ms": float(ms.min()),
        "iters": len(times_ms),
        "warmup": warmup,
    }


def _timed(run: Runner, inputs: tuple[torch.Tensor, ...], device: torch.device) -> float:
    start = time.perf_counter()
    run(*inputs)
    _sync(device)
    return (time.perf_counter() - start) * 1000


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Times every module on every backend, alternating between the backends in short blocks (see
    :func:`_bench_module`) so the comparison survives a changing machine load."""
    device = torch.device(config.device)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        env = environment(config.device)  # before the work: the load average the timings ran under
        graphs = bench_graphs(config.preset, config.modules)
        backends = {}
        for name in config.backends:
            options: dict[str, Any] = {"threads": config.threads} if name == "onnxruntime" else {}
            # raises with the list of usable backends; fp32 so backends are compared on the same maths
            backends[name] = get_backend(BackendConfig(name, str(device), "fp32", options))
        per_module = {name: {} for name in backends}  # type: dict[str, dict[str, Any]]
        for module, graph in graphs.items():
            for name, stats in _bench_module(backends, graph, config, device).items():
                per_module[name][module] = stats
    finally:
        torch.set_num_threads(previous_threads)
    results = {}
    for name, modules in per_module.items():
        frame = modules.get("warping_decoder", {})
        fps = config.batch * 1000 / frame["median_ms"] if "median_ms" in frame else None
        results[name] = {"modules": modules, "frames_per_s": fps}
    return {
        "benchmark": "backends",
        "environment": env,
        "config": asdict(config),
        "versions": _versions(),
        "untrained_weights": True,
        # the CPU machines these run on are shared: a high load average means noisy timings
        "load_average_1min_after": load_average(),
        "results": results,
    }


def _bench_module(
    backends: dict[str, Backend], graph: Graph, config: BenchConfig, device: torch.device
) -> dict[str, dict[str, Any]]:
    inputs = tuple(t.to(device) for t in graph.example_inputs(config.batch))
    out: dict[str, dict[str, Any]] = {}
    runners: dict[str, Runner] = {}
    for name, backend in backends.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        try:
            runners[name] = backend.load(graph, batch=config.batch)
            runners[name](*inputs)  # first call: compilation / session warm-up, reported separately
        except BackendError as exc:
            out[name] = {"error": str(exc)}
            continue
        _sync(device)
        out[name] = {"load_s": time.perf_counter() - start, "peak_memory_mb": _peak_memory_mb(device)}
    for run in runners.values():
        for _ in range(config.warmup):
            run(*inputs)
    # blocks of BLOCK timed calls per backend in turn, each after one untimed call: a load change during the run
    # hits every backend alike, and no backend is timed on thread pools the other one just put to sleep
    times: dict[str, list[float]] = {name: [] for name in runners}
    while any(len(t) < config.iters for t in times.values()):
        for name, run in runners.items():
            run(*inputs)
            _sync(device)
            for _ in range(min(BLOCK, config.iters - len(times[name]))):
                times[name].append(_timed(run, inputs, device))
    for name in runners:
        out[name].update(_stats(times[name], config.warmup))
    return out


def _versions() -> dict[str, str]:
    """Runtime libraries beyond the torch and python versions that ``environment()`` records."""
    out: dict[str, str] = {}
    try:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return out


def write_plot(report: dict[str, Any], path: Path) -> None:
    """Grouped bars: median latency per module and backend, whiskers to p90 (log scale: modules span decades)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = list(report["results"])
    modules = list(report["config"]["modules"])
    width = 0.8 / len(backends)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(modules)), 4.0))
    for i, name in enumerate(backends):
        stats = [report["results"][name]["modules"].get(m, {}) for m in modules]
        med = [s.get("median_ms", np.nan) for s in stats]
        p90 = [s.get("p90_ms", np.nan) for s in stats]
        xs = np.arange(len(modules)) + (i - (len(backends) - 1) / 2) * width
        err = np.clip(np.asarray(p90) - np.asarray(med), 0, None)
        fps = report["results"][name]["frames_per_s"]
        label = f"{name} ({fps:.1f} frames/s)" if fps else name
        ax.bar(xs, med, width, yerr=[np.zeros_like(err), err], capsize=2, label=label)
    ax.set_xticks(np.arange(len(modules)), modules, rotation=20)
    ax.set_yscale("log")
    ax.set_ylabel("latency per call (ms, median; whisker p90)")
    cfg, device = report["config"], report["environment"]["device"]
    ax.set_title(f"{cfg['preset']} preset, batch {cfg['batch']}, {device} ({cfg['threads']} threads)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict[str, Any], json_path: Path, plot_path: Path | None) -> None:
    write_result(json_path, report)
    if plot_path is not None:
        write_plot(report, plot_path)
