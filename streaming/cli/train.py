"""``engine train {heads,adapter,motion} DS --out RUN``: dataset-scale training on one or many processes.

Multi-GPU / multi-node: launch the same command with ``torchrun`` (it sets ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``; the processes join with NCCL on GPUs, gloo on CPUs)::

    torchrun --nproc-per-node 4 -m streaming.cli train motion DS --out RUN --batch 256
    torchrun --nnodes 2 --node-rank 0 --master-addr HOST --nproc-per-node 8 -m streaming.cli train motion ...

What a run gives: ``heads`` -> ``RUN/<space>/personal.json`` (``engine personalize --from RUN --avatar NAME`` or
``--init RUN``); ``motion`` and ``adapter`` -> ``RUN`` is a Ditto store (``engine render --motion ditto
--motion-weights RUN``, or ``engine weights import ditto RUN``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from engine.config import ConfigError
from engine.train.config import PRECISIONS, TASKS, load_config
from engine.train.shards import Dataset, DatasetError
from engine.train.tasks import make_task
from engine.train.trainer import TrainError, dist_env
from engine.train.trainer import train as run_training
from engine.weights.checkpoint import CheckpointError


@click.command()
@click.argument("task", type=click.Choice(TASKS))
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Run folder.")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="A JSON training config (engine.train.config.TrainConfig; unknown keys are errors).",
)
@click.option("--steps", type=click.IntRange(1), default=None)
@click.option("--batch", type=click.IntRange(1), default=None, help="Global batch (split over the processes).")
@click.option("--lr", type=float, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--device", default=None, help="auto | cpu | cuda | cuda:N")
@click.option("--threads", type=click.IntRange(0), default=None, help="CPU threads per process (0: torch's default).")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None)
@click.option(
    "--base",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="motion / adapter: the Ditto store to start from (engine weights import ditto).",
)
@click.option("--space", type=click.Choice(["auto", "mesh", "keypoints"]), default=None, help="heads: motion space.")
@click.option("--no-resume", is_flag=True, help="Start over even when RUN holds checkpoints.")
@click.option("--no-progress", is_flag=True)
def train(
    task: str,
    dataset: Path,
    out: Path,
    config_file: Path | None,
    steps: int | None,
    batch: int | None,
    lr: float | None,
    seed: int | None,
    device: str | None,
    threads: int | None,
    precision: str | None,
    base: Path | None,
    space: str | None,
    no_resume: bool,
    no_progress: bool,
) -> None:
    """Train TASK (heads, adapter or motion) on the dataset DATASET into the run folder --out."""
    env = dist_env()
    overrides: dict[str, Any] = {
        "task": task,
        "steps": steps,
        "batch": batch,
        "optim.lr": lr,
        "seed": seed,
        "device": device,
        "precision": precision,
        "diffusion.base": str(base) if base is not None else None,
        "heads.space": space,
    }
    try:
        config = load_config(config_file, **overrides)
        job = make_task(Dataset(dataset), config)
        with tqdm(total=config.steps, unit="step", desc=task, disable=no_progress or not env.main) as bar:

            def progress(step: int, loss: float) -> None:
                bar.n = step
                bar.set_postfix(loss=f"{loss:.4g}")
                bar.refresh()

            result = run_training(job, config, out, resume=not no_resume, progress=progress)
    except (ConfigError, DatasetError, TrainError, CheckpointError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    if env.main:
        summary = {
            "out": str(result.out),
            "steps": result.steps,
            "processes": result.world,
            "seconds": result.seconds,
            "steps_per_s": result.steps_per_s,
            "final_loss": result.final_loss,
            "val_loss": result.val_loss,
            "val_initial": result.val_initial,
            **result.exported,
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        click.echo(json.dumps(summary, indent=1))
        click.echo(f"loss curve: {out / 'loss.png'}")
