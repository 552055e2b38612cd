"""``engine train heads`` -> ``engine eval`` -> ``engine personalize --from``, and the commands' clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from engine.avatar.face import haar_cascade_path
from engine.avatar.prepare import prepare_avatar
from engine.avatar.store import AvatarStore
from engine.motion.emotion import EMOTIONS
from streaming.cli import main
from tests.engine.train.synthetic import planted, write_dataset


def test_train_eval_attach(tmp_path: Path) -> None:
    specs = [{"frames": 80, "speaker": f"s{s}", "emotion": e, "noise": 0.01, "pauses": True,
              "split": "val" if s == 2 else "train"} for s in range(3) for e in EMOTIONS]  # fmt: skip
    write_dataset(tmp_path / "ds", planted(4), specs, seed=4)
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"threads": 1, "ema": 0.99, "heads": {"pose_smooth": 0.0}}))
    run = tmp_path / "run"
    args = ["train", "heads", str(tmp_path / "ds"), "--out", str(run), "--steps", "300", "--batch", "128"]
    result = CliRunner().invoke(main, [*args, "--config", str(config), "--lr", "0.003", "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_loss"] < summary["val_initial"] / 5
    assert (run / "loss.png").is_file() and (run / "mesh" / "personal.json").is_file()

    result = CliRunner().invoke(main, ["eval", str(run), str(tmp_path / "ds")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["split"] == "val" and metrics["clips"] == len(EMOTIONS)
    assert metrics["lmd"] < 0.7 * metrics["lmd_rest"]  # an unseen face after two training speakers (measured 0.64)
    assert metrics["emotion_accuracy"] >= 0.95 and metrics["emotion_clips"] == len(EMOTIONS)
    assert (run / "eval" / "eval.png").stat().st_size > 5000

    if haar_cascade_path() is None:
        return
    data = pytest.importorskip("skimage.data")
    Image.fromarray(np.asarray(data.astronaut(), np.uint8)).save(tmp_path / "a.png")
    AvatarStore().add(prepare_avatar(tmp_path / "a.png", "astro"))
    result = CliRunner().invoke(main, ["personalize", "--avatar", "astro", "--from", str(run)])
    assert result.exit_code == 0, result.output
    assert AvatarStore().personal_spaces("astro") == ("mesh",)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["personalize", "x.mp4", "--avatar", "nobody"], "no stored avatar named 'nobody'"),
        (["personalize", "x.mp4", "--avatar", "default"], "engine avatar add"),
        (["train", "motion", ".", "--out", "run"], "not a dataset"),
        (["dataset", "build", "missing-folder", "--out", "ds"], "no such file"),
    ],
)
def test_refusals_name_the_problem(
    args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert "Traceback" not in result.output
