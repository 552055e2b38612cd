"""Diffusion samplers (one per file, no model imports) and the generic sampling loop."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from engine.motion.samplers.ddim import DDIMSampler
from engine.motion.samplers.guidance import DITTO_GUIDANCE_WEIGHT, MaskedDenoiser, guided_denoise

__all__ = ["DITTO_GUIDANCE_WEIGHT", "DDIMSampler", "MaskedDenoiser", "guided_denoise", "sample"]


def sample(
    denoise_fn: Callable[[Tensor, Tensor], Tensor],
    sampler: DDIMSampler,
    x_T: Tensor,
    noises: Sequence[Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Run every step of ``sampler`` (``set_timesteps`` done) from ``x_T [B, ...]``.

    ``denoise_fn(x_t, t [B] int64) -> x_0``; ``noises[i]`` is the z of step i (Ditto draws these once and reuses
    them for every window); without it each noisy step draws from ``generator``.
    """
    if sampler.num_steps == 0:
        raise RuntimeError("call sampler.set_timesteps(num_steps) before sample()")
    if noises is not None and len(noises) < sampler.noise_steps:
        raise ValueError(f"{sampler.num_steps} steps need {sampler.noise_steps} step noises, got {len(noises)}")
    x = x_T
    for i, t in enumerate(sampler.timesteps):
        x0 = denoise_fn(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))
        noise = noises[i] if noises is not None and i < sampler.noise_steps else None
        x = sampler.step(x0, i, x, noise=noise, generator=generator)
    return x
