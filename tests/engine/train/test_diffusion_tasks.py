"""The motion diffusion tasks on synthetic keypoint clips (the tiny LMDM preset, a few steps on a CPU).

* ``motion``: training lowers the validation loss, and the run folder is a Ditto store the runtime loads
  (``--motion-weights RUN``; trained, so no untrained banner) and ``engine weights import ditto RUN`` copies.
* ``adapter``: on a base trained on neutral clips only, EAT's adapter trains on emotional clips (planted
  expression offsets): its validation loss ends below its start (the adapter starts as the identity, i.e. the
  base), only the adapter changed, and the stored adapter, attached by the pipeline, moves the denoiser's output
  through its FiLM on the emotion condition. (On these few synthetic windows the gain is small: the previous
  frame already shows the clip's expression; the benchmark reports it.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from engine.motion import lmdm
from engine.motion.adapter import attach_stored_adapter
from engine.motion.emotion import emotion_soft_label
from engine.train.config import load_config
from engine.train.shards import Dataset
from engine.train.tasks import DiffusionTask
from engine.train.trainer import train
from streaming.cli import main
from streaming.pipelines import RuntimeConfig, build

from .synthetic import write_keypoint_dataset


def _config(task: str, steps: int, **extra: object) -> object:
    settings: dict[str, object] = {"steps": steps, "batch": 8, "ema": 0.0, "val_every": steps, "val_batches": 2}
    settings.update({"threads": 1, "checkpoint_every": 1000, "optim.lr": 2e-3, "optim.warmup_steps": 5})
    settings.update(extra)
    return load_config(None, task=task, **settings)


def test_motion_then_adapter(tmp_path: Path) -> None:
    write_keypoint_dataset(tmp_path / "neutral", [{"frames": 120, "split": "train"} for _ in range(3)], seed=0)
    emotional = [{"frames": 120, "split": "train", "emotion": e} for e in ("happy", "sad", "angry")]
    write_keypoint_dataset(tmp_path / "emotional", emotional, seed=0)

    motion_cfg = _config("motion", 40)
    result = train(DiffusionTask(Dataset(tmp_path / "neutral"), motion_cfg, "motion"), motion_cfg, tmp_path / "base")
    assert result.val_initial is not None and result.val_loss is not None
    assert result.val_loss < 0.7 * result.val_initial, (result.val_initial, result.val_loss)
    den = lmdm.load(tmp_path / "base")
    assert not den.untrained
    pipeline = build(RuntimeConfig(mode="neural", motion="ditto", motion_weights=str(tmp_path / "base")))
    assert not pipeline.motion_untrained
    imported = CliRunner().invoke(main, ["weights", "import", "ditto", str(tmp_path / "base"), "--out",
                                         str(tmp_path / "store")])  # fmt: skip
    assert imported.exit_code == 0, imported.output
    assert lmdm.load(tmp_path / "store").config == den.config

    adapter_cfg = _config("adapter", 60, **{"diffusion.base": str(tmp_path / "base"), "optim.lr": 5e-3})
    task = DiffusionTask(Dataset(tmp_path / "emotional"), adapter_cfg, "adapter")
    adapted = train(task, adapter_cfg, tmp_path / "adapter")
    assert adapted.val_initial is not None and adapted.val_loss is not None
    assert adapted.val_loss < adapted.val_initial, (adapted.val_initial, adapted.val_loss)

    # only the adapter trained: the exported denoiser is the base's
    base_state = lmdm.load(tmp_path / "base").state_dict()
    for k, v in lmdm.load(tmp_path / "adapter").state_dict().items():
        assert torch.equal(v, base_state[k]), k
    # attached from the store, it makes the denoiser's output depend on the emotion through its FiLM
    base, with_adapter = lmdm.load(tmp_path / "adapter"), lmdm.load(tmp_path / "adapter")
    assert attach_stored_adapter(with_adapter, tmp_path / "adapter") is not None
    gen = torch.Generator().manual_seed(0)
    c = den.config
    x = torch.randn(1, c.seq_len, c.motion_dim, generator=gen)
    frame = torch.zeros(1, c.motion_dim)
    t = torch.tensor([300])

    def out(model: lmdm.MotionDecoder, emotion: str) -> torch.Tensor:
        cond = torch.zeros(1, c.seq_len, c.cond_dim)
        cond[:, :, c.cond_dim - 79 : c.cond_dim - 71] = torch.from_numpy(emotion_soft_label(emotion))
        with torch.no_grad():
            return model.eval()(x, frame, cond, t)

    shift = {e: float((out(with_adapter, e) - out(base, e)).abs().mean()) for e in ("happy", "sad", "neutral")}
    assert min(shift.values()) > 1e-3, shift
    assert float((out(with_adapter, "happy") - out(with_adapter, "sad")).abs().mean()) > 0
    pipeline = build(RuntimeConfig(mode="neural", motion="ditto", motion_weights=str(tmp_path / "adapter")))
    assert not pipeline.motion_untrained


@pytest.mark.slow
def test_eval_of_a_motion_run(tmp_path: Path) -> None:
    """``engine eval`` on a motion run drives a held-out clip through the neural motion stage (lmd, lip sync)."""
    clips = [{"frames": 120, "split": "train"} for _ in range(2)] + [{"frames": 40, "split": "val"}]
    write_keypoint_dataset(tmp_path / "ds", clips, seed=2)
    config = _config("motion", 10)
    train(DiffusionTask(Dataset(tmp_path / "ds"), config, "motion"), config, tmp_path / "run")
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "run"), str(tmp_path / "ds")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert metrics["kind"] == "motion" and metrics["clips"] == 1 and metrics["split"] == "val"
    assert np.isfinite(metrics["lmd"]) and np.isfinite(metrics["lmd_rest"])
    assert (tmp_path / "run" / "eval" / "eval.png").is_file()
