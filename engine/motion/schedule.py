"""Diffusion noise schedule shared by the LMDM denoiser's samplers (pure function, no model code).

Ditto's cosine schedule (``docs/spec/ditto.md`` §3): the betas are built in float64, then cast to float32 before
the cumulative product, so ``alphas_cumprod`` carries float32 rounding exactly as the reference does (the
golden DDIM output depends on it at the 1e-5 level).
"""

from __future__ import annotations

import math

import torch

NUM_TRAIN_TIMESTEPS = 1000
COSINE_OFFSET = 0.008


def cosine_betas(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, s: float = COSINE_OFFSET) -> torch.Tensor:
    """float64 betas ``[N]`` of the cosine schedule, clipped to ``[0, 0.999]``."""
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    tau = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps + s
    abar = torch.cos(tau / (1 + s) * math.pi / 2) ** 2
    abar = abar / abar[0]
    betas = 1 - abar[1:] / abar[:-1]
    return betas.clamp(0, 0.999)


def cosine_alphas_cumprod(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, s: float = COSINE_OFFSET) -> torch.Tensor:
    """float32 ``alphas_cumprod`` ``[N]`` (ᾱ_999 ≈ 2.43e-9, ᾱ_499 ≈ 0.49384 for N = 1000)."""
    alphas = 1 - cosine_betas(num_train_timesteps, s).float()
    return torch.cumprod(alphas, dim=0)
