"""Fused CUDA kernels for the warping module (grid sampling, flow warp, sparse-motion features).

One set of CUDA sources (kernels/csrc) serves two front ends: NVRTC at run time for PyTorch (kernels.ops,
kernels.nvrtc) and nvcc at build time for the TensorRT plugin (kernels/trt). kernels.reference holds the
pure-PyTorch twins. See kernels/README.md.
"""

from kernels.nvrtc import available, unavailable_reason

__all__ = ["available", "unavailable_reason"]
