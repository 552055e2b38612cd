"""DDIM sampler for x_0-predicting models (Ditto LMDM), diffusers-style: ``set_timesteps()`` then ``step()``.

Spec ``docs/spec/ditto.md`` §4. Timesteps use Ditto's spacing: ``linspace(-1, N-1, S+1)`` in float32, truncated toward
zero, reversed, so S = 10 visits 999, 899, ..., 99 and ends on the x_0 predicted at t = 99 (the pair's next
timestep is -1). The arithmetic stays in float32 like the reference, which the golden parity test relies on.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

SPACINGS = ("ditto",)


class DDIMSampler:
    """DDIM over a fixed ``alphas_cumprod``; ``eta`` 0 is deterministic, 1 is Ditto's setting."""

    def __init__(self, alphas_cumprod: Tensor, eta: float = 1.0, spacing: str = "ditto") -> None:
        if alphas_cumprod.ndim != 1 or alphas_cumprod.numel() < 2:
            raise ValueError(f"alphas_cumprod must be a 1-D tensor of >= 2 values, got {list(alphas_cumprod.shape)}")
        if not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"eta must lie in [0, 1], got {eta}")
        if spacing not in SPACINGS:
            raise ValueError(f"unknown timestep spacing {spacing!r}; supported: {list(SPACINGS)}")
        self.alphas_cumprod = alphas_cumprod.detach().to(torch.float32).cpu()
        self.num_train_timesteps = int(alphas_cumprod.numel())
        self.eta = float(eta)
        self.spacing = spacing
        self.num_steps = 0
        self.timesteps: list[int] = []  # t_i visited by step i (the model is evaluated at these)
        self.next_timesteps: list[int] = []  # t_{i+1}; -1 marks the final step
        # per step: (sqrt(a'), c, sigma) as float32 scalar tensors; None on the final step
        self._coefs: list[tuple[Tensor, Tensor, Tensor] | None] = []

    @property
    def noise_steps(self) -> int:
        """How many steps add noise (every step but the last): the length of ``noises`` for a full run."""
        return max(self.num_steps - 1, 0)

    def set_timesteps(self, num_steps: int) -> None:
        """Prepare ``num_steps`` (1..N) sampling steps; calling again with the same count does nothing."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, int):
            raise ValueError(f"num_steps must be an int, got {type(num_steps).__name__}")
        if not 1 <= num_steps <= self.num_train_timesteps:
            raise ValueError(f"num_steps must be in 1..{self.num_train_timesteps}, got {num_steps}")
        if num_steps == self.num_steps:
            return
        n = self.num_train_timesteps
        times = list(reversed(torch.linspace(-1, n - 1, num_steps + 1).int().tolist()))
        if any(a <= b for a, b in itertools.pairwise(times)):
            raise ValueError(f"num_steps {num_steps} gives repeated timesteps {times}")
        self.timesteps, self.next_timesteps = times[:-1], times[1:]
        ac = self.alphas_cumprod
        self._coefs = []
        for t, t_next in zip(self.timesteps, self.next_timesteps, strict=True):
            if t_next < 0:
                self._coefs.append(None)
                continue
            a, a_next = ac[t], ac[t_next]
            sigma = self.eta * ((1 - a / a_next) * (1 - a_next) / (1 - a)).sqrt()
            # exactly (1 - a') a / a' >= 0, but from t = 999 (ᾱ ≈ 2e-9) float32 rounding can make it slightly
            # negative (S = 5 would give NaN); clamping keeps every step count finite and changes nothing else
            c = (1 - a_next - sigma**2).clamp(min=0).sqrt()
            self._coefs.append((a_next.sqrt(), c, sigma))
        self.num_steps = num_steps

    def predict_noise(self, x_t: Tensor, t: int, x0: Tensor) -> Tensor:
        """ε implied by x_0 at timestep t: sqrt(1/(1-ᾱ))·x_t − x_0/sqrt(1/ᾱ − 1), float32 like the reference."""
        a = self.alphas_cumprod[t]
        return (1 / (1 - a)).sqrt().to(x_t) * x_t - x0 / (1 / a - 1).sqrt().to(x_t)

    def step(
        self,
        x0_pred: Tensor,
        t_index: int,
        x_t: Tensor,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """One step from ``timesteps[t_index]`` to the next; the last step returns ``x0_pred`` itself.

        ``noise`` (same shape as ``x_t``) is the step's z ~ N(0, 1); when omitted with eta > 0 it is drawn from
        ``generator``.
        """
        if self.num_steps == 0:
            raise RuntimeError("call set_timesteps(num_steps) before step()")
        if not 0 <= t_index < self.num_steps:
            raise IndexError(f"t_index must be in 0..{self.num_steps - 1}, got {t_index}")
        if x0_pred.shape != x_t.shape:
            raise ValueError(f"x0_pred {list(x0_pred.shape)} and x_t {list(x_t.shape)} differ in shape")
        coefs = self._coefs[t_index]
        if coefs is None:
            return x0_pred
        sqrt_a_next, c, sigma = (v.to(x_t) for v in coefs)
        eps = self.predict_noise(x_t, self.timesteps[t_index], x0_pred)
        x_prev = x0_pred * sqrt_a_next + c * eps
        if self.eta == 0.0:
            return x_prev
        if noise is None:
            # drawn on the generator's device (CPU by default) so a seeded run is the same on every device
            device = generator.device if generator is not None else x_t.device
            noise = torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype, device=device).to(x_t.device)
        elif noise.shape != x_t.shape:
            raise ValueError(f"noise {list(noise.shape)} must match x_t {list(x_t.shape)}")
        return x_prev + sigma * noise
