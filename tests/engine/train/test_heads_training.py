"""Dataset-scale training of the displacement heads on planted mappings (synthetic shards, no video).

* A planted linear audio -> lip map (and pose -> head map): the validation error must drop at least 10x and the
  trained LADP, probed with fresh inputs, must reproduce the planted matrix (least-squares fit of its outputs
  on the inputs within 10 % relative Frobenius error).
* IEDP on 8 planted emotion offsets (4 speakers, 3 for training): the held-out speaker's clips are classified
  by the nearest learned offset, at least 95 % right.
* Resume: a run stopped at step 20 and resumed gives the uninterrupted run's loss curve.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config import ConfigError
from engine.keypoints import LIP
from engine.motion.emotion import EMOTIONS
from engine.motion.personal_model import PersonalModel
from engine.train.config import TrainConfig, load_config
from engine.train.samples import clip_data, head_inputs, norms_of
from engine.train.shards import Dataset
from engine.train.tasks import HeadsTask
from engine.train.trainer import train
from streaming.measure.eval import evaluate_heads

from .synthetic import clip_arrays, planted, write_dataset


def _config(steps: int, **extra: object) -> TrainConfig:
    settings: dict[str, object] = {"steps": steps, "batch": 128, "ema": 0.0, "val_every": 50, "threads": 1}
    settings.update({"checkpoint_every": 1000, "optim.lr": 3e-3, "optim.warmup_steps": 20, "heads.pose_smooth": 0.0})
    settings.update(extra)
    return load_config(None, task="heads", **settings)


def test_planted_linear_mapping_is_learned(tmp_path: Path) -> None:
    plant = planted(0)
    specs = [{"frames": 400, "split": "train"} for _ in range(4)] + [{"frames": 300, "split": "val"}]
    write_dataset(tmp_path / "ds", plant, specs)
    config = _config(400)
    task = HeadsTask(Dataset(tmp_path / "ds"), config)
    result = train(task, config, tmp_path / "run")
    assert result.val_initial is not None and result.val_loss is not None
    assert result.val_loss * 10 <= result.val_initial, (result.val_initial, result.val_loss)
    # recovered: probe the exported LADP with fresh audio (the face of a training speaker: five faces do not teach
    # it other faces) and fit a linear map to its outputs
    model = PersonalModel.load(tmp_path / "run" / "mesh")
    ds = Dataset(tmp_path / "ds")
    arrays, inputs = clip_arrays(plant, np.random.default_rng(7), 600, ds.arrays(ds.clips[0])["mesh/geometry"])
    clip = clip_data(arrays, "mesh", {"id": "probe"})
    lip_x, _ = head_inputs(clip, model.config, norms_of(model.heads), clip.geometry)
    with torch.no_grad():
        out = model.heads.lip_offsets(torch.from_numpy(lip_x)).numpy()[:, list(LIP), :2].reshape(600, -1)
    design = np.concatenate([inputs, np.ones((600, 1))], 1)
    coef, *_ = np.linalg.lstsq(design, out, rcond=None)
    recovered = coef[:-1].T  # [12, N_IN]
    error = np.linalg.norm(recovered - plant.lip) / np.linalg.norm(plant.lip)
    assert error < 0.10, error
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


def test_iedp_classifies_held_out_emotions(tmp_path: Path) -> None:
    plant = planted(1)
    specs = []
    for s in range(4):
        for e in EMOTIONS:
            specs.append({"frames": 60, "speaker": f"spk{s}", "emotion": e, "noise": 0.01, "pauses": True,
                          "split": "val" if s == 3 else "train"})  # fmt: skip
    write_dataset(tmp_path / "ds", plant, specs, seed=1)
    config = _config(300)
    train(HeadsTask(Dataset(tmp_path / "ds"), config), config, tmp_path / "run")
    report, _ = evaluate_heads(tmp_path / "run", Dataset(tmp_path / "ds"), "val")
    assert report.emotion_clips == 8
    assert report.emotion_accuracy is not None and report.emotion_accuracy >= 0.95, report.emotion_accuracy
    # an untrained IEDP does not classify them (chance is 1 in 8)
    model = PersonalModel.load(tmp_path / "run" / "mesh")
    with torch.no_grad():
        for p in model.heads.emotion.parameters():  # type: ignore[union-attr]
            p.copy_(torch.randn_like(p) * 0.1)
    model.save(tmp_path / "run" / "mesh")
    untrained, _ = evaluate_heads(tmp_path / "run", Dataset(tmp_path / "ds"), "val")
    assert untrained.emotion_accuracy is not None and untrained.emotion_accuracy <= 0.5


def test_resume_continues_the_same_curve(tmp_path: Path) -> None:
    write_dataset(tmp_path / "ds", planted(2), [{"frames": 200, "split": "train"} for _ in range(2)])
    ds = Dataset(tmp_path / "ds")
    config = _config(40, checkpoint_every=10)
    train(HeadsTask(ds, config), config, tmp_path / "whole")
    train(HeadsTask(ds, config), config, tmp_path / "parts", stop_after=20)
    partial = [h for h in _history(tmp_path / "parts") if "loss" in h]
    assert len(partial) == 20
    train(HeadsTask(ds, config), config, tmp_path / "parts")
    whole = [h["loss"] for h in _history(tmp_path / "whole") if "loss" in h]
    resumed = [h["loss"] for h in _history(tmp_path / "parts") if "loss" in h]
    assert len(resumed) == len(whole) == 40
    np.testing.assert_allclose(resumed, whole, rtol=1e-5)


def _history(run: Path) -> list[dict[str, float]]:
    return json.loads((run / "history.json").read_text())


@pytest.mark.parametrize("bad", [{"task": "nope"}, {"batch": 0}, {"optim.lr": -1.0}, {"unknown": 1}])
def test_bad_configs_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        load_config(None, **bad)
