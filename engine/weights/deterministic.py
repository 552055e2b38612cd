"""Deterministic pseudo-random weights (the golden init described in ``docs/spec/README.md``).

Used for tests and for running without imported weights. Untrained weights render noise: every caller that
uses them must say so to the user (see :func:`engine.weights.untrained_warning`).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Sequence

import torch


def _generator(key: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(key.encode()))


def _uniform(shape: Sequence[int], gen: torch.Generator) -> torch.Tensor:
    # float64 draw then float32, as the reference init does, so values match bit for bit
    return torch.rand(tuple(shape), generator=gen, dtype=torch.float64).float() * 2 - 1


def deterministic_tensor(key: str, shape: Sequence[int]) -> torch.Tensor:
    gen = _generator(key)
    if key.endswith("num_batches_tracked"):
        return torch.zeros(tuple(shape), dtype=torch.long)
    if key.endswith("running_mean"):
        return 0.1 * _uniform(shape, gen)
    if key.endswith("running_var"):
        return 1 + 0.1 * (_uniform(shape, gen) + 1) / 2
    if len(shape) >= 2:
        return _uniform(shape, gen) / math.sqrt(math.prod(shape[1:]))
    if key.endswith("weight") or key.endswith("gamma"):
        return 1 + 0.1 * _uniform(shape, gen)
    return 0.1 * _uniform(shape, gen)


def deterministic_state_dict(
    entries: Iterable[tuple[str, Sequence[int]]], *, keep: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """State dict for ``(key, shape)`` entries; ``keep`` supplies tensors that are not drawn (e.g. rotary freqs).

    Spectral-norm ``weight_u``/``weight_v`` come from 20 power iterations on ``weight_orig`` from seeded starts.
    """
    entries = [(k, tuple(int(d) for d in s)) for k, s in entries]
    keep = keep or {}
    sd: dict[str, torch.Tensor] = {}
    for key, shape in entries:
        if key in keep:
            sd[key] = keep[key].clone()
        elif not (key.endswith("weight_u") or key.endswith("weight_v")):
            sd[key] = deterministic_tensor(key, shape)
    for key, _ in entries:
        if not key.endswith("weight_u") or key in keep:
            continue
        base = key[: -len("weight_u")]
        w = sd[base + "weight_orig"].reshape(sd[base + "weight_orig"].shape[0], -1)
        u = torch.nn.functional.normalize(torch.randn(w.shape[0], generator=_generator(base + "weight_u")), dim=0)
        v = torch.nn.functional.normalize(torch.randn(w.shape[1], generator=_generator(base + "weight_v")), dim=0)
        for _ in range(20):
            v = torch.nn.functional.normalize(w.t() @ u, dim=0, eps=1e-12)
            u = torch.nn.functional.normalize(w @ v, dim=0, eps=1e-12)
        sd[base + "weight_u"], sd[base + "weight_v"] = u, v
    return {k: sd[k] for k, _ in entries}
