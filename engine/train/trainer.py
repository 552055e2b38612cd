"""The training loop shared by every task: AdamW, warm-up + cosine schedule, EMA, gradient clipping, mixed
precision on a GPU, per-step seeds, safetensors checkpoints with resume, validation, a loss-curve PNG.

One process or many: under ``torchrun`` (``WORLD_SIZE`` > 1) the processes join ``torch.distributed`` (NCCL on
GPUs, gloo on CPUs) and the model is wrapped in ``DistributedDataParallel``. Every process draws the same global
batch from a generator seeded by ``(seed, step)`` and keeps its own equal slice, and DDP averages the gradients,
so N processes follow the loss curve of one process with the same global batch (up to float summation order).
The same per-step seeding makes a resumed run continue the curve it was checkpointed on.

Run folder ``RUN/``: ``config.json``, ``history.json`` (per-step loss, learning rate, validation), ``loss.png``,
``checkpoints/step-NNNNNN/`` (model, EMA, optimiser as safetensors + ``state.json``), and what the task exports.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from matplotlib.figure import Figure
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from engine.train.config import TrainConfig
from engine.train.shards import write_json_atomic

CHECKPOINTS = "checkpoints"


class TrainError(RuntimeError):
    """Training cannot start or continue (bad data for the task, a checkpoint of another run); says why."""


class Task(Protocol):
    name: str

    def build_model(self) -> nn.Module: ...

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        """The parameters the optimiser updates (the rest stays frozen)."""
        ...

    def sample(self, generator: torch.Generator, batch: int, lo: int, hi: int) -> Any:
        """Samples ``lo .. hi - 1`` of a global batch of ``batch`` drawn with ``generator``."""
        ...

    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, Tensor]]: ...

    def validation(self, count: int) -> list[Any]:
        """Fixed validation batches (the same every call)."""
        ...

    def export(self, model: nn.Module, out: Path) -> dict[str, Any]:
        """Write what the run produces (a usable model) into ``out``; returns facts for the summary."""
        ...


@dataclass(frozen=True)
class DistEnv:
    world: int
    rank: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_env() -> DistEnv:
    return DistEnv(
        int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    )


def pick_device(config: TrainConfig, env: DistEnv) -> torch.device:
    if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise TrainError(f"device {config.device!r} asked for, but no CUDA GPU is available")
    if config.device.startswith("cuda:"):
        return torch.device(config.device)
    return torch.device("cuda", env.local_rank % torch.cuda.device_count())


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: plain fp32)."""
    if config.precision == "fp32" or (config.precision == "auto" and device.type != "cuda"):
        return None
    if config.precision == "fp16":
        return torch.float16
    if config.precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def learning_rate(config: TrainConfig, step: int) -> float:
    """Learning rate of ``step`` (0-based): linear warm-up, then cosine to ``min_lr_ratio`` or constant."""
    o = config.optim
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    span = max(1, config.steps - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / span)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator every process uses to draw step ``step``'s global batch."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(to_device(b, device) for b in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


# --- checkpoints ------------------------------------------------------------------------------------------------


def _optim_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    state = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optim(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for name, value in meta.get("scalars", {}).items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def latest_checkpoint(out: Path) -> Path | None:
    root = out / CHECKPOINTS
    found = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file()) if root.is_dir() else []
    return found[-1] if found else None


def _save_checkpoint(
    out: Path,
    step: int,
    model: nn.Module,
    ema: Sequence[Tensor] | None,
    opt: torch.optim.Optimizer,
    history: list[dict[str, Any]],
    config: TrainConfig,
) -> Path:
    root = out / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # clones: some models share a buffer under several names (LMDM's rotary frequencies), which safetensors refuses
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"))
    if ema is not None:
        save_file({str(i): t.detach().cpu().contiguous() for i, t in enumerate(ema)}, str(tmp / "ema.safetensors"))
    tensors, meta = _optim_tensors(opt)
    save_file(tensors, str(tmp / "optim.safetensors"))
    write_json_atomic(tmp / "state.json", {"step": step, "optim": meta, "history": history, "config": config.as_dict()})
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    kept = sorted(p for p in root.glob("step-*"))
    for old in kept[: -config.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# --- the loop ---------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    out: Path
    steps: int
    world: int
    seconds: float
    steps_per_s: float
    final_loss: float
    val_loss: float | None
    val_initial: float | None
    exported: dict[str, Any]


def _val_loss(task: Task, model: nn.Module, batches: Sequence[Any], device: torch.device) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        losses = [float(task.loss(model, to_device(b, device))[0]) for b in batches]
    model.train(was)
    return sum(losses) / max(len(losses), 1)


def plot_history(history: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Training loss per step and the validation points, log scale."""
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    steps = [h["step"] for h in history if "loss" in h]
    ax.plot(steps, [h["loss"] for h in history if "loss" in h], lw=0.8, label="train")
    val = [(h["step"], h["val"]) for h in history if "val" in h]
    if val:
        ax.plot(*zip(*val, strict=True), "o-", ms=3, label="validation")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def train(
    task: Task,
    config: TrainConfig,
    out: str | Path,
    *,
    resume: bool = True,
    stop_after: int | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> RunResult:
    """Train ``task`` into the run folder ``out`` (see the module docstring). ``resume``: continue from the
    folder's latest checkpoint. ``stop_after``: end (after checkpointing) at this step, as if interrupted."""
    out = Path(out)
    env = dist_env()
    own_group = False
    if env.world > 1 and not dist.is_initialized():
        backend = "nccl" if config.device != "cpu" and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        own_group = True
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _train(task, config, out, env, resume, stop_after, progress)
    finally:
        torch.set_num_threads(threads)
        if own_group:
            dist.destroy_process_group()


def _train(
    task: Task,
    config: TrainConfig,
    out: Path,
    env: DistEnv,
    resume: bool,
    stop_after: int | None,
    progress: Callable[[int, float], None] | None,
) -> RunResult:
    if config.batch % env.world:
        raise TrainError(f"the global batch {config.batch} must divide evenly over {env.world} processes")
    device = pick_device(config, env)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's collectives run on the current device
    amp = autocast_dtype(config, device)
    if env.main:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "config.json", {**config.as_dict(), "world": env.world})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = task.build_model().to(device)
    params = task.trainable(model)
    if not params:
        raise TrainError(f"task {task.name!r} has nothing to train")
    opt = torch.optim.AdamW(
        params,
        lr=config.optim.lr,
        betas=(config.optim.beta1, config.optim.beta2),
        weight_decay=config.optim.weight_decay,
    )
    ema = [p.detach().clone() for p in params] if config.ema > 0 else None
    history: list[dict[str, Any]] = []
    start = 0
    checkpoint = latest_checkpoint(out) if resume else None
    if checkpoint is not None:
        state = json.loads((checkpoint / "state.json").read_text())
        if state["config"] != config.as_dict():
            raise TrainError(f"{checkpoint}: a checkpoint of another configuration; use a new --out or --no-resume")
        model.load_state_dict(load_file(str(checkpoint / "model.safetensors"), device=str(device)))
        _restore_optim(opt, load_file(str(checkpoint / "optim.safetensors"), device=str(device)), state["optim"])
        if ema is not None:
            saved = load_file(str(checkpoint / "ema.safetensors"), device=str(device))
            ema = [saved[str(i)] for i in range(len(ema))]
        history = list(state["history"])
        start = int(state["step"])
    ddp: nn.Module = model
    if env.world > 1:
        # kernel-1 convolutions give gradients with other strides than DDP's buckets: harmless, only a copy
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 and device.type == "cuda" else None
    per_rank = config.batch // env.world
    lo, hi = env.rank * per_rank, (env.rank + 1) * per_rank
    val_batches = task.validation(config.val_batches) if env.main else []

    def evaluate() -> float:
        backup = [p.detach().clone() for p in params] if ema is not None else None
        if ema is not None:
            for p, e in zip(params, ema, strict=True):
                p.data.copy_(e)
        value = _val_loss(task, model, val_batches, device)
        if backup is not None:
            for p, b in zip(params, backup, strict=True):
                p.data.copy_(b)
        return value

    val_initial = None
    if env.main and start == 0 and val_batches:
        val_initial = evaluate()
        history.append({"step": 0, "val": val_initial})
    elif history and "val" in history[0]:
        val_initial = history[0]["val"]
    model.train()
    started = time.perf_counter()
    last = math.nan
    end = config.steps if stop_after is None else min(config.steps, stop_after)
    for step in range(start, end):
        for group in opt.param_groups:
            group["lr"] = learning_rate(config, step)
        torch.manual_seed(config.seed * 1_000_003 + step * 101 + env.rank)  # dropout etc.: same on resume
        batch = to_device(task.sample(step_generator(config.seed, step), config.batch, lo, hi), device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss, parts = task.loss(ddp, batch)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        if config.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, config.optim.grad_clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        if ema is not None:
            decay = min(config.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema, params, strict=True):
                    e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        values = torch.stack([loss.detach().float(), *(v.detach().float() for v in parts.values())])
        if env.world > 1:
            dist.all_reduce(values)
            values /= env.world
        last = float(values[0])
        done = step + 1
        if env.main:
            entry = {"step": done, "loss": last, "lr": learning_rate(config, step)}
            entry.update({k: float(v) for k, v in zip(parts, values[1:], strict=True)})
            history.append(entry)
            if done % config.val_every == 0 or done == config.steps:
                history[-1]["val"] = evaluate()
            if progress is not None and (done % config.log_every == 0 or done == end):
                progress(done, last)
        if done % config.checkpoint_every == 0 or done == end:
            if env.main:
                _save_checkpoint(out, done, model, ema, opt, history, config)
            if env.world > 1:
                dist.barrier()
    seconds = time.perf_counter() - started
    exported: dict[str, Any] = {}
    val_loss = next((h["val"] for h in reversed(history) if "val" in h), None)
    if env.main:
        write_json_atomic(out / "history.json", history)
        plot_history(history, out / "loss.png", f"{task.name}: {config.steps} steps, batch {config.batch}")
        if end == config.steps:
            if ema is not None:
                for p, e in zip(params, ema, strict=True):
                    p.data.copy_(e)
            model.eval()
            exported = task.export(model, out)
    if env.world > 1:
        dist.barrier()
    steps_done = end - start
    return RunResult(
        out,
        end,
        env.world,
        round(seconds, 3),
        round(steps_done / max(seconds, 1e-9), 3),
        last,
        val_loss,
        val_initial,
        exported,
    )
