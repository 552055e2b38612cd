// Shared device helpers for the avatar engine's fused warping kernels.
//
// This header is compiled by two front ends: NVRTC at run time (kernels/nvrtc.py, PyTorch) and nvcc at build time
// (kernels/trt, the TensorRT plugin). NVRTC runs without the CUDA toolkit headers on the search path, so nothing
// here includes a system header: integer types are spelled out, and half / bfloat16 are carried as raw 16-bit
// patterns converted with PTX (fp16) or bit arithmetic (bf16) instead of cuda_fp16.h / cuda_bf16.h.
#pragma once

namespace avatar {

// Raw 16-bit storage types: layout-compatible with torch.float16 / torch.bfloat16 and TensorRT kHALF / kBF16.
struct Half {
  unsigned short bits;
};
struct BFloat16 {
  unsigned short bits;
};

// Every kernel reads its storage type through to_float and writes through from_float: all arithmetic is fp32.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(Half v) {
#ifdef AVATAR_HOST_EMULATION  // CPU build for tests only (kernels/testing/host_emulation.h)
  return avatar_host_half_to_float(v.bits);
#else
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
  return f;
#endif
}
__device__ __forceinline__ float to_float(BFloat16 v) { return __uint_as_float(static_cast<unsigned int>(v.bits) << 16); }

template <typename T>
__device__ __forceinline__ T from_float(float v);

template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ Half from_float<Half>(float v) {
  Half h;
#ifdef AVATAR_HOST_EMULATION
  h.bits = avatar_host_float_to_half(v);
#else
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(v));
#endif
  return h;
}
template <>
__device__ __forceinline__ BFloat16 from_float<BFloat16>(float v) {
  // Round to nearest even, the same rule as torch.bfloat16 (c10::BFloat16) so results round identically.
  unsigned int u = __float_as_uint(v);
  BFloat16 b;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    b.bits = 0x7fc0;  // quiet NaN
    return b;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  b.bits = static_cast<unsigned short>(u >> 16);
  return b;
}

// LivePortrait's make_coordinate_grid: value of voxel index i on an axis of n voxels, 2 * (i / (n - 1)) - 1.
// The grid follows the align_corners=True convention while every sample uses align_corners=False (spec 3.1):
// the mismatch is part of the model and is reproduced on purpose.
__device__ __forceinline__ float grid_coord(int i, int n) {
  return 2.0f * (static_cast<float>(i) / static_cast<float>(n - 1)) - 1.0f;
}

// Corner indices and weights of one trilinear sample: grid_sample(mode="bilinear", padding_mode="zeros",
// align_corners=False) on a [D, H, W] volume. Coordinates are (x, y, z) in [-1, 1] indexing (W, H, D).
struct Trilinear {
  long long offset[8];  // z * H * W + y * W + x of each corner; -1 for corners outside the volume (zeros padding)
  float weight[8];
};

// Unnormalise like torch (align_corners=False): ((coord + 1) * size - 1) / 2. Far out-of-range and non-finite
// coordinates are clamped to a band just outside the volume first: every corner there is out of bounds, so the
// sample is 0 exactly as in torch, and the float-to-int conversion below stays defined.
__device__ __forceinline__ float unnormalize(float coord, int size) {
  float pos = ((coord + 1.0f) * static_cast<float>(size) - 1.0f) * 0.5f;
  return fminf(fmaxf(pos, -2.0f), static_cast<float>(size) + 1.0f);
}

__device__ __forceinline__ Trilinear trilinear_corners(float gx, float gy, float gz, int D, int H, int W) {
  const float ix = unnormalize(gx, W);
  const float iy = unnormalize(gy, H);
  const float iz = unnormalize(gz, D);
  const int x0 = static_cast<int>(floorf(ix));
  const int y0 = static_cast<int>(floorf(iy));
  const int z0 = static_cast<int>(floorf(iz));
  // Distances to the far corner (east / south / bottom) weight the near corner, as in torch's kernel.
  const float wx1 = ix - static_cast<float>(x0);
  const float wy1 = iy - static_cast<float>(y0);
  const float wz1 = iz - static_cast<float>(z0);
  const float wx0 = static_cast<float>(x0 + 1) - ix;
  const float wy0 = static_cast<float>(y0 + 1) - iy;
  const float wz0 = static_cast<float>(z0 + 1) - iz;
  Trilinear t;
  // Corner order (dz, dy, dx) = 000, 001, 010, 011, 100, 101, 110, 111: torch's tnw, tne, tsw, tse, bnw, ...
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    const int dx = c & 1;
    const int dy = (c >> 1) & 1;
    const int dz = (c >> 2) & 1;
    const int x = x0 + dx;
    const int y = y0 + dy;
    const int z = z0 + dz;
    const bool inside = x >= 0 && x < W && y >= 0 && y < H && z >= 0 && z < D;
    const float w = (dx ? wx1 : wx0) * (dy ? wy1 : wy0) * (dz ? wz1 : wz0);
    t.weight[c] = w;
    t.offset[c] = inside ? (static_cast<long long>(z) * H + y) * W + x : -1;
  }
  return t;
}

// One channel of a trilinear sample; `channel` points at that channel's [D, H, W] block.
template <typename T>
__device__ __forceinline__ float sample_channel(const T* __restrict__ channel, const Trilinear& t) {
  float acc = 0.0f;
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    if (t.offset[c] >= 0) {
      acc += to_float(channel[t.offset[c]]) * t.weight[c];
    }
  }
  return acc;
}

}  // namespace avatar
