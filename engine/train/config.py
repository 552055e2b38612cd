"""Training configuration: frozen dataclasses, read strictly from JSON (unknown keys are errors)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config import ConfigError, from_dict, to_dict

TASKS = ("heads", "adapter", "motion")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 100  # linear warm-up from 0
    schedule: str = "cosine"  # cosine (down to min_lr_ratio x lr at the last step) | constant
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global gradient norm (0: off)

    def __post_init__(self) -> None:
        if not self.lr > 0 or self.weight_decay < 0 or not 0 <= self.beta1 < 1 or not 0 <= self.beta2 < 1:
            raise ValueError(f"invalid optimiser settings: {self}")
        if self.warmup_steps < 0 or self.schedule not in SCHEDULES or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"invalid schedule: warmup {self.warmup_steps}, {self.schedule!r}, {self.min_lr_ratio}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0, got {self.grad_clip}")


@dataclass(frozen=True)
class HeadsTaskConfig:
    space: str = "auto"  # mesh | keypoints | auto (keypoints when the dataset has them)
    bands: int = 16
    past: int = 4
    future: int = 2
    pose_context: int = 2
    pose_smooth: float = 3.0
    hidden: int = 128
    input_noise: float = 0.1
    reference_seconds: float = 120.0  # pose track kept for the runtime


@dataclass(frozen=True)
class DiffusionTaskConfig:
    base: str | None = None  # Ditto store to start from (None: the preset, untrained)
    preset: str = "tiny"  # LMDM preset when there is no base
    audio: str = "auto"  # logmel | hubert | auto (what the base's condition width says)
    cond_drop: float = 0.1  # classifier-free guidance: share of samples trained without the condition
    velocity_weight: float = 0.0  # extra loss on frame-to-frame differences of x0
    adapter_mid: int = 64  # EAT adapter hidden width

    def __post_init__(self) -> None:
        if not 0 <= self.cond_drop < 1 or self.velocity_weight < 0 or self.adapter_mid < 1:
            raise ValueError(f"invalid diffusion task settings: {self}")
        if self.audio not in ("auto", "logmel", "hubert"):
            raise ValueError(f"audio must be auto, logmel or hubert, got {self.audio!r}")


@dataclass(frozen=True)
class TrainConfig:
    task: str = "heads"
    steps: int = 2000
    batch: int = 64  # global batch: split evenly over the processes
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: float = 0.999  # decay of the exponential moving average of the weights (0: off); exported when on
    precision: str = "auto"  # auto: bf16 autocast on a GPU that has it, else fp32
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # CPU threads per process (0: torch's default); small heads train fastest on 1
    seed: int = 0
    val_every: int = 100
    val_batches: int = 4
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    log_every: int = 10
    heads: HeadsTaskConfig = field(default_factory=HeadsTaskConfig)
    diffusion: DiffusionTaskConfig = field(default_factory=DiffusionTaskConfig)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.steps < 1 or self.batch < 1 or not 0 <= self.ema < 1 or self.precision not in PRECISIONS:
            raise ValueError(
                f"invalid training settings: steps {self.steps}, batch {self.batch}, ema {self.ema}, "
                f"precision {self.precision!r}"
            )
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        for name in ("val_every", "val_batches", "checkpoint_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def as_dict(self) -> dict[str, Any]:
        return to_dict(self)


def load_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` from a JSON file (optional) with ``overrides`` on top (dotted keys for nested
    sections, e.g. ``{"optim.lr": 3e-4}``). Raises :class:`engine.config.ConfigError`."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: unreadable training config ({exc})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a training config is a JSON object")
    for key, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {p} is not a section")
        node[leaf] = value
    return from_dict(TrainConfig, data)
