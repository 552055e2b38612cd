// Fused hourglass input of LivePortrait's dense motion network (spec 3.2 and 3.3 steps 2-5). For motion m = 0..K
// and voxel (z, y, x) of the coordinate grid g:
//   out[b, m*(C+1)]       = 0 for m = 0, else G(kp_driving[m-1]) - G(kp_source[m-1]),
//                           G(kp) = exp(-0.5 * |g - kp|^2 / 0.01)
//   out[b, m*(C+1) + 1+c] = grid_sample(compressed[:, c], s_m) (trilinear, zeros, align_corners=False),
//                           s_0 = g, s_m = (g - kp_driving[m-1]) + kp_source[m-1].
// The result is written straight into the [B, (K+1)*(C+1), D, H, W] layout the hourglass reads, so neither the
// sparse motions [B, K+1, D, H, W, 3] nor the deformed features [B, K+1, C, D, H, W] are ever formed.
//
// compressed [B, C, D, H, W] (T), kp_driving / kp_source [B, K, 3] (fp32), out (T).
#include "avatar_common.cuh"

namespace avatar {

__device__ __forceinline__ float gaussian(float gx, float gy, float gz, const float* kp) {
  const float dx = gx - kp[0];
  const float dy = gy - kp[1];
  const float dz = gz - kp[2];
  // Rounded squares summed left to right, as torch's (diff ** 2).sum(-1): no FMA contraction.
  const float squared = __fadd_rn(__fadd_rn(__fmul_rn(dx, dx), __fmul_rn(dy, dy)), __fmul_rn(dz, dz));
  return expf((-0.5f * squared) / 0.01f);
}

template <typename T>
__device__ __forceinline__ void sparse_motion_impl(const T* __restrict__ compressed,
                                                   const float* __restrict__ kp_driving,
                                                   const float* __restrict__ kp_source, T* __restrict__ out, int B,
                                                   int C, int K, int D, int H, int W) {
  const long long volume = static_cast<long long>(D) * H * W;
  const long long total = static_cast<long long>(B) * (K + 1) * volume;
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    // Thread order (b, m, voxel): consecutive threads write consecutive voxels of the same output channel.
    const long long bm = i / volume;
    const long long v = i - bm * volume;
    const int m = static_cast<int>(bm % (K + 1));
    const long long b = bm / (K + 1);
    const int x = static_cast<int>(v % W);
    const int y = static_cast<int>((v / W) % H);
    const int z = static_cast<int>(v / (static_cast<long long>(W) * H));
    const float gx = grid_coord(x, W);
    const float gy = grid_coord(y, H);
    const float gz = grid_coord(z, D);

    float heat = 0.0f;
    float sx = gx;
    float sy = gy;
    float sz = gz;
    if (m > 0) {
      const float* kd = kp_driving + (b * K + (m - 1)) * 3;
      const float* ks = kp_source + (b * K + (m - 1)) * 3;
      heat = gaussian(gx, gy, gz, kd) - gaussian(gx, gy, gz, ks);
      sx = (gx - kd[0]) + ks[0];
      sy = (gy - kd[1]) + ks[1];
      sz = (gz - kd[2]) + ks[2];
    }

    T* out_m = out + bm * (C + 1) * volume + v;
    out_m[0] = from_float<T>(heat);
    const Trilinear t = trilinear_corners(sx, sy, sz, D, H, W);
    const T* compressed_b = compressed + b * C * volume;
    for (int c = 0; c < C; ++c) {
      out_m[(c + 1) * volume] = from_float<T>(sample_channel(compressed_b + c * volume, t));
    }
  }
}

}  // namespace avatar

#define AVATAR_DEFINE_SPARSE_MOTION(SUFFIX, T)                                                                  \
  extern "C" __global__ void __launch_bounds__(256)                                                             \
      avatar_sparse_motion_##SUFFIX(const T* compressed, const float* kp_driving, const float* kp_source, T* out, \
                                    int B, int C, int K, int D, int H, int W) {                                 \
    avatar::sparse_motion_impl<T>(compressed, kp_driving, kp_source, out, B, C, K, D, H, W);                    \
  }

AVATAR_DEFINE_SPARSE_MOTION(f32, float)
AVATAR_DEFINE_SPARSE_MOTION(f16, avatar::Half)
AVATAR_DEFINE_SPARSE_MOTION(bf16, avatar::BFloat16)
