// Trilinear grid sampling of a 5-D volume: torch.nn.functional.grid_sample(input, grid, mode="bilinear",
// padding_mode="zeros", align_corners=False) for input [B, C, D, H, W] and grid [B, Do, Ho, Wo, 3] (x, y, z).
// Output [B, C, Do, Ho, Wo]. Storage float / half / bfloat16 (input, grid and output share it); math in fp32.
//
// One thread per output voxel: the 8 corner offsets and weights are computed once and reused for all C channels.
#include "avatar_common.cuh"

namespace avatar {

template <typename T>
__device__ __forceinline__ void grid_sample_3d_impl(const T* __restrict__ input, const T* __restrict__ grid,
                                                    T* __restrict__ output, int B, int C, int D, int H, int W,
                                                    int Do, int Ho, int Wo) {
  const long long out_volume = static_cast<long long>(Do) * Ho * Wo;
  const long long in_volume = static_cast<long long>(D) * H * W;
  const long long total = static_cast<long long>(B) * out_volume;
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const long long b = i / out_volume;
    const long long v = i - b * out_volume;
    const T* g = grid + i * 3;
    const Trilinear t = trilinear_corners(to_float(g[0]), to_float(g[1]), to_float(g[2]), D, H, W);
    const T* in_b = input + b * C * in_volume;
    T* out_b = output + b * C * out_volume + v;
    for (int c = 0; c < C; ++c) {
      out_b[c * out_volume] = from_float<T>(sample_channel(in_b + c * in_volume, t));
    }
  }
}

}  // namespace avatar

#define AVATAR_DEFINE_GRID_SAMPLE_3D(SUFFIX, T)                                                                \
  extern "C" __global__ void __launch_bounds__(256)                                                            \
      avatar_grid_sample_3d_##SUFFIX(const T* input, const T* grid, T* output, int B, int C, int D, int H,     \
                                     int W, int Do, int Ho, int Wo) {                                          \
    avatar::grid_sample_3d_impl<T>(input, grid, output, B, C, D, H, W, Do, Ho, Wo);                            \
  }

AVATAR_DEFINE_GRID_SAMPLE_3D(f32, float)
AVATAR_DEFINE_GRID_SAMPLE_3D(f16, avatar::Half)
AVATAR_DEFINE_GRID_SAMPLE_3D(bf16, avatar::BFloat16)
