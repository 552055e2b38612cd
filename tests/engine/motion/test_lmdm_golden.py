"""Golden parity with Ditto's LMDM (spec ditto_lmdm.md §7): golden-init weights saved as Ditto saves them,
imported through the real CLI, loaded with ``lmdm.load``; denoiser, guidance and 10-step DDIM within 1e-4."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from engine.motion import lmdm
from engine.motion.samplers import DDIMSampler, guided_denoise, sample
from engine.motion.schedule import cosine_alphas_cumprod
from engine.weights.deterministic import deterministic_state_dict
from streaming.cli import main

TOL = 1e-4
pytestmark = pytest.mark.slow  # full-size network (48M parameters): ~5 s alone, far more on a busy machine


@pytest.fixture(scope="module")
def golden(golden_dir: Path) -> dict[str, torch.Tensor]:
    with np.load(golden_dir / "lmdm_golden.npz") as data:
        return {k: torch.from_numpy(data[k]) for k in data.files}


@pytest.fixture(scope="module")
def denoiser(golden_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> lmdm.MotionDecoder:
    entries = [(k, tuple(s)) for k, s, _ in json.loads((golden_dir / "lmdm_manifest.json").read_text())["entries"]]
    # spec §2.1: one constructor-valued buffer, stored under all 11 names (shared, as torch.save keeps it)
    freqs = 1.0 / (10000 ** (torch.arange(0, 512, 2).float() / 512))
    rotary = [k for k, _ in entries if k.endswith("rotary.freqs")]
    assert len(rotary) == 11
    state = deterministic_state_dict(entries, keep={k: freqs for k in rotary})
    state.update({k: freqs for k in rotary})
    src = tmp_path_factory.mktemp("ditto")
    torch.save({"model_state_dict": state}, src / "lmdm_v0.4_hubert.pth")
    dst = tmp_path_factory.mktemp("store") / "ditto"
    result = CliRunner().invoke(main, ["weights", "import", "ditto", str(src), "--out", str(dst)])
    assert result.exit_code == 0, result.output
    assert "LMDM denoiser (preset ditto)" in result.output
    model = lmdm.load(dst)
    assert not model.untrained
    return model


def _inputs(golden: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return golden["input.x"], golden["input.cond_frame"], golden["input.cond"], golden["input.t"].long()


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max())


def test_denoiser_cond_and_uncond(denoiser: lmdm.MotionDecoder, golden: dict[str, torch.Tensor]) -> None:
    x, cf, c, t = _inputs(golden)
    assert t.tolist() == [499]
    with torch.no_grad():
        assert _max_err(denoiser(x, cf, c, t, drop_cond=False), golden["denoiser.cond"]) <= TOL
        assert _max_err(denoiser(x, cf, c, t, drop_cond=True), golden["denoiser.uncond"]) <= TOL


def test_guided_w2_batched(denoiser: lmdm.MotionDecoder, golden: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        guided = guided_denoise(denoiser, *_inputs(golden), weight=2.0)
    assert _max_err(guided, golden["denoiser.guided_w2"]) <= TOL


def test_ddim10_eta1(denoiser: lmdm.MotionDecoder, golden: dict[str, torch.Tensor]) -> None:
    _, cf, c, _ = _inputs(golden)
    sampler = DDIMSampler(cosine_alphas_cumprod(), eta=1.0, spacing="ditto")
    sampler.set_timesteps(10)
    assert sampler.timesteps == [int(v) for v in golden["ddim10.times"].tolist()]
    noises = [golden[f"ddim10.noise{i}"] for i in range(9)]
    with torch.no_grad():
        out = sample(lambda x, t: guided_denoise(denoiser, x, cf, c, t, 2.0), sampler, golden["ddim10.x_T"], noises)
    assert _max_err(out, golden["ddim10.sample"]) <= TOL
