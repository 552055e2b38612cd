"""Warp parity shared by the host-compiled and the CUDA kernel tests (one tolerance, one definition)."""

from __future__ import annotations

import torch
from torch import Tensor

from kernels import reference

ATOL = 1e-5  # fp32 parity against the twins


def assert_warp_close(
    out: Tensor, expected_out: Tensor, feature: Tensor, deformation: Tensor, expected_deformation: Tensor
) -> None:
    """Warp parity, stage by stage and end to end.

    Deformations must agree to 1e-5 and the sampling at the kernel's own deformation to 1e-5. End to end, a
    trilinear warp turns a coordinate difference into at most (size / 2 per axis) x (feature range) of output
    difference, so ulp-level deformation differences (softmax rounding differs between implementations) may show
    up magnified by exactly that bound on top of the 1e-5.
    """
    torch.testing.assert_close(deformation, expected_deformation, atol=ATOL, rtol=0)
    torch.testing.assert_close(out, reference.grid_sample_3d(feature, deformation), atol=ATOL, rtol=0)
    lipschitz = sum(s / 2 for s in feature.shape[2:]) * (feature.max() - feature.min()).item()
    slack = (deformation - expected_deformation).abs().max().item() * lipschitz
    torch.testing.assert_close(out, expected_out, atol=ATOL + slack, rtol=0)
