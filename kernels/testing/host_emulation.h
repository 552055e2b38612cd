// Test-only shim: lets a C++ host compiler build kernels/csrc/*.cu into plain CPU functions, so the exact device
// code (indexing, layouts, softmax, heatmaps, trilinear weights, storage conversions) runs in tests on machines
// without a GPU (tests/test_kernels_host.py). Every kernel becomes a single "thread" whose grid-stride loop covers
// all work items. Never used by NVRTC or nvcc builds.
#pragma once

#include <math.h>

#include <cstring>

#define AVATAR_HOST_EMULATION 1
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(threads)
#define __restrict__ __restrict

struct AvatarHostDim {
  unsigned int x;
};
static const AvatarHostDim threadIdx{0};
static const AvatarHostDim blockIdx{0};
static const AvatarHostDim blockDim{1};
static const AvatarHostDim gridDim{1};

inline float __uint_as_float(unsigned int u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline unsigned int __float_as_uint(float f) {
  unsigned int u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// Without -mfma the host compiler never contracts these; on the GPU they stop nvcc from forming FMAs.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }

// IEEE binary16 through the compiler's _Float16: round to nearest even, like PTX cvt.rn.f16.f32.
inline float avatar_host_half_to_float(unsigned short bits) {
  _Float16 h;
  std::memcpy(&h, &bits, sizeof h);
  return static_cast<float>(h);
}

inline unsigned short avatar_host_float_to_half(float v) {
  _Float16 h = static_cast<_Float16>(v);
  unsigned short bits;
  std::memcpy(&bits, &h, sizeof bits);
  return bits;
}
