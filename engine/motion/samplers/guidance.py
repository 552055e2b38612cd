"""Classifier-free guidance with cond and uncond in ONE batched forward (``docs/spec/ditto.md`` §2.7).

guided = u + (c − u)·w, with c the conditional and u the unconditional x_0 prediction. The batch is doubled and a
per-sample drop mask selects the null condition for the second half, which halves the number of network calls
compared with two forwards (the result is the same up to float rounding).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

DITTO_GUIDANCE_WEIGHT = 2.0


class MaskedDenoiser(Protocol):
    """What guidance needs from a denoiser (``engine.motion.lmdm.MotionDecoder`` fits)."""

    def __call__(
        self,
        x_t: Tensor,
        cond_frame: Tensor,
        cond: Tensor,
        t: Tensor,
        drop_cond: bool = False,
        drop_mask: Tensor | None = None,
    ) -> Tensor: ...


def per_sample_drop(batch: int, drop_cond: bool, drop_mask: Tensor | None, device: torch.device) -> Tensor:
    """The ``[B]`` bool drop mask of a :class:`MaskedDenoiser` call, whichever of the two ways it was given."""
    if drop_cond and drop_mask is not None:
        raise ValueError("give either drop_cond=True or drop_mask, not both")
    if drop_mask is None:
        return torch.full((batch,), drop_cond, dtype=torch.bool, device=device)
    return drop_mask


def guided_denoise(
    denoiser: MaskedDenoiser,
    x_t: Tensor,
    cond_frame: Tensor,
    cond: Tensor,
    t: Tensor,
    weight: float = DITTO_GUIDANCE_WEIGHT,
) -> Tensor:
    """Guided x_0 ``[B, L, M]``: one forward over ``[cond; uncond]`` (batch 2B) unless ``weight`` is 0 or 1."""
    if weight == 1.0:
        return denoiser(x_t, cond_frame, cond, t, drop_cond=False)
    if weight == 0.0:
        return denoiser(x_t, cond_frame, cond, t, drop_cond=True)
    b = x_t.shape[0]
    drop_mask = torch.zeros(2 * b, dtype=torch.bool, device=x_t.device)
    drop_mask[b:] = True
    both = denoiser(
        torch.cat((x_t, x_t)),
        torch.cat((cond_frame, cond_frame)),
        torch.cat((cond, cond)),
        torch.cat((t, t)),
        drop_mask=drop_mask,
    )
    c, u = both[:b], both[b:]
    return u + (c - u) * weight
