"""Cosine schedule and the DDIM sampler (Ditto spacing), without any model."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from engine.motion.samplers import DDIMSampler, sample
from engine.motion.schedule import cosine_alphas_cumprod


@pytest.fixture(scope="module")
def alphas_cumprod() -> torch.Tensor:
    return cosine_alphas_cumprod()


def test_cosine_schedule_values(alphas_cumprod: torch.Tensor) -> None:
    assert alphas_cumprod.dtype == torch.float32 and alphas_cumprod.shape == (1000,)
    # closed form of the cosine schedule (float64); the float32 product stays within float32 rounding of it
    f = [math.cos((k / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2 for k in range(1001)]
    for t in (0, 99, 499, 900):
        assert alphas_cumprod[t].item() == pytest.approx(f[t + 1] / f[0], rel=1e-5)
    assert alphas_cumprod[999].item() == pytest.approx(2.43e-9, rel=0.01)  # last beta clipped to 0.999
    assert (alphas_cumprod[1:] < alphas_cumprod[:-1]).all()


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        (10, [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
        (50, list(range(999, 0, -20))),
        (1, [999]),
    ],
)
def test_ditto_timesteps(alphas_cumprod: torch.Tensor, steps: int, expected: list[int]) -> None:
    sampler = DDIMSampler(alphas_cumprod, eta=1.0)
    sampler.set_timesteps(steps)
    assert sampler.timesteps == expected
    assert sampler.next_timesteps == [*expected[1:], -1]
    assert sampler.noise_steps == steps - 1


def test_every_step_count_up_to_50_is_valid(alphas_cumprod: torch.Tensor) -> None:
    sampler = DDIMSampler(alphas_cumprod, eta=1.0)  # eta 1: the noise coefficient from t = 999 must stay finite
    for steps in range(1, 51):
        sampler.set_timesteps(steps)
        ts = sampler.timesteps
        assert len(ts) == steps and ts[0] == 999 and all(a > b >= 0 for a, b in itertools.pairwise(ts))
        out = sample(lambda x, t: 0.5 * x, sampler, torch.ones(1, 2, 2))
        assert torch.isfinite(out).all(), f"{steps} steps"


@pytest.mark.parametrize("steps", [0, -3, 1001])
def test_invalid_step_counts_rejected(alphas_cumprod: torch.Tensor, steps: int) -> None:
    with pytest.raises(ValueError, match=r"num_steps must be in 1\.\.1000"):
        DDIMSampler(alphas_cumprod).set_timesteps(steps)


def test_bad_arguments_rejected(alphas_cumprod: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="must be an int"):
        DDIMSampler(alphas_cumprod).set_timesteps(10.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eta"):
        DDIMSampler(alphas_cumprod, eta=1.5)
    with pytest.raises(ValueError, match="spacing"):
        DDIMSampler(alphas_cumprod, spacing="leading")
    with pytest.raises(RuntimeError, match="set_timesteps"):
        DDIMSampler(alphas_cumprod).step(torch.zeros(2), 0, torch.zeros(2))


def test_step_formula_eta1(alphas_cumprod: torch.Tensor) -> None:
    sampler = DDIMSampler(alphas_cumprod, eta=1.0)
    sampler.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x_t, x0, z = (torch.randn(1, 80, 265, generator=g, dtype=torch.float64) for _ in range(3))
    out = sampler.step(x0.float(), 2, x_t.float(), noise=z.float())
    # float64 reference of the DDIM update from t = 799 to 699
    a, an = alphas_cumprod[799].double(), alphas_cumprod[699].double()
    eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
    sigma = ((1 - a / an) * (1 - an) / (1 - a)).sqrt()
    ref = an.sqrt() * x0 + (1 - an - sigma**2).sqrt() * eps + sigma * z
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    # the final step returns the x_0 prediction unchanged
    assert torch.equal(sampler.step(x0.float(), 9, x_t.float(), noise=z.float()), x0.float())


def test_eta0_is_deterministic_and_ignores_noise(alphas_cumprod: torch.Tensor) -> None:
    sampler = DDIMSampler(alphas_cumprod, eta=0.0)
    sampler.set_timesteps(5)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * x + t[:, None, None].float() / 1000  # any fixed function of (x, t)

    x_T = torch.randn(2, 4, 3)
    a = sample(denoise, sampler, x_T, generator=torch.Generator().manual_seed(1))
    b = sample(denoise, sampler, x_T, generator=torch.Generator().manual_seed(2))
    c = sample(denoise, sampler, x_T, noises=[torch.randn_like(x_T) for _ in range(4)])
    assert torch.equal(a, b) and torch.equal(a, c)


def test_eta1_uses_noise(alphas_cumprod: torch.Tensor) -> None:
    sampler = DDIMSampler(alphas_cumprod, eta=1.0)
    sampler.set_timesteps(5)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * x

    x_T = torch.randn(1, 4, 3)
    a = sample(denoise, sampler, x_T, generator=torch.Generator().manual_seed(1))
    b = sample(denoise, sampler, x_T, generator=torch.Generator().manual_seed(1))
    c = sample(denoise, sampler, x_T, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    with pytest.raises(ValueError, match="need 4 step noises"):
        sample(denoise, sampler, x_T, noises=[x_T])


def test_sample_visits_timesteps_in_order(alphas_cumprod: torch.Tensor) -> None:
    sampler = DDIMSampler(alphas_cumprod, eta=1.0)
    sampler.set_timesteps(10)
    seen: list[int] = []

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.dtype == torch.long and t.shape == (x.shape[0],)
        seen.append(int(t[0]))
        return torch.full_like(x, float(t[0]))

    out = sample(denoise, sampler, torch.zeros(1, 2, 2), noises=[torch.zeros(1, 2, 2)] * 9)
    assert seen == sampler.timesteps
    assert torch.equal(out, torch.full((1, 2, 2), 99.0))  # the last x_0 prediction is the result
