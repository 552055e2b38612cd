// Fused flow warp (LivePortrait warping module, spec 3.3 steps 7-8 and 3.4 step 1) in one pass per voxel:
//   A = softmax over the K+1 mask logits of the voxel,
//   deformation = A_0 * grid + sum_{k=1..K} A_k * ((grid - kp_driving[k-1]) + kp_source[k-1]),
//   out[:, voxel] = grid_sample(feature, deformation, trilinear, zeros, align_corners=False).
// The [B, K+1, D, H, W, 3] sparse-motion tensor of the unfused path is never formed.
//
// feature [B, C, Df, Hf, Wf], mask_logits [B, K+1, D, H, W] (storage T), kp_driving / kp_source [B, K, 3] (fp32),
// out [B, C, D, H, W] (T), deformation [B, D, H, W, 3] (T, optional: pass a null pointer to skip it).
// With C = 0 only the deformation is computed (feature and out may then be null).
#include "avatar_common.cuh"

namespace avatar {

template <typename T>
__device__ __forceinline__ void flow_warp_impl(const T* __restrict__ feature, const T* __restrict__ mask_logits,
                                               const float* __restrict__ kp_driving,
                                               const float* __restrict__ kp_source, T* __restrict__ out,
                                               T* __restrict__ deformation, int B, int C, int Df, int Hf, int Wf,
                                               int K, int D, int H, int W) {
  const long long volume = static_cast<long long>(D) * H * W;
  const long long feature_volume = static_cast<long long>(Df) * Hf * Wf;
  const long long total = static_cast<long long>(B) * volume;
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const long long b = i / volume;
    const long long v = i - b * volume;
    const int x = static_cast<int>(v % W);
    const int y = static_cast<int>((v / W) % H);
    const int z = static_cast<int>(v / (static_cast<long long>(W) * H));
    const float gx = grid_coord(x, W);
    const float gy = grid_coord(y, H);
    const float gz = grid_coord(z, D);

    // Softmax over the K+1 logits, then the weighted sum of the motions, in the order and rounding of the PyTorch
    // path: normalised weights, one rounded product and one rounded sum per motion (__fmul_rn / __fadd_rn keep the
    // compiler from fusing them into FMAs). The warp magnifies coordinate differences by the volume size, so the
    // fused deformation is kept within an ulp or so of the unfused one rather than merely close.
    const T* logits = mask_logits + b * (K + 1) * volume + v;
    float peak = to_float(logits[0]);
    for (int m = 1; m <= K; ++m) {
      peak = fmaxf(peak, to_float(logits[m * volume]));
    }
    float denom = 0.0f;
    for (int m = 0; m <= K; ++m) {
      denom += expf(to_float(logits[m * volume]) - peak);
    }
    float a = expf(to_float(logits[0]) - peak) / denom;  // motion 0: the identity grid
    float sx = __fmul_rn(a, gx);
    float sy = __fmul_rn(a, gy);
    float sz = __fmul_rn(a, gz);
    const float* kd = kp_driving + b * K * 3;
    const float* ks = kp_source + b * K * 3;
    for (int k = 0; k < K; ++k) {
      a = expf(to_float(logits[(k + 1) * volume]) - peak) / denom;
      sx = __fadd_rn(sx, __fmul_rn(a, (gx - kd[3 * k + 0]) + ks[3 * k + 0]));
      sy = __fadd_rn(sy, __fmul_rn(a, (gy - kd[3 * k + 1]) + ks[3 * k + 1]));
      sz = __fadd_rn(sz, __fmul_rn(a, (gz - kd[3 * k + 2]) + ks[3 * k + 2]));
    }
    if (deformation != nullptr) {
      deformation[i * 3 + 0] = from_float<T>(sx);
      deformation[i * 3 + 1] = from_float<T>(sy);
      deformation[i * 3 + 2] = from_float<T>(sz);
    }

    if (C == 0) {
      continue;  // deformation only (mask_deformation): feature and out may be null
    }
    const Trilinear t = trilinear_corners(sx, sy, sz, Df, Hf, Wf);
    const T* feature_b = feature + b * C * feature_volume;
    T* out_b = out + b * C * volume + v;
    for (int c = 0; c < C; ++c) {
      out_b[c * volume] = from_float<T>(sample_channel(feature_b + c * feature_volume, t));
    }
  }
}

}  // namespace avatar

#define AVATAR_DEFINE_FLOW_WARP(SUFFIX, T)                                                                         \
  extern "C" __global__ void __launch_bounds__(256)                                                                \
      avatar_flow_warp_##SUFFIX(const T* feature, const T* mask_logits, const float* kp_driving,                   \
                                const float* kp_source, T* out, T* deformation, int B, int C, int Df, int Hf,      \
                                int Wf, int K, int D, int H, int W) {                                              \
    avatar::flow_warp_impl<T>(feature, mask_logits, kp_driving, kp_source, out, deformation, B, C, Df, Hf, Wf, K, \
                              D, H, W);                                                                            \
  }

AVATAR_DEFINE_FLOW_WARP(f32, float)
AVATAR_DEFINE_FLOW_WARP(f16, avatar::Half)
AVATAR_DEFINE_FLOW_WARP(bf16, avatar::BFloat16)
