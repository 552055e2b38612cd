"""``engine eval RUN DS``: a trained run on a dataset's held-out clips -> ``metrics.json`` and ``eval.png``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from engine.motion.personal_model import PersonalModelError
from engine.train.shards import DatasetError
from engine.weights.checkpoint import CheckpointError
from streaming.measure.eval import EvalError, evaluate, plot_eval


@click.command("eval")
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--split", type=click.Choice(["val", "train"]), default="val", show_default=True)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where metrics.json and eval.png go (default: RUN/eval).",
)
def eval_command(run: Path, dataset: Path, split: str, out: Path | None) -> None:
    """Evaluate RUN (an 'engine train' run or a personal model folder) on DATASET's held-out clips."""
    try:
        report, extra = evaluate(run, dataset, split)
    except (EvalError, DatasetError, CheckpointError, PersonalModelError) as exc:
        raise click.ClickException(str(exc)) from exc
    out = out or run / "eval"
    out.mkdir(parents=True, exist_ok=True)
    data = report.as_dict()
    (out / "metrics.json").write_text(json.dumps(data, indent=1))
    plot_eval(report, extra, out / "eval.png")
    headline = {k: v for k, v in data.items() if k != "per_clip"}
    click.echo(json.dumps(headline, indent=1))
    click.echo(f"wrote {out / 'metrics.json'} and {out / 'eval.png'}")
